"""``python examples/orders.py`` on an embedded Ray: the derived events and the revenue
table it stores equal the same rules computed offline with Polars over the generated stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.support import (
    ORDER_DERIVED_TYPES,
    ROOT,
    assert_same_rows,
    load_example,
    offline_order_outcomes,
    stored_order_outcomes,
)

orders = load_example("orders")


def run_example(store: Path, cwd: Path) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "orders.py"), "--store", str(store)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith('{"pipeline"'))
    return json.loads(summary), result.stdout


@pytest.mark.slow
def test_the_orders_example_on_ray_equals_the_offline_rules(tmp_path: Path) -> None:
    summary, printed = run_example(tmp_path / "store", cwd=tmp_path)
    events = orders.generate_events()  # the script's defaults: 10,000 orders, seed 7
    assert summary["ray"] == "embedded" and summary["events_in"] == len(events)
    assert summary["dead_lettered"] == 0 and summary["partitions"] == 2
    expected = offline_order_outcomes(events, orders.STUCK_AFTER_HOURS, orders.LARGE_PAYMENT)
    stored = pl.read_parquet(tmp_path / "store" / "events" / "**" / "*.parquet", hive_partitioning=True)
    revenue = pl.read_parquet(tmp_path / "store" / "daily_revenue" / "**" / "*.parquet",
                              hive_partitioning=True)
    got = stored_order_outcomes(stored, revenue, orders.EVENT_TYPES)
    for name in ORDER_DERIVED_TYPES:
        assert expected[name].height > 100, name
        assert_same_rows(got[name], expected[name])
    assert_same_rows(got["daily_revenue"], expected["daily_revenue"], float_tolerance=1e-6)
    assert summary["derived"] == sum(expected[n].height for n in ORDER_DERIVED_TYPES)
    assert summary["stored"] == summary["events_in"] + summary["derived"]
    # the derived events carry deterministic ids and their processor as source
    derived = stored.filter(pl.col("event_type").is_in(ORDER_DERIVED_TYPES))
    assert derived["event_id"].n_unique() == derived.height
    assert set(derived["source"]) == {"processor:order-journey", "processor:payments-ledger"}
    assert "order.stuck" in printed and "ap-south" in printed  # the Polars queries ran
