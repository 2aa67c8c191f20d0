"""The event store: layout, atomic idempotent writes, pruned scans, safe paths."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.checkpoint import Checkpoint, CheckpointStore
from pipelines.envelope import TIMESTAMP
from pipelines.errors import StoreError
from pipelines.store import (
    EventStore,
    _planned_file_groups,
    file_groups,
    safe_partition_value,
    store_folder,
)


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


# durability


class FakeFsync:
    """Stands in for os.fsync: records which path each call made durable, then does it."""

    def __init__(self, real: object) -> None:
        self.real, self.paths = real, []

    def __call__(self, descriptor: int) -> None:
        self.paths.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        self.real(descriptor)  # type: ignore[operator]


def test_checkpoint_commits_after_data_files_and_their_folders_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFsync(os.fsync)
    monkeypatch.setattr(os, "fsync", fake)
    store = EventStore(tmp_path)
    files = store.write("events", rows(["a.x", "a.x"], [1, 2]), writer="r1-p0", seq=0)
    data_syncs = [p for p in fake.paths if p.suffix == ".tmp" and ".parquet." in p.name]
    assert len(data_syncs) == 2  # each file's data before its rename
    assert {p.parent for p in data_syncs} == {f.parent for f in files}
    checkpoints = CheckpointStore(tmp_path, "r1")
    checkpoints.write_state(1, "p0", b"state")
    checkpoints.commit(Checkpoint(1, {"in": 2}, {0: 1}, deadletter_seq=0))
    order = [str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else str(p)
             for p in fake.paths]
    folders = {"events/event_type=a.x/date=2024-01-01", "events/event_type=a.x/date=2024-01-02",
               "events/event_type=a.x", "events", "."}  # new folders: their parents too
    first_folder = min(order.index(f) for f in folders)
    state = next(i for i, p in enumerate(order) if p.startswith("_checkpoints/r1/.p0-"))
    manifest = next(i for i, p in enumerate(order) if p.startswith("_checkpoints/r1/.manifest-"))
    assert max(order.index(str(p.relative_to(tmp_path))) for p in data_syncs) < first_folder
    assert max(order.index(f) for f in folders) < state < manifest
    assert order[manifest + 1] == "_checkpoints/r1"  # the manifest's name, durably
    assert store.sync() == 0  # nothing left to sync


def test_folders_are_synced_once_per_checkpoint_not_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EventStore(tmp_path)
    store.write("events", rows(["a.x"], [1]), writer="p0", seq=0)
    store.sync()
    fake = FakeFsync(os.fsync)
    monkeypatch.setattr(os, "fsync", fake)
    for seq in range(1, 4):
        store.write("events", rows(["a.x"], [1]), writer="p0", seq=seq)
    assert len(fake.paths) == 3  # three data files, no folder yet
    assert store.sync() == 1
    assert fake.paths[-1] == tmp_path / "events" / "event_type=a.x" / "date=2024-01-01"


def test_stored_ids_reads_only_the_dates_asked(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    events = rows(["a.x", "a.x", "b.y"], [1, 2, 3])
    events = events.append_column("event_id", pa.array(["e1", "e2", "e3"]))
    store.write("events", events, writer="p0", seq=0)
    # A broken file on a day outside the range: read, it would raise.
    far = tmp_path / "events" / "event_type=a.x" / "date=2024-01-09"
    far.mkdir()
    (far / "part-x-000000000000.parquet").write_text("no")
    start, end = dt.datetime(2024, 1, 2, tzinfo=dt.UTC), dt.datetime(2024, 1, 3, 12, tzinfo=dt.UTC)
    probe = pa.array(["e1", "e2", "e3", "e4", None])
    assert store.stored_ids(probe, start, end).tolist() == [False, True, True, False, False]
    before_e3 = dt.datetime(2024, 1, 3, 11, 59, 59, 999_999, tzinfo=dt.UTC)
    assert store.stored_ids(probe, start, before_e3).tolist() == [False, True, False, False, False]
    assert EventStore(tmp_path / "empty").stored_ids(probe, start, end).tolist() == [False] * 5


# ------------------------------------------------------------------------------------------
# How a write splits into files: the Arrow path against the Polars plan
# ------------------------------------------------------------------------------------------

_TYPES = ["a.x", "b.y", "../up", "Upper", "", ".hidden", "a..b", "c_z"]
# microseconds: before 1970, either side of midnight, and the last day whose text is ISO
_TIMES = [-86_400_000_001, -1, 0, 86_399_999_999, 86_400_000_000, 1_717_200_000_000_000,
          253_402_300_799_999_999]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_TYPES), st.sampled_from(_TIMES)), min_size=1, max_size=40),
       st.sampled_from(["us", "ms", "s"]), st.sampled_from([None, "UTC"]), st.booleans())
def test_file_groups_equal_the_polars_plan(pairs: list[tuple[str, int]], unit: str,
                                           tz: str | None, large: bool) -> None:
    """The same groups (folder, date, rows), in order of first appearance, and the same row
    order: types that are no safe folder name share ``_invalid``, days before 1970 floor."""
    scale = {"us": 1, "ms": 1_000, "s": 1_000_000}[unit]
    table = pa.table({
        "event_type": pa.array([t for t, _ in pairs], pa.large_string() if large else pa.string()),
        "timestamp": pa.array([us // scale for _, us in pairs], pa.timestamp(unit, tz)),
    })
    order, groups = file_groups(table, "timestamp")
    planned_order, planned = _planned_file_groups(table, "timestamp")
    assert groups == planned
    assert (order is None) == (planned_order is None)
    if order is not None:
        assert order.tolist() == planned_order.tolist()


def test_file_groups_take_the_plan_for_what_the_fast_path_does_not_cover() -> None:
    """A null type or time, another time zone, a date past 9999: the Polars plan's answer."""
    stamps = pa.array([0, 86_400_000_000], pa.timestamp("us", "UTC"))
    cases = [
        pa.table({"event_type": ["a", None], "timestamp": stamps}),
        pa.table({"event_type": ["a", "a"], "timestamp": pa.array([0, None], pa.timestamp("us"))}),
        pa.table({"event_type": ["a", "a"], "timestamp": stamps.cast(pa.timestamp("us", "Asia/Tokyo"))}),
        pa.table({"event_type": ["a", "a"], "timestamp": pa.array([0, 253_402_300_800_000_000],
                                                                  pa.timestamp("us"))}),
    ]
    for table in cases:
        order, groups = file_groups(table, "timestamp")
        planned_order, planned = _planned_file_groups(table, "timestamp")
        assert groups == planned and (order is None) == (planned_order is None)
    tokyo = file_groups(cases[2], "timestamp")[1]
    assert [date for _, date, _ in tokyo] == ["1970-01-01", "1970-01-02"]  # Tokyo's dates


def test_a_store_folder_that_cannot_be_made_is_a_start_up_error(tmp_path: Path) -> None:
    made = store_folder(tmp_path / "a" / "b")
    assert made.is_dir() and made.is_absolute()
    assert store_folder(made) == made  # there already
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"store '.*file/store': cannot create its folder"):
        store_folder(blocker / "store")
