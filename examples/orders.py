"""A supply-chain flow on eventray's Python API: orders, payments and shipments.

Run it with ``python examples/orders.py`` (an embedded local Ray, 15-20 s on two cores).
It writes a realistic stream of order events in the seed's JSON Lines schema to a temporary
folder, builds a pipeline in Python, registers two processors and runs it:

- :class:`OrderJourney` (stateful, one instance per partition) follows every order from
  ``order.placed`` through ``payment.received`` to ``shipment.dispatched`` and derives
  ``order.fulfilled`` when the shipment comes, and ``order.stuck`` when an order was paid but
  not shipped within 48 hours of event time. "Stuck" is judged when the order's next event
  arrives (a late shipment, a cancellation): the processor never reads a clock.
- :func:`payments_ledger` writes each batch's revenue per day and region to a store table of
  its own, ``daily_revenue``, through :class:`~pipelines.StepOutput`, and derives
  ``payment.large`` for payments of 500 or more.

Every event type is keyed by ``order_id``, so one order's events reach one partition, in
order. The run prints its JSON summary line, then a few Polars queries over the store.

Example:
    python examples/orders.py --store store/orders --orders 10000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines import Pipeline, StepOutput

#: Paid orders not shipped within this many hours (event time) are stuck.
STUCK_AFTER_HOURS = 48.0
#: Payments of at least this amount derive a ``payment.large`` event.
LARGE_PAYMENT = 500.0
#: Open orders with no event for this long (event time) leave the processor's state.
RETENTION_HOURS = 30 * 24.0

START = np.datetime64("2025-03-03T00:00:00", "s")
REGIONS = np.array(["eu-west", "us-east", "ap-south"])
METHODS = np.array(["card", "paypal", "bank-transfer"])
CARRIERS = np.array(["dhl", "ups", "fedex"])
WAREHOUSES = np.array(["ams-1", "nyc-2", "bom-1"])  # one per region, in REGIONS' order
_IDS = uuid.UUID("6f1c2a4e-0b7d-4c55-9a51-0e7a3d2b9c10")
HOUR = 3600

# --- the input: a deterministic stream of order events ------------------------------------


def _order_fates(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per order: when it is placed, paid, shipped or cancelled (seconds from START, -1: never)."""
    placed = np.sort(rng.integers(0, 14 * 86400, n))
    paid = np.where(rng.random(n) < 0.92, placed + 30 + rng.exponential(20 * 60, n).astype(int), -1)
    # A paid order ships on time, ships late, waits and is cancelled, or hears nothing more.
    fate = rng.choice(4, n, p=[0.84, 0.08, 0.06, 0.02])
    on_time = rng.integers(2 * HOUR, 46 * HOUR, n)
    late = rng.integers(50 * HOUR, 120 * HOUR, n)
    shipped = np.where((paid >= 0) & (fate == 0), paid + on_time,
                       np.where((paid >= 0) & (fate == 1), paid + late, -1))
    cancel_paid = np.where((paid >= 0) & (fate == 2), paid + rng.integers(60 * HOUR, 160 * HOUR, n), -1)
    # Half of the unpaid orders are cancelled by the shop within a day.
    cancel_unpaid = np.where((paid < 0) & (rng.random(n) < 0.5),
                             placed + rng.integers(HOUR, 24 * HOUR, n), -1)
    return {"placed": placed, "paid": paid, "shipped": shipped,
            "cancelled": np.maximum(cancel_paid, cancel_unpaid)}


