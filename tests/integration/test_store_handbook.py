"""The store as a system of record on the fraud handbook's five months (one run on a real
local Ray, through the command line: the session's ``handbook_run``, which the pipeline's
tests read too): a replay gives the same scores row for row, and compaction leaves about one
file per folder, reads identically, and a rerun into the compacted store doubles nothing
(both on a copy of the run's store). Skipped without the shared data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipelines.store import EventStore
from tests.integration.test_store_replay import assert_same_rows
from tests.support import HandbookRun, eventray, summary_of

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def read(store: Path, table: str, stamped: bool = True) -> pl.DataFrame | None:
    """A table's rows sorted (``None``: no files); ``stamped=False`` drops the ingestion
    time a rerun stamps anew."""
    if not list(store.glob(f"{table}/*/*/*.parquet")):
        return None
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True).collect()
    if not stamped:
        frame = frame.drop("metadata", "ingested_at", strict=False)
    # A total order, whatever order the files give the rows in. The flat columns (the event id
    # among them) tell the handbook's rows apart; sorting by the nested ones too (payload,
    # metadata) took ~20 s per read of the 2.9 million events and orders nothing more.
    flat = [name for name, dtype in frame.schema.items() if not dtype.is_nested()]
    return frame.sort(flat if frame.select(flat).is_unique().all() else frame.columns)


def test_replay_gives_the_same_scores_row_for_row(handbook_run: HandbookRun, tmp_path: Path) -> None:
    config, store, summary = handbook_run.config, handbook_run.store, handbook_run.summary
    replayed = summary_of(eventray("replay", str(config), "--store", str(store), "--into",
                                   str(tmp_path / "replayed"), "--no-progress", timeout=1800))
    assert replayed["events_in"] == summary["events_in"] and replayed["derived"] == summary["derived"]
    original, again = read(store, "scores"), read(tmp_path / "replayed", "scores")
    assert original is not None and again is not None and original.height == summary["events_in"]
    assert_same_rows(original, again)


def test_compaction_then_a_rerun(handbook_run: HandbookRun, handbook_dir: Path, tmp_path: Path) -> None:
    config, summary = handbook_run.config, handbook_run.summary
    store = handbook_run.copy_store(tmp_path / "store")
    tables = ("events", "scores", "deadletter")
    before = {table: read(store, table) for table in tables}
    compacted = summary_of(eventray("compact", "--store", str(store), timeout=1800))
    folders = [d for d in store.glob("*/event_type=*/date=*") if d.is_dir()]
    files = list(store.glob("*/event_type=*/date=*/*.parquet"))
    assert compacted["files_before"] > 1.5 * len(folders)  # two partitions: about two a folder
    assert len(files) / len(folders) <= 1.1 and compacted["files_per_folder"] <= 1.1
    for table in tables:
        after = read(store, table)
        assert (after is None and before[table] is None) or after.equals(before[table]), table
    # time travel reads the same after compaction
    assert EventStore(store).as_of(run=summary["run"]).scan("scores").select(pl.len()).collect().item() \
        == summary["events_in"]
    rerun = summary_of(eventray("run", str(config), "--input", str(handbook_dir), "--store", str(store),
                                "--no-progress", timeout=1800))
    assert rerun["run"] == summary["run"] and rerun["duplicates"] == 0
    for table in tables:
        expected = before[table]
        again = read(store, table, stamped=False)
        assert (again is None and expected is None) or again.equals(
            expected.drop("metadata", "ingested_at", strict=False)), table
