"""``eventray run --readers N`` as a user runs it (a subprocess, its own embedded Ray): the
summary reports the readers and the CPU-seconds per million events by kind of process, and
the in-process runner refuses reader actors with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import eventray, summary_of, unscored_fraud_config

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


    # a stage in the driver takes its events from the driver path: readers refuse it by name
    raw = yaml.safe_load(config.read_text())
    raw["enrich"][0]["placement"] = "driver"
    in_driver = tmp_path / "in-driver.yaml"
    in_driver.write_text(yaml.safe_dump(raw))
    refused = eventray("run", str(in_driver), "--input", str(tmp_path / "tx"), "--readers", "2",
                       "--store", str(tmp_path / "third"))
    assert refused.returncode != 0 and "enrich.0.placement" in refused.stderr
    assert "Traceback" not in refused.stderr
