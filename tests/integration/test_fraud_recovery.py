"""Exactly-once for the fraud flow under failures: terminal-stage and customer-partition
actors killed mid-run, and a driver killed and resumed. The label feed, the terminal
stage's windows, the customer windows and the model all come back from the checkpoint;
the store (events, labels, scores, alerts) must equal a fault-free run's."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import yaml

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.spec import EnrichSpec, PipelineSpec
from pipelines.testing import FakeClock
from tests.support import KillingPartitions, crash_resume_and_rerun, files_of, fraud_spec, train_into


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pa.Table]:
    root = tmp_path_factory.mktemp("fraud-recovery")
    table = simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=45, seed=12))
    write_monthly(table, root / "tx")
    train_into(root / "registry", table, seed=0, model="logistic_regression")
    return root / "tx", root / "registry", table


def small_spec(registry: Path, batch_size: int, checkpoint_every: int) -> PipelineSpec:
    base = fraud_spec()
    return fraud_spec(
        source={**base.source.model_dump(exclude_none=True), "batch_size": batch_size},
        # event types given: a YAML dump of the spec writes the generic step's default ("*")
        steps=[{"kind": "fraud", "threshold": 0.2, "event_types": ["transaction.created"],
                "model": {"registry": str(registry), "name": "fraud", "version": 1}}],
        runtime={**base.runtime.model_dump(exclude_none=True), "checkpoint_every": checkpoint_every})


def sorted_table(store: Path, table: str, keep_metadata: bool = False) -> pl.DataFrame:
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True)
    if not keep_metadata and "metadata" in frame.collect_schema().names():
        # ingestion time differs between runs with real clocks
        frame = frame.with_columns(pl.col("metadata").struct.field("version")).drop("metadata")
    names = frame.collect_schema().names()  # ``models`` rows have no event id
    return frame.sort("event_id" if "event_id" in names else ["timestamp", "step", "model"]).collect()


@pytest.mark.ray
def test_killed_stage_and_partition_actors_leave_the_fault_free_store(
    ray_local: object, tmp_path: Path, inputs: tuple[Path, Path, pa.Table]
) -> None:
    data, registry, table = inputs
    spec = small_spec(registry, batch_size=1500, checkpoint_every=4)
    faulty, clean = tmp_path / "faulty", tmp_path / "clean"
    killers: list[KillingPartitions] = []

    def partitions(run: str) -> KillingPartitions:
        killers.append(KillingPartitions(2, faulty, run, 2, 0.25, spec, kill_every=9))
        return killers[-1]

    def stage(run: str, enrich: EnrichSpec) -> KillingPartitions:
        killers.append(KillingPartitions(enrich.partitions, faulty, run, 2, 0.25, spec, enrich,
                                       kill_every=7))
        return killers[-1]

    summary = run_pipeline(spec, partitions, faulty, [str(data)], progress=False,
                           clock=FakeClock(), stage_factory=stage)
    run_pipeline(spec, lambda run: LocalPartitions(2, clean, run, spec), clean, [str(data)],
                 progress=False, clock=FakeClock(),
                 stage_factory=lambda run, enrich: LocalPartitions(
                     enrich.partitions, clean, run, spec, enrich))

    assert all(k.kills >= 3 for k in killers) and summary["restarts"] >= 6
    assert summary["events_in"] == table.num_rows and summary["alerts"] > 0
    assert {p.split("/")[0] for p in files_of(faulty)} == {"events", "scores", "alerts", "models"}
    # Adaptive batching sizes batches by measured speed, so the files differ; their rows
    # (ingestion times included: one fake clock) must not.
    for name in ("events", "scores", "alerts", "models"):
        assert sorted_table(faulty, name, keep_metadata=True).equals(
            sorted_table(clean, name, keep_metadata=True)), name


@pytest.mark.slow
def test_a_killed_fraud_driver_resumes_to_the_fault_free_store(
    tmp_path: Path, inputs: tuple[Path, Path, pa.Table]
) -> None:
    data, registry, table = inputs
    config = tmp_path / "fraud.yaml"
    config.write_text(yaml.safe_dump(small_spec(registry, 1200, 3).model_dump(
        mode="json", by_alias=True, exclude_none=True)))
    command = [str(Path(sys.executable).parent / "eventray"), "run", str(config), "--input",
               str(data), "--no-progress"]
    crash_resume_and_rerun(command, tmp_path, manifest_wait_s=180, timeout_s=600)
    for name in ("events", "scores", "alerts"):
        crashed, fault_free = sorted_table(tmp_path / "crashed", name), sorted_table(tmp_path / "clean", name)
        assert crashed.height > 0 and crashed.equals(fault_free), name
    assert sorted_table(tmp_path / "crashed", "events").height == 2 * table.num_rows + \
        sorted_table(tmp_path / "crashed", "alerts").height
