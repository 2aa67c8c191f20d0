"""``pipelines.testing.check_processor`` on small processors: what it accepts and rejects."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from pipelines import Pipeline
from pipelines.testing import check_processor, run_local


@pytest.fixture(scope="module")
def stored() -> pl.DataFrame:
    """Twelve events of three keys, read back from a store through Polars (large strings)."""
    pipeline = Pipeline.from_dict({
        "name": "t", "source": {"format": "jsonl", "path": ["-"]},
        "mapping": {"event_type": "type", "timestamp": "at", "correlation_id": "k",
                    "payload": {"json": "data"}}})
    events = [{"type": "tick.seen", "at": f"2024-01-01T00:00:{i:02d}Z", "k": f"k{i % 3}", "data": {"n": i}}
              for i in range(12)]
    return run_local(pipeline, events)["events"]


def grouped_by_key(events: pa.Table) -> list[dict]:
    """One event per input row, the batch's output grouped by key (as a ``group_by`` gives
    it): each key's events stay in order, the order across keys follows the batches."""
    rows = pl.from_arrow(events).select("key", "timestamp").to_dicts()
    return [{"event_type": "tick.echo", "timestamp": r["timestamp"], "key": r["key"],
             "data": {"key": r["key"]}} for r in sorted(rows, key=lambda r: r["key"])]


def one_per_batch(events: pa.Table) -> list[dict]:
    """One event per batch, counting its rows: what a split changes."""
    return [{"event_type": "tick.count", "timestamp": "2024-01-01T00:00:00Z", "key": "all",
             "data": {"rows": events.num_rows}}]


def echo(events: pa.Table) -> list[dict]:
    """One derived event per input row, in input order."""
    return [{"event_type": "tick.echo", "timestamp": ts, "key": key, "data": {"n": 1}}
            for key, ts in zip(events.column("key").to_pylist(), events.column("timestamp").to_pylist(),
                               strict=True)]


def test_rows_read_back_through_polars_are_accepted(stored: pl.DataFrame) -> None:
    table = stored.to_arrow()
    assert not pa.types.is_string(table.schema.field("key").type)  # large or view strings
    check_processor(echo, table)


def test_the_order_across_keys_may_follow_the_batches(stored: pl.DataFrame) -> None:
    check_processor(grouped_by_key, stored.to_arrow())


def test_a_processor_whose_output_depends_on_the_split_is_rejected(stored: pl.DataFrame) -> None:
    with pytest.raises(AssertionError, match="split"):
        check_processor(one_per_batch, stored.to_arrow())
