"""The order example's processors, in process: online equals offline, and both pass the
processor conformance checks of :mod:`pipelines.testing`."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines import SOURCE_KINDS, Pipeline
from pipelines.kinds import FileSourceOptions, SourceKind
from pipelines.testing import ABORT, AbortingListSource, check_processor, run_local
from tests.support import (
    ORDER_DERIVED_TYPES,
    assert_same_rows,
    load_example,
    offline_order_outcomes,
    stored_order_outcomes,
)

orders = load_example("orders")
JOURNEY_TYPES = ["order.placed", "payment.received", "shipment.dispatched", "order.cancelled"]


@pytest.fixture(scope="module")
def run() -> tuple[list[dict], dict[str, pl.DataFrame]]:
    """800 orders through the pipeline in process, 400 events a batch (state crosses batches)."""
    events = orders.generate_events(800, seed=11)
    pipeline = orders.orders_pipeline(Path("orders.jsonl"), batch_size=400)
    return events, run_local(pipeline, events, tables=("events", "daily_revenue", "deadletter"))


def test_the_stream_is_the_seeds_schema_and_deterministic() -> None:
    events = orders.generate_events(200, seed=5)
    assert events == orders.generate_events(200, seed=5)
    assert events != orders.generate_events(200, seed=6)
    assert set(events[0]) == {"eventId", "eventType", "timestamp", "source", "correlationId",
                              "data", "metadata"}
    assert {e["metadata"]["version"] for e in events} == {"1", "1.0"}
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    assert {e["eventType"] for e in events} == set(JOURNEY_TYPES)


def test_online_equals_offline_in_process(run: tuple[list[dict], dict[str, pl.DataFrame]]) -> None:
    events, out = run
    assert "deadletter" not in out
    assert out["summary"]["events_in"].item() == len(events)
    expected = offline_order_outcomes(events, orders.STUCK_AFTER_HOURS, orders.LARGE_PAYMENT)
    got = stored_order_outcomes(out["events"], out["daily_revenue"], orders.EVENT_TYPES)
    for name in ORDER_DERIVED_TYPES:
        assert expected[name].height > 0, name
        assert_same_rows(got[name], expected[name])
    assert_same_rows(got["daily_revenue"], expected["daily_revenue"], float_tolerance=1e-6)
    assert out["summary"]["derived"].item() == sum(expected[n].height for n in ORDER_DERIVED_TYPES)


def _of_types(events: pl.DataFrame, types: list[str]) -> pa.Table:
    return events.filter(pl.col("event_type").is_in(types)).drop("date", strict=False).to_arrow()


def test_the_order_journey_passes_the_conformance_checks(
    run: tuple[list[dict], dict[str, pl.DataFrame]]
) -> None:
    check_processor(orders.OrderJourney(), _of_types(run[1]["events"], JOURNEY_TYPES))


def test_the_payments_ledger_passes_the_conformance_checks(
    run: tuple[list[dict], dict[str, pl.DataFrame]]
) -> None:
    check_processor(orders.payments_ledger, _of_types(run[1]["events"], ["payment.received"]))


def test_snapshot_is_plain_data_and_restores_the_open_orders(
    run: tuple[list[dict], dict[str, pl.DataFrame]]
) -> None:
    journey = orders.OrderJourney()
    journey.process(_of_types(run[1]["events"], JOURNEY_TYPES).slice(0, 300))
    state = journey.snapshot()
    assert state["order_id"] and all(isinstance(v, int) for v in state["paid_at"] if v is not None)
    fresh = orders.OrderJourney()
    fresh.restore(state)
    assert fresh.open_orders.equals(journey.open_orders)


def test_idle_open_orders_leave_the_state_after_the_retention(
    run: tuple[list[dict], dict[str, pl.DataFrame]]
) -> None:
    events = _of_types(run[1]["events"], JOURNEY_TYPES)
    newest = pl.from_arrow(events)["timestamp"].max()
    kept, short = orders.OrderJourney(), orders.OrderJourney(retention_hours=100)
    kept.process(events)
    short.process(events)
    idle = newest - dt.timedelta(hours=100)
    assert kept.open_orders.filter(pl.col("last_at") < idle).height > 0  # abandoned carts
    assert short.open_orders.equals(kept.open_orders.filter(pl.col("last_at") >= idle))


_SOURCE_NAMES = (f"orders-list-{i}" for i in itertools.count())


def order_records(events: list[dict], size: int) -> list[pa.RecordBatch]:
    """The seed-schema events as columnar batches (``data`` and ``metadata`` as JSON text)."""
    columns = ("eventId", "eventType", "timestamp", "source", "correlationId")
    return [pa.record_batch({
        **{c: [e[c] for e in chunk] for c in columns},
        "data": [json.dumps(e["data"]) for e in chunk],
        "metadata": [json.dumps(e["metadata"]) for e in chunk]})
        for chunk in (events[i:i + size] for i in range(0, len(events), size))]


def list_pipeline(items: list) -> Pipeline:
    """The order pipeline reading ``items`` (batches and ABORT markers) from memory."""
    source, name = AbortingListSource("shop", {"orders": items}), next(_SOURCE_NAMES)
    SOURCE_KINDS.register(name, SourceKind(FileSourceOptions, lambda *_: source))
    config = orders.orders_config(Path("-"))
    config["source"] = {"format": name, "name": "shop", "path": ["-"]}
    config["runtime"] = {"partitions": 2, "checkpoint_every": 2}
    pipeline = Pipeline.from_dict(config)
    pipeline.register_processor(JOURNEY_TYPES, orders.OrderJourney(), name="order-journey")
    return pipeline.register_processor("payment.received", orders.payments_ledger, name="payments-ledger")


def derived_in(store: Path) -> pl.DataFrame:
    events = pl.read_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    return events.filter(pl.col("source").str.starts_with("processor:")).drop(
        "metadata").sort("event_id")


def test_a_crash_and_resume_stores_what_a_fault_free_run_stores(tmp_path: Path) -> None:
    """The journey's open orders come back from the checkpoint: orders paid before the crash
    and shipped after it are fulfilled, stuck ones judged once."""
    batches = order_records(orders.generate_events(600, seed=3), size=200)
    clean = list_pipeline(batches).run(store=tmp_path / "clean", runner="local")
    crashing = list_pipeline([*batches[:5], ABORT, *batches[5:]])
    with pytest.raises(Exception, match="aborted at row 1000"):
        crashing.run(store=tmp_path / "crashed", runner="local")
    resumed = crashing.run(store=tmp_path / "crashed", runner="local", resume=True)
    assert resumed["resumed"] and resumed["derived"] == clean["derived"] > 500
    assert derived_in(tmp_path / "crashed").equals(derived_in(tmp_path / "clean"))
