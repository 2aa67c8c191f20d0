"""What several test modules share: paths, the example scripts, offline oracles.

Fixtures stay in ``tests/conftest.py``; plain functions, classes and constants that more
than one test module uses live here, so no test module imports another.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HANDBOOK = SHARED_DATA / "fraud-handbook"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (registered in ``sys.modules`` so its classes pickle)."""
    module_name = f"eventray_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def offline_order_outcomes(events: list[dict[str, Any]], stuck_after_hours: float,
                           large_payment: float) -> dict[str, pl.DataFrame]:
    """The order example's rules computed over the whole history at once, with Polars: the
    oracle its streaming processors must equal.

    Returns:
        ``order.fulfilled``, ``order.stuck`` and ``payment.large`` rows (``key``,
        ``timestamp`` and payload fields) and ``daily_revenue`` totals per (day, region).
    """
    frame = pl.DataFrame({
        "order_id": [e["data"]["order_id"] for e in events],
        "event_type": [e["eventType"] for e in events],
        "timestamp": [e["timestamp"] for e in events],
        "region": [e["metadata"]["region"] for e in events],
        "amount": [e["data"].get("amount") for e in events],
        "method": [e["data"].get("method") for e in events],
    }, schema_overrides={"amount": pl.Float64}).with_columns(
        pl.col("timestamp").str.to_datetime(time_unit="us", time_zone="UTC"))

    def first(event_type: str, column: str) -> pl.Expr:
        return pl.col(column).filter(pl.col("event_type") == event_type).first()

    orders = frame.sort("timestamp").group_by("order_id").agg(
        placed_at=first("order.placed", "timestamp"), region=first("order.placed", "region"),
        amount=first("order.placed", "amount"), paid_at=first("payment.received", "timestamp"),
        shipped_at=first("shipment.dispatched", "timestamp"), last_at=pl.col("timestamp").max())
    deadline = pl.col("paid_at") + pl.duration(microseconds=int(stuck_after_hours * 3.6e9))
    fulfilled = orders.filter(pl.all_horizontal(pl.col("placed_at", "paid_at", "shipped_at").is_not_null()))
    stuck = orders.filter(pl.col("paid_at").is_not_null() & (pl.col("last_at") > deadline)
                          & (pl.col("shipped_at").is_null() | (pl.col("shipped_at") > deadline)))
    payments = frame.filter(pl.col("event_type") == "payment.received")
    return {
        "order.fulfilled": fulfilled.select(
            key="order_id", timestamp="shipped_at", order_id="order_id", region="region", amount="amount",
            hours_to_ship=(pl.col("shipped_at") - pl.col("paid_at")).dt.total_seconds() / 3600.0),
        "order.stuck": stuck.select(key="order_id", timestamp=deadline, order_id="order_id",
                                    region="region", amount="amount", paid_at="paid_at"),
        "payment.large": payments.filter(pl.col("amount") >= large_payment).select(
            key="order_id", timestamp="timestamp", order_id="order_id", amount="amount", method="method"),
        "daily_revenue": payments.group_by(pl.col("timestamp").dt.date().alias("day"), "region").agg(
            payments=pl.len(), revenue=pl.col("amount").sum()),
    }


#: The event types the order example derives.
ORDER_DERIVED_TYPES = ("order.fulfilled", "order.stuck", "payment.large")


def stored_order_outcomes(events: pl.DataFrame, daily_revenue: pl.DataFrame,
                          payloads: dict[str, dict[str, str]]) -> dict[str, pl.DataFrame]:
    """The same shapes as :func:`offline_order_outcomes`, from a store's ``events`` and
    ``daily_revenue`` rows; ``payloads`` are the example's payload fields per event type."""
    found = {event_type: events.filter(pl.col("event_type") == event_type).select(
        "key", "timestamp", *[pl.col("data").struct.field(f) for f in payloads[event_type]])
        for event_type in ORDER_DERIVED_TYPES}
    found["daily_revenue"] = daily_revenue.group_by(
        pl.col("timestamp").dt.date().alias("day"), "region").agg(
        payments=pl.col("payments").sum(), revenue=pl.col("revenue").sum())
    return found


def assert_same_rows(got: pl.DataFrame, expected: pl.DataFrame, float_tolerance: float = 0.0) -> None:
    """Equal as sets of rows (sorted by every column), columns in ``expected``'s order."""
    from polars.testing import assert_frame_equal

    got = got.select(expected.columns)
    assert_frame_equal(got.sort(got.columns), expected.sort(expected.columns), check_dtypes=False,
                       check_exact=float_tolerance == 0.0, abs_tol=float_tolerance or 1e-12)
