"""The customer profile folded in the stream (in process and on a real local Ray) equals the
profile rebuilt offline from the store the run wrote, and ``state(key, as_of=T)`` from a
snapshot equals the state folded from zero."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from pipelines import SOURCE_KINDS, Pipeline, SourceKind
from pipelines.kinds import FileSourceOptions
from pipelines.projection_spec import CUSTOMER_PROFILE
from pipelines.projections import Projection
from pipelines.testing import ABORT, AbortingListSource

T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
OTHER_TYPES = ("fraud.suspected", "fraud.reported", "alert.closed", "card.blocked", "card.unblocked")


def customer_events(n: int = 3000, customers: int = 40, seed: int = 5) -> list[dict[str, Any]]:
    """Transactions, alerts on some of them, their labels later, closures, card blocks."""
    rng = np.random.default_rng(seed)
    events, minute = [], 0
    for i in range(n):
        minute += int(rng.integers(0, 3))  # equal times happen
        customer = f"c{int(rng.integers(customers))}"
        at = T0 + dt.timedelta(minutes=minute)
        tx = str(uuid.UUID(int=i + 1))
        events.append(_event(tx, "transaction.created", at, tx, {
            "CUSTOMER_ID": customer, "TERMINAL_ID": int(rng.integers(50)),
            "TX_AMOUNT": round(float(rng.gamma(2, 30)), 2)}))
        roll = rng.random()
        if roll < 0.15:  # an alert at the transaction's time, settled later or not
            events.append(_event(f"a-{tx}", "fraud.suspected", at, tx, {"CUSTOMER_ID": customer}))
            later = at + dt.timedelta(minutes=int(rng.integers(1, 600)))
            if rng.random() < 0.6:
                kind = "fraud.reported" if rng.random() < 0.7 else "alert.closed"
                events.append(_event(f"l-{tx}", kind, later, tx, {"CUSTOMER_ID": customer}))
        elif roll < 0.19:
            kind = "card.blocked" if rng.random() < 0.6 else "card.unblocked"
            events.append(_event(f"b-{tx}", kind, at + dt.timedelta(seconds=30), tx,
                                 {"CUSTOMER_ID": customer}))
    return events


def _event(event_id: str, kind: str, at: dt.datetime, correlation: str, data: dict[str, Any]) -> dict:
    return {"eventId": event_id, "eventType": kind, "timestamp": at.isoformat(),
            "correlationId": correlation, "data": data, "metadata": {"version": "1"}}


def profile_config(source: dict[str, Any]) -> dict[str, Any]:
    customer = {"key": "CUSTOMER_ID", "payload": {"CUSTOMER_ID": "str"}}
    return {
        "name": "profiles",
        "source": source,
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "correlation_id": "correlationId", "payload": {"json": "data"},
                    "metadata": {"json": "metadata"}},
        "event_types": {
            "transaction.created": {"key": "CUSTOMER_ID", "payload": {
                "CUSTOMER_ID": "str", "TERMINAL_ID": "int", "TX_AMOUNT": "float"}},
            **{kind: customer for kind in OTHER_TYPES}},
        "projections": [CUSTOMER_PROFILE.model_dump()],
        "runtime": {"partitions": 2, "checkpoint_every": 3},
    }


def profile_pipeline(folder: Path) -> tuple[Pipeline, Path]:
    events = sorted(customer_events(), key=lambda e: e["timestamp"])
    path = folder / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return Pipeline.from_dict(profile_config(
        {"format": "jsonl", "path": [str(path)], "batch_size": 400})), path


_SOURCES = (f"profile-list-{i}" for i in itertools.count())


def list_pipeline(items: list[Any]) -> Pipeline:
    """The profile pipeline reading record batches (and ABORT markers) from memory."""
    name = next(_SOURCES)
    source = AbortingListSource("profiles", {"events": items})
    SOURCE_KINDS.register(name, SourceKind(FileSourceOptions, lambda *_: source))
    return Pipeline.from_dict(profile_config({"format": name, "name": "profiles", "path": ["-"]}))


def record_batches(size: int = 400) -> list[pa.RecordBatch]:
    events = sorted(customer_events(), key=lambda e: e["timestamp"])
    columns = ("eventId", "eventType", "timestamp", "correlationId")
    return [pa.record_batch({**{c: [e[c] for e in chunk] for c in columns},
                             "data": [json.dumps(e["data"]) for e in chunk],
                             "metadata": [json.dumps(e["metadata"]) for e in chunk]})
            for chunk in (events[i:i + size] for i in range(0, len(events), size))]


def online_profile(store: Path) -> pl.DataFrame:
    """Each key's latest row of the table the stream wrote: its current state."""
    rows = pl.read_parquet(store / "customer_profile" / "**" / "*.parquet", hive_partitioning=False)
    return (rows.sort("key", "events").group_by("key", maintain_order=True).last()
            .drop("event_type").sort("key"))


