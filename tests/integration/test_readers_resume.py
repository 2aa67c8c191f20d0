"""A run with reader actors whose driver is killed mid-run (SIGKILL, its embedded Ray with
it) is resumed with ``eventray run --resume`` to the store a fault-free run writes: the
readers' split offsets, carries and ingest state, the operators' state and counters, all
from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import EVENTRAY, crash_resume_and_rerun, unscored_fraud_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _rows(store: Path, table: str) -> pl.DataFrame:
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True)
    if "metadata" in frame.collect_schema().names():
        frame = frame.drop("metadata")  # ingestion time
    return frame.sort("event_id").collect()


def test_a_killed_driver_is_resumed_to_the_fault_free_store(tmp_path: Path) -> None:
    table = simulate_transactions(SimulationSpec(n_customers=80, n_terminals=160, n_days=14, seed=4))
    write_monthly(table, tmp_path / "tx")
    config = unscored_fraud_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["source"]["batch_size"] = 400
    raw["runtime"]["checkpoint_every"] = 2  # with 2 readers: a checkpoint every round
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [EVENTRAY, "run", str(config), "--input", str(tmp_path / "tx"), "--readers", "2",
               "--no-progress"]
    crash_resume_and_rerun(command, tmp_path, manifest_wait_s=60, timeout_s=300)
    for name in ("events", "scores"):
        assert _rows(tmp_path / "crashed", name).equals(_rows(tmp_path / "clean", name)), name