def generate_events(n_orders: int = 10_000, seed: int = 7) -> list[dict[str, Any]]:
    """A small order stream in the seed's JSON Lines schema, sorted by event time.

    About 2.9 events per order: ``order.placed``, ``payment.received``,
    ``shipment.dispatched`` and ``order.cancelled``. The same seed gives the same events,
    ids included.

    Args:
        n_orders: orders placed over two weeks from 2025-03-03.
        seed: the generator's seed.
    """
    rng = np.random.default_rng(seed)
    fates = _order_fates(rng, n_orders)
    region = rng.choice(3, n_orders, p=[0.45, 0.35, 0.2])
    amount = np.round(rng.lognormal(4.2, 0.9, n_orders), 2)
    items = rng.integers(1, 6, n_orders)
    method = METHODS[rng.choice(3, n_orders, p=[0.7, 0.2, 0.1])]
    carrier = CARRIERS[rng.integers(0, 3, n_orders)]
    reason = np.where(fates["paid"] >= 0, "not-shipped", "payment-failed")
    events = []
    for i in range(n_orders):
        order_id = f"o{i:06d}"
        payloads = {
            "placed": ("order.placed", "shop", {"order_id": order_id, "customer_id": f"c{i * 7 % 3001:04d}",
                                                "amount": float(amount[i]), "items": int(items[i])}),
            "paid": ("payment.received", "payments", {"order_id": order_id, "amount": float(amount[i]),
                                                      "method": str(method[i])}),
            "shipped": ("shipment.dispatched", "warehouse", {"order_id": order_id, "carrier": str(carrier[i]),
                                                             "warehouse": str(WAREHOUSES[region[i]])}),
            "cancelled": ("order.cancelled", "shop", {"order_id": order_id, "reason": str(reason[i])}),
        }
        for stage, (event_type, source, data) in payloads.items():
            at = int(fates[stage][i])
            if at < 0:
                continue
            events.append({
                "eventId": str(uuid.uuid5(_IDS, f"{order_id}/{event_type}")),
                "eventType": event_type,
                "timestamp": f"{START + np.timedelta64(at, 's')}Z",
                "source": source,
                "correlationId": order_id,
                "data": data,
                "metadata": {"version": "1.0" if source == "shop" else "1",
                             "region": str(REGIONS[region[i]])},
            })
    return sorted(events, key=lambda e: (e["timestamp"], e["correlationId"]))


def write_events(events: list[dict[str, Any]], folder: Path) -> Path:
    """The events as one JSON Lines file in ``folder``."""
    path = folder / "orders.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


# --- processor (a): the per-order journey, stateful -----------------------------------------

_UTC_US = pl.Datetime("us", "UTC")
_OPEN_ORDERS = {"order_id": pl.String, "region": pl.String, "amount": pl.Float64,
                "placed_at": _UTC_US, "paid_at": _UTC_US, "last_at": _UTC_US, "stuck": pl.Boolean}
_TIMES = ("placed_at", "paid_at", "last_at")


