"""The store as a system of record on the fraud handbook's five months (one run on a real
local Ray, through the command line): a replay gives the same scores row for row, and
compaction leaves about one file per folder, reads identically, and a rerun into the
compacted store doubles nothing. Skipped without the shared data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipelines.store import EventStore
from tests.integration.test_store_replay import assert_same_rows
from tests.support import eventray, summary_of, unscored_fraud_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def read(store: Path, table: str, stamped: bool = True) -> pl.DataFrame | None:
    """A table's rows sorted (``None``: no files); ``stamped=False`` drops the ingestion
    time a rerun stamps anew."""
    if not list(store.glob(f"{table}/*/*/*.parquet")):
        return None
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True).collect()
    if not stamped:
        frame = frame.drop("metadata", "ingested_at", strict=False)
    return frame.sort(frame.columns)


@pytest.fixture(scope="module")
def handbook_store(tmp_path_factory: pytest.TempPathFactory, handbook_dir: Path) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("handbook-store")
    config = unscored_fraud_config(root)
    summary = summary_of(eventray("run", str(config), "--input", str(handbook_dir), "--store",
                                  str(root / "store"), "--no-progress", timeout=1800))
    return root, config, summary


def test_replay_gives_the_same_scores_row_for_row(handbook_store: tuple[Path, Path, dict]) -> None:
    root, config, summary = handbook_store
    replayed = summary_of(eventray("replay", str(config), "--store", str(root / "store"), "--into",
                                   str(root / "replayed"), "--no-progress", timeout=1800))
    assert replayed["events_in"] == summary["events_in"] and replayed["derived"] == summary["derived"]
    original, again = read(root / "store", "scores"), read(root / "replayed", "scores")
    assert original is not None and again is not None and original.height == summary["events_in"]
    assert_same_rows(original, again)


def test_compaction_then_a_rerun(handbook_store: tuple[Path, Path, dict], handbook_dir: Path) -> None:
    root, config, summary = handbook_store
    store = root / "store"
    tables = ("events", "scores", "deadletter")
    before = {table: read(store, table) for table in tables}
    compacted = summary_of(eventray("compact", "--store", str(store), timeout=1800))
    folders = [d for d in store.glob("*/event_type=*/date=*") if d.is_dir()]
    files = list(store.glob("*/event_type=*/date=*/*.parquet"))
    assert compacted["files_before"] > 2 * len(folders)
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
