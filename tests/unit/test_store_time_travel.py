"""The commit log, time travel (``as_of``, ``history``) and compaction of real runs into
real Parquet stores (the in-process runner: the same driver, checkpoints and writers)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions
from pipelines.commit_log import CommitLog, file_stat, modified_at
from pipelines.compaction import Retention, compact_store
from pipelines.errors import StoreError
from pipelines.pipeline import load_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.testing import FakeClock
from tests.support import ROOT

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def write_events(path: Path, prefix: str, count: int, keys: int = 5, first: int = 0) -> None:
    """``count`` events over ``keys`` keys, one a minute, spread over two days."""
    lines = [json.dumps({
        "eventId": f"{prefix}{i}", "eventType": "iot.reading" if i % 3 else "user.login",
        "timestamp": 1_700_000_000 + (first + i) * 3_000, "correlationId": f"key-{i % keys}",
        "data": {"n": i}}) for i in range(count)]
    lines.insert(count // 2, "{not json")  # a dead letter
    path.write_text("\n".join(lines) + "\n")


def spec_of(batch_size: int = 7) -> PipelineSpec:
    return load_pipeline(ROOT / "configs" / "events.yaml", {
        "source": {"path": ["unused.jsonl"], "batch_size": batch_size},
        "runtime": {"partitions": 2, "max_in_flight": 2, "checkpoint_every": 2}})


def run(store: Path, inputs: list[Path], clock: FakeClock, run_id: str | None = None) -> dict:
    spec = spec_of()
    return run_pipeline(spec, lambda r: LocalPartitions(2, store, r, spec), store,
                        [str(p) for p in inputs], progress=False, clock=clock, run_id=run_id)


def ids(frame: pl.LazyFrame | pl.DataFrame) -> list[str]:
    data = frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    return sorted(data["event_id"].to_list())


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, FakeClock, dict, dict, dt.datetime]:
    """Two runs into one store, an hour apart by the injected clock."""
    write_events(tmp_path / "a.jsonl", "a", 60)
    write_events(tmp_path / "b.jsonl", "b", 40, first=60)
    store, clock = tmp_path / "store", FakeClock(START)
    first = run(store, [tmp_path / "a.jsonl"], clock)
    clock.advance(1800)
    between = clock.now()
    clock.advance(1800)
    second = run(store, [tmp_path / "b.jsonl"], clock)
    return store, clock, first, second, between


def test_every_checkpoint_commit_is_recorded(two_runs: tuple) -> None:
    store, _, first, second, _ = two_runs
    records = CommitLog(store).records()
    assert {r.run for r in records} == {first["run"], second["run"]}
    assert all(r.kind == "checkpoint" for r in records)
    assert len(records) == first["checkpoints"] + second["checkpoints"]
    commits = EventStore(store).commits()
    assert commits["run"].to_list() == [r.run for r in records]
    assert commits["committed_at"].is_sorted() and commits["files"].sum() > 0
    recorded = {path for r in records for path in r.files}
    on_disk = {p.relative_to(store).as_posix() for p in store.glob("*/event_type=*/date=*/*.parquet")}
    assert recorded == on_disk


def test_as_of_between_two_runs_returns_exactly_the_first_runs_events(two_runs: tuple) -> None:
    store, _, first, second, between = two_runs
    view = EventStore(store).as_of(between)
    assert ids(view.scan("events")) == sorted(f"a{i}" for i in range(60))
    assert ids(EventStore(store).as_of(run=first["run"]).scan("events")) == ids(view.scan("events"))
    assert len(ids(EventStore(store).as_of(run=second["run"]).scan("events"))) == 100
    with pytest.raises(StoreError, match="no data"):
        EventStore(store).as_of(START - dt.timedelta(days=1)).scan("events")


def test_a_view_is_read_only(two_runs: tuple) -> None:
    store, _, _, _, between = two_runs
    view = EventStore(store).as_of(between)
    with pytest.raises(StoreError, match="read-only"):
        view.write("events", pa.table({"event_type": ["a"]}), "p0", 0)
    with pytest.raises(StoreError, match="read-only"):
        view.truncate("r1", {})
    with pytest.raises(StoreError, match="not both"):
        EventStore(store).as_of(between, run="r1")
    with pytest.raises(StoreError, match="no commit"):
        EventStore(store).as_of(run="rnever")


def test_files_without_a_record_count_as_committed_at_their_mtime(two_runs: tuple) -> None:
    store, _, _, _, _ = two_runs
    for record in (store / "_commits").glob("*.json"):
        record.unlink()
    stats = sorted(file_stat(p) for p in store.glob("events/*/*/*.parquet"))
    newest = max(modified_at(s) for s in stats)
    assert len(ids(EventStore(store).as_of(newest).scan("events"))) == 100
    assert len(ids(EventStore(store).as_of(newest - dt.timedelta(microseconds=1))
                   .scan("events"))) < 100


def test_history_is_one_keys_events_in_event_time_order(two_runs: tuple) -> None:
    store, *_ = two_runs
    history = EventStore(store).history("key-3")
    assert isinstance(history, pl.LazyFrame)
    rows = history.collect()
    expected = sorted([f"a{i}" for i in range(60) if i % 5 == 3]
                      + [f"b{i}" for i in range(40) if i % 5 == 3],
                      key=lambda e: int(e[1:]) + (60 if e[0] == "b" else 0))
    assert rows["event_id"].to_list() == expected
    assert rows["timestamp"].is_sorted()


def table_sorted(store: Path, table: str, stamped: bool = True) -> pl.DataFrame:
    """The table's rows, sorted; ``stamped=False`` leaves out when they were ingested (a
    rerun stamps its own time)."""
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True).collect()
    if not stamped:
        frame = frame.drop("metadata", "ingested_at", strict=False)
    return frame.sort(frame.columns[:4])


def test_compaction_reads_identically_and_a_rerun_doubles_nothing(two_runs: tuple) -> None:
    store, clock, first, _, between = two_runs
    before = {t: table_sorted(store, t) for t in ("events", "deadletter")}
    folders = list(store.glob("events/event_type=*/date=*"))
    assert len(list(store.glob("events/*/*/*.parquet"))) > 2 * len(folders)
    report = compact_store(EventStore(store), clock.now())
    files = list(store.glob("events/*/*/*.parquet"))
    assert len(files) == len(folders) and report.files_after / report.folders <= 1.1
    for table, rows in before.items():
        assert table_sorted(store, table).equals(rows)
    # time travel reads the same after compaction
    assert ids(EventStore(store).as_of(between).scan("events")) == sorted(f"a{i}" for i in range(60))
    # the same run again (same id: it replaces its batches inside the compacted files)
    clock.advance(60)
    again = run(store, [store.parent / "a.jsonl"], clock)
    assert again["run"] == first["run"]
    assert again["duplicates"] == 0 and again["stored"] == 60  # rewritten, not skipped
    assert table_sorted(store, "deadletter").height == 2
    unstamped = table_sorted(store, "events", stamped=False)
    assert unstamped.equals(before["events"].drop("metadata"))
    assert EventStore(store).runs() == {first["run"], _second_run(store, first["run"])}
    compact_store(EventStore(store), clock.now())
    assert table_sorted(store, "events", stamped=False).equals(unstamped)
    assert table_sorted(store, "deadletter", stamped=False).height == 2


def _second_run(store: Path, first: str) -> str:
    return next(r.run for r in CommitLog(store).records() if r.kind == "checkpoint" and r.run != first)


def test_a_listing_during_compaction_sees_every_row_once(two_runs: tuple) -> None:
    store, clock, *_ = two_runs
    expected = ids(EventStore(store).scan("events"))
    originals = sorted(store.glob("events/*/*/*.parquet"))
    # a compaction interrupted after writing merged files, before removing the originals
    import pipelines.compaction as compaction

    removed: list[Path] = []
    real_remove = compaction._remove
    compaction._remove = lambda paths, keep: removed.extend(paths)  # type: ignore[assignment]
    try:
        compact_store(EventStore(store), clock.now())
    finally:
        compaction._remove = real_remove  # type: ignore[assignment]
    assert set(originals) <= set(store.glob("events/*/*/*.parquet"))
    assert ids(EventStore(store).scan("events")) == expected
    compact_store(EventStore(store), clock.now())  # finishes the job: leftovers go
    assert ids(EventStore(store).scan("events")) == expected
    assert len(list(store.glob("events/*/*/*.parquet"))) == len(list(store.glob("events/*/*")))


def test_retention_by_table_and_event_type(two_runs: tuple) -> None:
    store, clock, *_ = two_runs
    events = table_sorted(store, "events")
    cutoff = events["timestamp"].sort()[events.height // 2]
    now = clock.now()
    rules = Retention.parse([f"events/iot.reading={(now - cutoff).total_seconds()}s"])
    report = compact_store(EventStore(store), now, rules)
    after = table_sorted(store, "events")
    kept = events.filter((pl.col("event_type") != "iot.reading") | (pl.col("timestamp") >= cutoff))
    assert after.equals(kept) and report.rows_expired == events.height - kept.height > 0
    with pytest.raises(StoreError, match="TABLE"):
        Retention.parse(["../x=1d"])
