"""Exactly-once and per-key order under failures: partition actors killed from outside
mid-run, and a driver killed and resumed. The store must equal a fault-free run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from cluster.driver import run_pipeline
from cluster.partitions import NAMESPACE, LocalPartitions, RayPartitions, actor_name
from pipelines.testing import FakeClock
from tests.conftest import ROOT
from tests.integration.test_ray_partitions import numbered_events, spec_for, stored_in_apply_order


class KillingPartitions(RayPartitions):
    """Kills one of its own actors by name, the way an operator would, every few batches."""

    def __init__(self, *args: object, kill_every: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.kill_every, self.submitted, self.kills = kill_every, 0, 0

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        super().submit(partition, seq, rows)
        self.submitted += 1
        if self.submitted % self.kill_every == 0:
            victim = (self.submitted // self.kill_every) % len(self.actors)
            name = actor_name(victim, self.stage)
            self._ray.kill(self._ray.get_actor(name, namespace=NAMESPACE))
            self.kills += 1


def files_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted((store).rglob("*.parquet"))}


@pytest.mark.ray
def test_killed_partitions_recover_in_order_exactly_once(ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=200, per_key=30, seed=4)
    spec = spec_for(tmp_path, partitions=3, batch_size=150)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"checkpoint_every": 4})})
    faulty, clean = tmp_path / "faulty", tmp_path / "clean"
    executors: list[KillingPartitions] = []

    def killing(run: str) -> KillingPartitions:
        executors.append(KillingPartitions(3, faulty, run, 2, 0.5, kill_every=7))
        return executors[0]

    summary = run_pipeline(spec, killing, faulty, progress=False, clock=FakeClock())
    run_pipeline(spec, lambda run: LocalPartitions(3, clean, run), clean, progress=False,
                 clock=FakeClock())

    assert executors[0].kills >= 5 and summary["restarts"] >= 5
    assert summary["stored"] == summary["events_in"] == 6_000
    events = stored_in_apply_order(faulty)
    assert events["event_id"].n_unique() == events.height == 6_000
    for seqs in events.group_by("key", maintain_order=True).agg("seq")["seq"]:
        assert seqs.to_list() == list(range(30))
    # The store equals the fault-free run's, file for file, byte for byte.
    faulty_files = {k: v for k, v in files_of(faulty).items()}
    assert faulty_files == files_of(clean)


def _sorted_events(store: Path) -> pl.DataFrame:
    frame = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    return frame.with_columns(pl.col("metadata").struct.field("version")).drop(
        "metadata").sort("event_id").collect()


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_fault_free_store(tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=400, per_key=60, seed=5)
    config = tmp_path / "events.yaml"
    config.write_text((ROOT / "configs" / "events.yaml").read_text()
                      .replace("batch_size: 10000", "batch_size: 300")
                      .replace("max_in_flight: 4", "max_in_flight: 4\n  checkpoint_every: 5"))
    command = [str(Path(sys.executable).parent / "eventray"), "run", str(config), "--input",
               str(tmp_path / "in.jsonl"), "--no-progress"]
    crash_resume_and_rerun(command, tmp_path, manifest_wait_s=120, timeout_s=300)
    crashed_events, clean_events = _sorted_events(tmp_path / "crashed"), _sorted_events(tmp_path / "clean")
    assert crashed_events.height == 24_000
    assert crashed_events.equals(clean_events)


def crash_resume_and_rerun(command: list[str], tmp_path: Path, manifest_wait_s: float,
                           timeout_s: float) -> None:
    """Run ``command`` into ``tmp_path/crashed``, SIGKILL it after its second checkpoint,
    ``--resume`` it to the end, and run it again fault-free into ``tmp_path/clean``."""
    # Its own session: the kill takes the driver and its embedded Ray down together,
    # like a lost machine, and leaves no orphan behind.
    driver = subprocess.Popen([*command, "--store", str(tmp_path / "crashed")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    manifests = tmp_path / "crashed" / "_checkpoints"
    deadline = time.monotonic() + manifest_wait_s
    while len(list(manifests.rglob("manifest-*.json"))) < 2 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # no clean-up of any kind
    driver.wait()
    resumed = subprocess.run([*command, "--store", str(tmp_path / "crashed"), "--resume"],
                             capture_output=True, text=True, timeout=timeout_s)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"resumed": true' in resumed.stdout
    clean = subprocess.run([*command, "--store", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=timeout_s)
    assert clean.returncode == 0, clean.stderr[-2000:]
