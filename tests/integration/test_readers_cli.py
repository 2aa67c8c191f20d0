"""``eventray run --readers N`` as a user runs it (a subprocess, its own embedded Ray): the
summary reports the readers and the CPU-seconds per million events by kind of process, the
in-process runner refuses reader actors with one line, and a driver killed mid-run
(SIGKILL, its Ray with it) is resumed with ``--resume`` to the fault-free store."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import EVENTRAY, crash_resume_and_rerun, eventray, summary_of, unscored_fraud_config

pytestmark = pytest.mark.ray


def test_run_with_readers_from_the_command_line(tmp_path: Path) -> None:
    table = simulate_transactions(SimulationSpec(n_customers=80, n_terminals=160, n_days=15, seed=3))
    write_monthly(table, tmp_path / "tx")
    config = unscored_fraud_config(tmp_path)
    summary = summary_of(eventray("run", str(config), "--input", str(tmp_path / "tx"), "--readers", "2",
                                  "--store", str(tmp_path / "store"), "--no-progress"))
    assert summary["readers"] == 2 and summary["events_in"] == table.num_rows
    assert summary["stored"] == 2 * table.num_rows and summary["restarts"] == 0
    assert set(summary["cpu_s_per_million"]) == {"driver", "readers", "stages", "partitions"}
    assert summary["driver_cpu_share"] < 0.5  # a tiny input: start-up calls weigh more
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith("_")) == [
        "events", "scores"]

    refused = eventray("run", str(config), "--input", str(tmp_path / "tx"), "--readers", "2",
                       "--in-process", "--store", str(tmp_path / "other"))
    assert refused.returncode != 0 and "runtime.readers" in refused.stderr


def _rows(store: Path, table: str) -> pl.DataFrame:
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True)
    if "metadata" in frame.collect_schema().names():
        frame = frame.drop("metadata")  # ingestion time
    return frame.sort("event_id").collect()


def test_a_killed_driver_is_resumed_to_the_fault_free_store(tmp_path: Path) -> None:
    table = simulate_transactions(SimulationSpec(n_customers=80, n_terminals=160, n_days=20, seed=4))
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
