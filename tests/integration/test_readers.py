"""Runs with reader actors (``runtime.readers``): the fraud flow (label feed, terminal stage,
customer partitions, a model) over simulated transactions on a real local Ray.

- the scores equal row for row for 1, 2 and 4 readers, and the accounting holds;
- reader actors killed from outside during the run leave the store the fault-free run
  writes;
- the driver only coordinates: its CPU-seconds are a small share of the run's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from cluster.partitions import NAMESPACE
from cluster.reader_run import run_with_readers
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.spec import PipelineSpec
from pipelines.testing import FakeClock
from tests.support import fraud_spec, train_into

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pa.Table]:
    root = tmp_path_factory.mktemp("readers")
    table = simulate_transactions(SimulationSpec(n_customers=100, n_terminals=200, n_days=21, seed=5))
    write_monthly(table, root / "tx")
    train_into(root / "registry", table, seed=0, model="logistic_regression")
    return root / "tx", root / "registry", table


def reader_spec(registry: Path, readers: int, checkpoint_every: int = 3,
                batch_size: int = 400) -> PipelineSpec:
    base = fraud_spec()
    return fraud_spec(
        source={**base.source.model_dump(exclude_none=True), "batch_size": batch_size},
        steps=[{"kind": "fraud", "threshold": 0.2, "event_types": ["transaction.created"],
                "model": {"registry": str(registry), "name": "fraud", "version": 1}}],
        runtime={**base.runtime.model_dump(exclude_none=True), "readers": readers,
                 "checkpoint_every": checkpoint_every})


def table_of(store: Path, table: str) -> pl.DataFrame:
    frame = pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True)
    if "metadata" in frame.collect_schema().names():
        frame = frame.drop("metadata")  # ingestion time
    return frame.sort("event_id", *(["step"] if table == "scores" else [])).collect()


@pytest.fixture(scope="module")
def runs(ray_local: object, tmp_path_factory: pytest.TempPathFactory,
         inputs: tuple[Path, Path, pa.Table]) -> dict[int, tuple[Path, dict]]:
    """Fault-free runs with 1, 2 and 4 readers: (store, summary) by readers."""
    data, registry, _ = inputs
    root = tmp_path_factory.mktemp("reader-runs")
    return {readers: (root / str(readers), run_with_readers(
        reader_spec(registry, readers), root / str(readers), [str(data)], clock=FakeClock().now))
        for readers in (1, 2, 4)}


def test_scores_are_identical_for_one_two_and_four_readers(
    runs: dict[int, tuple[Path, dict]], inputs: tuple[Path, Path, pa.Table]
) -> None:
    table = inputs[2]
    one = table_of(runs[1][0], "scores")
    assert one.height == table.num_rows and one["score"].null_count() == 0
    for readers in (2, 4):
        store, summary = runs[readers]
        assert table_of(store, "scores").equals(one), readers
        assert table_of(store, "events").equals(table_of(runs[1][0], "events"))
        assert summary["rounds"] >= 3 and summary["readers"] == readers
    for _, summary in runs.values():
        assert summary["events_in"] == table.num_rows
        # transactions, their labels and the alerts' fraud.suspected events
        assert summary["stored"] == 2 * table.num_rows + summary["alerts"]
        assert summary["alerts"] == runs[1][1]["alerts"] > 0


def _kill_readers(run_prefix: str, kills: int, every_s: float, done: threading.Event,
                  killed: list[str]) -> None:
    import ray

    while len(killed) < kills and not done.is_set():
        time.sleep(every_s)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and "-reader-" in a["name"]
                 and a["name"].startswith(run_prefix)]
        if names:
            name = sorted(names)[len(killed) % len(names)]
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
                killed.append(name)
            except ValueError:  # between a stop and a start
                pass


def test_killed_readers_leave_the_fault_free_store(
    runs: dict[int, tuple[Path, dict]], tmp_path: Path, inputs: tuple[Path, Path, pa.Table]
) -> None:
    data, registry, _ = inputs
    spec = reader_spec(registry, 4)
    clean_store, clean = runs[4]
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_readers, args=(clean["run"], 2, 2.0, done, killed))
    killer.start()
    try:
        faulty = run_with_readers(spec, tmp_path / "faulty", [str(data)], clock=FakeClock().now)
    finally:
        done.set()
        killer.join()
    assert len(killed) == 2 and faulty["restarts"] >= 2
    for name in ("events", "scores", "alerts"):
        assert table_of(tmp_path / "faulty", name).equals(table_of(clean_store, name)), name
    assert {k: faulty[k] for k in ("events_in", "stored", "alerts", "dead_lettered")} == \
        {k: clean[k] for k in ("events_in", "stored", "alerts", "dead_lettered")}


def test_the_driver_only_coordinates(ray_local: object, tmp_path: Path,
                                     inputs: tuple[Path, Path, pa.Table]) -> None:
    """The driver's share of the run's CPU, with 4 readers over four months of 300
    customers in batches of 5,000 (the shipped config reads 50,000 at a time). The runs
    above are too small for it: a tenth of a second of the driver's is fixed (Ray's own
    threads in its process), and their whole run is two CPU-seconds."""
    _, registry, _ = inputs
    table = simulate_transactions(SimulationSpec(n_customers=300, n_terminals=600, n_days=120,
                                                 seed=6))
    write_monthly(table, tmp_path / "tx")
    summary = run_with_readers(reader_spec(registry, 4, batch_size=5_000), tmp_path / "store",
                               [str(tmp_path / "tx")], clock=FakeClock().now)
    cpu = summary["cpu_s"]
    assert set(cpu) == {"driver", "readers", "stages", "partitions"}
    assert summary["driver_cpu_share"] < 0.05, cpu
    assert set(summary["cpu_s_per_million"]) == set(cpu)