def check_online_equals_offline(store: Path) -> None:
    offline = Projection(CUSTOMER_PROFILE, store).rebuild(snapshot_every=500).sort("key")
    online = online_profile(store)
    assert online.height == 40 and offline["events"].sum() > 3000
    assert offline["open_alerts"].list.len().sum() > 0 and (offline["status"] == "blocked").any()
    assert_frame_equal(online.select(offline.columns), offline)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("profiles")
    pipeline, _ = profile_pipeline(folder)
    summary = pipeline.run(store=folder / "store", runner="local")
    assert summary["dead_lettered"] == 0
    return folder / "store"


def test_online_profile_in_process_equals_the_offline_rebuild(local_run: Path) -> None:
    check_online_equals_offline(local_run)


def test_state_as_of_from_a_snapshot_equals_from_zero(local_run: Path) -> None:
    projection = Projection(CUSTOMER_PROFILE, local_run)
    projection.rebuild(snapshot_every=300)
    assert len(projection.snapshots()) >= 10
    history = projection.history()
    times = history["timestamp"].sort()
    for key, at in [("c3", times[900]), ("c17", times[2000]), ("c0", times[-1]), ("c5", times[10])]:
        from_zero = projection.state(key, as_of=at, use_snapshots=False)
        assert projection.state(key, as_of=at) == from_zero
        mine = history.filter((pl.col("key") == key) & (pl.col("timestamp") <= at))
        if from_zero is not None:
            assert from_zero["events"] == mine.height
            assert from_zero["transactions"] == (mine["event_type"] == "transaction.created").sum()


def test_a_crash_and_resume_gives_the_profile_of_a_fault_free_run(tmp_path: Path) -> None:
    """The fold's state comes back from the checkpoint: the resumed run's table ends in the
    states of a clean run, which equal the offline rebuild."""
    batches = record_batches()
    list_pipeline(batches).run(store=tmp_path / "clean", runner="local")
    crashing = list_pipeline([*batches[:5], ABORT, *batches[5:]])
    with pytest.raises(Exception, match="aborted at row 2000"):
        crashing.run(store=tmp_path / "crashed", runner="local")
    assert crashing.run(store=tmp_path / "crashed", runner="local", resume=True)["resumed"]
    assert_frame_equal(online_profile(tmp_path / "crashed"), online_profile(tmp_path / "clean"))
    check_online_equals_offline(tmp_path / "crashed")


@pytest.mark.ray
@pytest.mark.slow
def test_online_profile_on_ray_equals_the_offline_rebuild(ray_local: object, tmp_path: Path) -> None:
    pipeline, _ = profile_pipeline(tmp_path)
    summary = pipeline.run(store=tmp_path / "store", runner="ray")
    assert summary["ray"] in ("embedded", "existing") and summary["dead_lettered"] == 0
    check_online_equals_offline(tmp_path / "store")
