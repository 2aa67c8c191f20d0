"""The event store: layout, atomic idempotent writes, pruned scans, safe paths."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines.envelope import TIMESTAMP
from pipelines.errors import StoreError
from pipelines.store import EventStore, safe_partition_value


def rows(types: list[str], days: list[int], keys: list[str] | None = None) -> pa.Table:
    stamps = [dt.datetime(2024, 1, d, 12, tzinfo=dt.UTC) for d in days]
    return pa.table({
        "event_type": types,
        "timestamp": pa.array(stamps, TIMESTAMP),
        "key": keys or [f"k{i}" for i in range(len(types))],
        "n": list(range(len(types))),
    })


def test_layout_is_table_event_type_date(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    files = store.write("events", rows(["a.x", "b.y", "a.x"], [1, 1, 2]), writer="p0", seq=7)
    relative = sorted(str(f.relative_to(tmp_path)) for f in files)
    assert relative == [
        "events/event_type=a.x/date=2024-01-01/part-p0-000000000007.parquet",
        "events/event_type=a.x/date=2024-01-02/part-p0-000000000007.parquet",
        "events/event_type=b.y/date=2024-01-01/part-p0-000000000007.parquet",
    ]
    whole = pl.scan_parquet(tmp_path / "events" / "**" / "*.parquet", hive_partitioning=True)
    assert whole.select(pl.len()).collect().item() == 3


def test_rewriting_a_batch_replaces_it(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    for _ in range(3):
        store.write("events", rows(["a.x"] * 4, [1] * 4), writer="p1", seq=0)
    store.write("events", rows(["a.x"] * 2, [1] * 2), writer="p1", seq=1)
    assert store.scan("events").select(pl.len()).collect().item() == 6
    assert not list(tmp_path.rglob("*.tmp"))


def test_scan_prunes_by_type_time_and_key(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    store.write("events", rows(["a.x", "a.x", "b.y", "a.x"], [1, 2, 2, 3], ["k1", "k2", "k1", "k1"]),
                writer="p0", seq=0)
    start = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    end = dt.datetime(2024, 1, 3, tzinfo=dt.UTC)
    got = store.scan("events", event_types=["a.x"], start=start, end=end).collect()
    assert got["n"].to_list() == [1]
    got = store.scan("events", keys=["k1"]).sort("n").collect()
    assert got["n"].to_list() == [0, 2, 3]
    with pytest.raises(StoreError, match="timezone-aware"):
        store.scan("events", start=dt.datetime(2024, 1, 1))


def test_empty_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="has no data"):
        EventStore(tmp_path).scan("alerts")


@pytest.mark.parametrize("value", ["../../x", "..", ".hidden", "/etc/passwd", "a/b", "A.B", "", None,
                                   "a\\b", "x" * 200])
def test_unsafe_values_never_become_paths(value: str | None, tmp_path: Path) -> None:
    assert safe_partition_value(value) == "_invalid"


def test_unsafe_event_types_land_in_invalid(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "s")
    files = store.write("deadletter", pa.table({
        "event_type": ["../../x", "ok.type"],
        "ingested_at": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * 2, TIMESTAMP),
    }), writer="ingest", seq=0)
    assert {f.parent.parent.name for f in files} == {"event_type=_invalid", "event_type=ok.type"}
    assert all(f.resolve().is_relative_to((tmp_path / "s").resolve()) for f in files)


@pytest.mark.parametrize("bad", [("../t", "p0"), ("events", "../p0"), ("events", "a/b")])
def test_table_and_writer_names_are_checked(bad: tuple[str, str], tmp_path: Path) -> None:
    table, writer = bad
    with pytest.raises(StoreError):
        EventStore(tmp_path).write(table, rows(["a.x"], [1]), writer=writer, seq=0)
