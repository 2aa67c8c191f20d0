"""Property tests of ``metadata.version``: what producers send as versions is stored as given.

Events are shaped like the seed's own example (``tests.seed_events``). Whole runs go through
``configs/events.yaml`` in process (``cluster.driver.run_pipeline`` with ``LocalPartitions``,
no Ray); the same property runs through the CLI on Ray in
``tests/integration/test_cli_runs.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions
from pipelines.normalise import Normaliser
from pipelines.pipeline import load_pipeline
from pipelines.sources import RawBatch
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.testing import FakeClock
from tests.seed_events import (
    EVENT_TYPES,
    MOMENTS,
    NON_VERSIONS,
    PAYLOADS,
    REGIONS,
    jsonl,
    seed_event,
    seed_events,
    stored_version,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EVENTS_SPEC = load_pipeline(CONFIGS / "events.yaml")
RUNS = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_in_process(root: Path, content: bytes, batch_size: int) -> dict[str, Any]:
    spec = PipelineSpec.model_validate(EVENTS_SPEC.model_dump(by_alias=True) | {
        "source": EVENTS_SPEC.source.model_dump() | {"batch_size": batch_size}})
    source = root / "in" / "events.jsonl"
    source.parent.mkdir()
    source.write_bytes(content)
    store = root / "store"
    return run_pipeline(spec, lambda prefix: LocalPartitions(2, store, prefix), store,
                        inputs=[str(source)], progress=False)


@RUNS
@given(st.lists(seed_events(), min_size=1, max_size=25, unique_by=lambda e: e["eventId"]),
       st.lists(seed_events(NON_VERSIONS), max_size=10, unique_by=lambda e: e["eventId"]),
       st.randoms(use_true_random=False), st.integers(1, 16))
def test_seed_events_with_versions_are_stored_and_non_versions_dead_lettered(
        valid: list[dict[str, Any]], bad: list[dict[str, Any]], random: Any,
        batch_size: int) -> None:
    events = valid + bad
    random.shuffle(events)
    with tempfile.TemporaryDirectory(prefix="eventray-versions-") as tmp:
        summary = run_in_process(Path(tmp), jsonl(events), batch_size)
        assert (summary["stored"], summary["dead_lettered"]) == (len(valid), len(bad))
        assert summary["reasons"] == ({"bad_version": len(bad)} if bad else {})
        store = EventStore(Path(tmp) / "store")
        stored = store.scan("events").select(
            "event_id", version=pl.col("metadata").struct.field("version")).collect()
        assert dict(stored.iter_rows()) == {
            e["eventId"]: stored_version(e["metadata"]["version"]) for e in valid}
        if bad:
            dead = store.scan("deadletter").collect()
            assert sorted(dead["event_id"]) == sorted(e["eventId"] for e in bad)
            assert dead["message"].str.contains("metadata.version").all()


# ------------------------------------------------------------------------------------------
# several majors: older ones are upcast, the current one is kept as given
# ------------------------------------------------------------------------------------------

CURRENT = 4
MULTI_MAJOR = PipelineSpec.model_validate(EVENTS_SPEC.model_dump(by_alias=True) | {
    "default_event_type": {"key": "correlation_id", "version": CURRENT}})
MAJOR_VERSIONS = st.integers(1, CURRENT) | st.from_regex(r"[1-4](\.[0-9]{1,4}){0,3}",
                                                         fullmatch=True)


def upcaster(major: int) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """An upcaster of untyped payloads from ``major``: marks its step in the payload."""
    mark, text = f'"_from_{major}":1', pl.col("json")
    return lambda df: df.with_columns(json=pl.when(text == "{}").then(pl.lit(f"{{{mark}}}"))
                                      .otherwise(text.str.replace(r"^\{", f"{{{mark},")))


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(MAJOR_VERSIONS, EVENT_TYPES, MOMENTS, PAYLOADS, REGIONS),
                min_size=1, max_size=20))
def test_every_major_up_to_the_current_one_is_accepted(
        drawn: list[tuple[Any, str, Any, dict[str, Any], str]]) -> None:
    normaliser = Normaliser(MULTI_MAJOR, FakeClock(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    for event_type in {event_type for _, event_type, *_ in drawn}:
        for major in range(1, CURRENT):
            normaliser.registry.register_upcaster(event_type, major)(upcaster(major))
    events = [seed_event(f"e{i}", version, event_type=event_type, moment=moment, data=data,
                         region=region)
              for i, (version, event_type, moment, data, region) in enumerate(drawn)]
    lines = [json.dumps(e).encode() for e in events]
    out = normaliser.normalise(RawBatch("events", "p", np.arange(len(lines)),
                                        pa.record_batch({"line": pa.array(lines, pa.binary())})))
    assert out.deadletters.num_rows == 0, out.deadletters.column("message").to_pylist()
    for event, row in zip(events, out.events.to_pylist(), strict=True):
        given_text = stored_version(event["metadata"]["version"])
        major = int(given_text.split(".")[0])
        assert row["metadata"]["version"] == (given_text if major == CURRENT else str(CURRENT))
        steps = {k for k in json.loads(row["data"]["json"]) if k.startswith("_from_")}
        assert steps == {f"_from_{m}" for m in range(major, CURRENT)}
        assert json.loads(row["metadata"]["tags"])["version"] == event["metadata"]["version"]


