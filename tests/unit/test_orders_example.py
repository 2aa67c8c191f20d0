"""The order example's processors, in process: online equals offline, and both pass the
processor conformance checks of :mod:`pipelines.testing`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines.testing import check_processor, run_local
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