class OrderJourney:
    """Joins each order's placement, payment and shipment; derives fulfilled and stuck orders.

    State is one row per open order, kept as a Polars frame so a batch is one join, not a
    loop over events. An order leaves the state when it ships or is cancelled, or when it has
    had no event for ``retention_hours`` of the partition's event time (an abandoned cart;
    an event after that starts the order afresh), so memory does not grow with every order
    ever seen.

    Args:
        stuck_after_hours: a paid order not shipped this long after its payment is stuck.
        retention_hours: how long an idle open order is kept.
    """

    def __init__(self, stuck_after_hours: float = STUCK_AFTER_HOURS,
                 retention_hours: float = RETENTION_HOURS) -> None:
        self.stuck_after_hours = stuck_after_hours
        self.retention_hours = retention_hours
        self.open_orders = pl.DataFrame(schema=_OPEN_ORDERS)

    def process(self, events: pa.Table) -> pa.Table | None:
        frame = pl.from_arrow(events)
        assert isinstance(frame, pl.DataFrame)
        batch = _order_progress(frame)
        orders = batch.join(self.open_orders, on="order_id", how="left").with_columns(
            region=pl.coalesce("region", "b_region"), amount=pl.coalesce("amount", "b_amount"),
            placed_at=pl.coalesce("placed_at", "b_placed_at"), paid_at=pl.coalesce("paid_at", "b_paid_at"),
            last_at=pl.col("b_last_at"), stuck=pl.col("stuck").fill_null(False))
        deadline = pl.col("paid_at") + _hours(self.stuck_after_hours)
        orders = orders.with_columns(
            newly_stuck=(~pl.col("stuck") & (pl.col("last_at") > deadline) & (
                pl.col("shipped_at").is_null() | (pl.col("shipped_at") > deadline))).fill_null(False),
            fulfilled=pl.col("shipped_at").is_not_null() & pl.col("paid_at").is_not_null()
            & pl.col("placed_at").is_not_null(),
            closed=pl.col("shipped_at").is_not_null() | pl.col("cancelled_at").is_not_null(),
            deadline=deadline)
        still_open = orders.filter(~pl.col("closed")).select(
            *[c for c in _OPEN_ORDERS if c != "stuck"], stuck=pl.col("stuck") | pl.col("newly_stuck"))
        self.open_orders = pl.concat([
            self.open_orders.join(batch, on="order_id", how="anti"), still_open]).filter(
            pl.col("last_at") >= pl.lit(frame["timestamp"].max()) - _hours(self.retention_hours))
        derived = _journey_events(orders)
        return derived.to_arrow() if derived.height else None

    def snapshot(self) -> dict[str, list[Any]]:
        # Plain JSON data: datetimes as epoch microseconds.
        return self.open_orders.with_columns(pl.col(_TIMES).dt.epoch("us")).to_dict(as_series=False)

    def restore(self, state: dict[str, list[Any]]) -> None:
        frame = pl.DataFrame(state, schema={**_OPEN_ORDERS, **dict.fromkeys(_TIMES, pl.Int64)})
        self.open_orders = frame.with_columns(pl.col(_TIMES).cast(_UTC_US))


def _hours(hours: float) -> pl.Expr:
    return pl.duration(microseconds=round(hours * 3_600_000_000))


