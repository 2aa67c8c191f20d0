"""Exactly-once and per-key order under failures: partition actors killed from outside
mid-run, and a driver killed and resumed. The store must equal a fault-free run's."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
import ray

from cluster.driver import run_pipeline
from cluster.partitions import (
    MAX_FUTILE_RECOVERIES,
    NAMESPACE,
    LocalPartitions,
    PartitionFailed,
    RayPartitions,
)
from pipelines.testing import FakeClock
from tests.support import (
    ROOT,
    FaultyPartitions,
    KillingPartitions,
    crash_resume_and_rerun,
    files_of,
    numbered_events,
    spec_for,
    stored_in_apply_order,
)


class StallingPartitions(FaultyPartitions):
    """Stops one of its own actors' processes (SIGSTOP, as ``kill -STOP PID`` would) after
    ``stall_after`` batches: the actor stays alive and answers nothing, a hung step."""

    def __init__(self, *args: object, stall_after: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.stall_after, self.stopped = stall_after, []

    def fault(self, submitted: int, partition: int) -> None:
        if submitted == self.stall_after:
            pid = self._ray.get(self.actors[partition].where.remote())["pid"]
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append(pid)


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


@pytest.mark.ray
def test_a_stalled_partition_is_replaced_and_the_run_ends_as_if_nothing_happened(
        ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=100, per_key=20, seed=6)
    spec = spec_for(tmp_path, partitions=2, batch_size=100)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(
        update={"checkpoint_every": 4, "batch_timeout_s": 3.0})})
    stalled, clean = tmp_path / "stalled", tmp_path / "clean"
    executors: list[StallingPartitions] = []

    def stalling(run: str) -> StallingPartitions:
        executors.append(StallingPartitions(2, stalled, run, 2, 0.5, spec, stall_after=9))
        return executors[0]

    try:
        summary = run_pipeline(spec, stalling, stalled, progress=False, clock=FakeClock())
    finally:
        for pid in executors[0].stopped if executors else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    run_pipeline(spec, lambda run: LocalPartitions(2, clean, run), clean, progress=False,
                 clock=FakeClock())

    stopped = executors[0].stopped
    assert len(stopped) == 1 and summary["restarts"] >= 1
    assert not psutil.pid_exists(stopped[0]) or psutil.Process(stopped[0]).status() == psutil.STATUS_ZOMBIE
    assert summary["stored"] == summary["events_in"] == 2_000
    assert files_of(stalled) == files_of(clean)


@pytest.mark.ray
def test_a_partition_that_fails_every_time_ends_the_run_with_an_error_naming_it(
        ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=50, per_key=10, seed=7)
    spec = spec_for(tmp_path, partitions=1, batch_size=100)
    store = tmp_path / "store"
    # Where the partition writes its events, a file: every batch fails to be stored.
    (store / "events").mkdir(parents=True)
    (store / "events" / "event_type=iot.reading").write_text("not a directory")
    started = time.monotonic()
    with pytest.raises(PartitionFailed) as failed:
        run_pipeline(spec, lambda run: RayPartitions(1, store, run, 2, 0.5, spec), store,
                     progress=False, clock=FakeClock())
    message = str(failed.value)
    # store writes are group-committed: the first commit, and failure, is the checkpoint's
    assert failed.value.actor == "partition-0" and failed.value.what == "checkpoint 1"
    assert failed.value.attempts == MAX_FUTILE_RECOVERIES + 1
    assert "partition-0 failed checkpoint 1 6 times in a row" in message
    assert "event_type=iot.reading" in message and "--resume" in message
    assert time.monotonic() - started < 120
    deadline = time.monotonic() + 30  # the run's actor goes with it (ray.kill is asynchronous)
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE]
        if not any(name.endswith("-partition-0") for name in names):
            break
        time.sleep(0.2)
    else:
        pytest.fail("partition-0 outlived its failed run")


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
