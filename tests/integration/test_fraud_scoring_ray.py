"""Fraud scoring on a real local Ray: the terminal stage and the customer partitions as
actors, alerts stored and emitted as events, and a new model version picked up mid-run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions, RayPartitions, ray_stages
from pipelines.fraud.features import handbook_features_batch
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.spec import PipelineSpec
from pipelines.testing import FakeClock
from tests.support import FEATURES, fraud_spec, mismatches, train_into


def ray_run(spec: PipelineSpec, store: Path, inputs: list[str]) -> dict:
    runtime = spec.runtime
    return run_pipeline(
        spec, lambda prefix: RayPartitions(runtime.partitions, store, prefix, 2, 0.25, spec),
        store, inputs, progress=False,
        stage_factory=lambda prefix, stage: RayPartitions(
            stage.partitions, store, prefix, 2, 0.25, spec, stage))


def scan(store: Path, table: str) -> pl.DataFrame:
    return pl.read_parquet(store / table / "**" / "*.parquet", hive_partitioning=True)


@pytest.mark.ray
def test_scores_alerts_and_a_hot_model_swap(ray_local: object, tmp_path: Path) -> None:
    table = simulate_transactions(SimulationSpec(n_customers=250, n_terminals=500, n_days=50, seed=9))
    write_monthly(table, tmp_path / "tx")
    registry = tmp_path / "registry"
    assert train_into(registry, table, seed=0) == 1
    base = fraud_spec()
    spec = fraud_spec(
        source={**base.source.model_dump(exclude_none=True), "batch_size": 2000,
                # ~50 days released over ~15 s: the run is still going when v2 appears
                "pace": {"speedup": 50 * 86_400 / 15}},
        steps=[{"kind": "fraud", "threshold": 0.2, "model": {
            "registry": str(registry), "name": "fraud", "reload_every": 1}}],
        runtime={**base.runtime.model_dump(exclude_none=True), "checkpoint_every": 5})
    store = tmp_path / "store"

    def publish_v2_once_scoring() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((store / "scores").rglob("*.parquet")):
            time.sleep(0.2)
        train_into(registry, table, seed=1)

    publisher = threading.Thread(target=publish_v2_once_scoring)
    publisher.start()
    summary = ray_run(spec, store, [str(tmp_path / "tx")])
    publisher.join()

    scores = scan(store, "scores")
    assert scores.height == table.num_rows
    assert set(scores["model"]) == {"fraud:1", "fraud:2"}
    # a partition switches between two of its batches, and only forward
    files = sorted((store / "scores").rglob("*.parquet"), key=lambda f: f.name)
    applied = pl.concat([pl.read_parquet(f).select("model", writer=pl.lit(f.name.rsplit("-", 1)[0]))
                         for f in files])
    for versions in applied.group_by("writer").agg("model")["model"]:
        models = versions.to_list()
        assert models == sorted(models), models  # never back to an older version
    assert mismatches(scores, handbook_features_batch(table)) == dict.fromkeys(FEATURES, 0)
    alerts = scan(store, "alerts")
    assert alerts.height == summary["alerts"] > 0
    assert (alerts["score"] >= 0.2).all() and alerts["alert_id"].n_unique() == alerts.height
    stored = scan(store, "events")
    suspected = stored.filter(pl.col("event_type") == "fraud.suspected")
    assert sorted(suspected["event_id"]) == sorted(alerts["alert_id"])
    assert summary["stored"] == stored.height == 2 * table.num_rows + alerts.height


@pytest.mark.ray
def test_a_stage_in_the_driver_writes_the_store_its_actors_write(ray_local: object,
                                                                  tmp_path: Path) -> None:
    """``placement: driver`` moves the terminal stage into the driver process: the same
    events, features and labels, row for row, as its partition actors give."""
    table = simulate_transactions(SimulationSpec(n_customers=80, n_terminals=150, n_days=20, seed=4))
    write_monthly(table, tmp_path / "tx")
    base = fraud_spec()
    stores = {}
    for placement in ("actors", "driver"):
        spec = fraud_spec(
            enrich=[{**stage.model_dump(exclude_none=True), "placement": placement}
                    for stage in base.enrich],
            steps=[{"kind": "fraud", "model": {"registry": str(tmp_path / "registry"),
                                                "name": "fraud"}}])  # no model: features only
        store = stores[placement] = tmp_path / placement
        stages = ray_stages(spec, store, 2, 0.25)
        assert isinstance(stages("probe", spec.enrich[0]), LocalPartitions) == (placement == "driver")
        summary = run_pipeline(
            spec, lambda prefix, spec=spec, store=store: RayPartitions(
                spec.runtime.partitions, store, prefix, 2, 0.25, spec),
            store, [str(tmp_path / "tx")], progress=False, clock=FakeClock(), stage_factory=stages)
        assert summary["stored"] == 2 * table.num_rows
    # (which keys share a batch depends on when the stage's answers come, so rows of different
    # keys may sit in another order within a file: compare the rows, sorted by event id)
    for name in ("events", "scores"):
        actors, driver = (scan(stores[p], name).sort("event_id") for p in ("actors", "driver"))
        assert actors.height > 0 and actors.equals(driver), name