def _order_progress(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per order in the batch: what the batch says about it (``b_*``: first seen)."""
    def first(event_type: str, column: str | pl.Expr) -> pl.Expr:
        expr = pl.col(column) if isinstance(column, str) else column
        return expr.filter(pl.col("event_type") == event_type).first()

    amount = pl.col("data").struct.field("amount")
    region = pl.col("metadata").struct.field("region")
    return frame.group_by(pl.col("key").alias("order_id"), maintain_order=True).agg(
        b_region=first("order.placed", region), b_amount=first("order.placed", amount),
        b_placed_at=first("order.placed", "timestamp"), b_paid_at=first("payment.received", "timestamp"),
        shipped_at=first("shipment.dispatched", "timestamp"),
        cancelled_at=first("order.cancelled", "timestamp"), b_last_at=pl.col("timestamp").max())


def _journey_events(orders: pl.DataFrame) -> pl.DataFrame:
    """``order.stuck`` (at its deadline) and ``order.fulfilled`` (at its shipment) events."""
    stuck = orders.filter("newly_stuck").select(
        event_type=pl.lit("order.stuck"), timestamp="deadline", key="order_id",
        data=pl.struct("order_id", "region", "amount", "paid_at"))
    fulfilled = orders.filter("fulfilled").select(
        event_type=pl.lit("order.fulfilled"), timestamp="shipped_at", key="order_id",
        data=pl.struct("order_id", "region", "amount", hours_to_ship=(
            pl.col("shipped_at") - pl.col("paid_at")).dt.total_seconds() / 3600.0))
    # Stuck comes before a late shipment's fulfilment: per order, in event time.
    return pl.concat([stuck, fulfilled], how="diagonal_relaxed").sort("timestamp", maintain_order=True)


# --- processor (b): revenue per day and region, and large payments --------------------------


def payments_ledger(events: pa.Table) -> StepOutput:
    """Revenue per (day, region) of this batch's payments, as rows of the ``daily_revenue``
    table (sum them per day and region for the totals), and ``payment.large`` events."""
    frame = pl.from_arrow(events)
    assert isinstance(frame, pl.DataFrame)
    payments = frame.select(
        "timestamp", "key", "correlation_id", region=pl.col("metadata").struct.field("region"),
        order_id=pl.col("data").struct.field("order_id"), amount=pl.col("data").struct.field("amount"),
        method=pl.col("data").struct.field("method"))
    revenue = payments.group_by(pl.col("timestamp").dt.truncate("1d").alias("day"), "region",
                                maintain_order=True).agg(payments=pl.len(), revenue=pl.col("amount").sum())
    revenue = revenue.select(event_type=pl.lit("payment.received"), timestamp="day", region="region",
                             payments="payments", revenue="revenue")
    large = payments.filter(pl.col("amount") >= LARGE_PAYMENT).select(
        event_type=pl.lit("payment.large"), timestamp="timestamp", key="key",
        correlation_id="correlation_id", data=pl.struct("order_id", "amount", "method"))
    return StepOutput(tables={"daily_revenue": revenue.to_arrow()},
                      derived=large.to_arrow() if large.height else None)


# --- the pipeline --------------------------------------------------------------------------

EVENT_TYPES = {
    "order.placed": {"order_id": "str", "customer_id": "str", "amount": "float", "items": "int"},
    "payment.received": {"order_id": "str", "amount": "float", "method": "str"},
    "shipment.dispatched": {"order_id": "str", "carrier": "str", "warehouse": "str"},
    "order.cancelled": {"order_id": "str", "reason": "str"},
    "order.fulfilled": {"order_id": "str", "region": "str", "amount": "float", "hours_to_ship": "float"},
    "order.stuck": {"order_id": "str", "region": "str", "amount": "float", "paid_at": "datetime"},
    "payment.large": {"order_id": "str", "amount": "float", "method": "str"},
}


def orders_config(events_file: Path, partitions: int = 2, batch_size: int = 5000) -> dict[str, Any]:
    """The pipeline's sections: the seed's JSON Lines mapping, typed payloads keyed by
    ``order_id``."""
    return {
        "name": "orders",
        "source": {"format": "jsonl", "name": "shop", "path": [str(events_file)], "batch_size": batch_size},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "source": "source", "correlation_id": "correlationId",
                    "payload": {"json": "data"}, "metadata": {"json": "metadata"}},
        "event_types": {name: {"key": "order_id", "payload": payload}
                        for name, payload in EVENT_TYPES.items()},
        "runtime": {"partitions": partitions, "checkpoint_every": 4},
    }


def orders_pipeline(events_file: Path, partitions: int = 2, batch_size: int = 5000) -> Pipeline:
    """The pipeline with its two processors registered."""
    pipeline = Pipeline.from_dict(orders_config(events_file, partitions, batch_size))
    pipeline.register_processor(["order.placed", "payment.received", "shipment.dispatched",
                                 "order.cancelled"], OrderJourney(), name="order-journey")
    pipeline.register_processor("payment.received", payments_ledger, name="payments-ledger")
    return pipeline


def show(store: Path) -> None:
    """A few Polars queries over the store the run wrote."""
    events = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    print(events.group_by("event_type").agg(pl.len()).sort("event_type").collect())
    stuck = events.filter(pl.col("event_type") == "order.stuck").select(
        "timestamp", pl.col("data").struct.field("order_id", "region", "amount", "paid_at"))
    print(stuck.sort("timestamp").head(5).collect())
    revenue = pl.scan_parquet(store / "daily_revenue" / "**" / "*.parquet", hive_partitioning=True)
    print(revenue.group_by("region").agg(pl.col("payments", "revenue").sum()).sort("region").collect())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("store/orders"), help="the event store's folder")
    parser.add_argument("--orders", type=int, default=10_000, help="orders to generate (~2.9 events each)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runner", choices=["ray", "local"], default="ray")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eventray-orders-") as scratch:
        events_file = write_events(generate_events(args.orders, args.seed), Path(scratch))
        summary = orders_pipeline(events_file).run(store=args.store, runner=args.runner)
    print(json.dumps(summary, default=str), flush=True)
    show(args.store)
    return summary


if __name__ == "__main__":
    main()
