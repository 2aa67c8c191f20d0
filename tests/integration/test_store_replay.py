"""Replay, compare and explain over a fraud run's store: the run on a real local Ray, the
replays through the command line (in process), the stores real Parquet."""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from cluster.driver import run_pipeline
from cluster.partitions import RayPartitions
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.spec import PipelineSpec
from tests.support import ROOT, eventray, fraud_spec, summary_of, train_into

pytestmark = pytest.mark.ray


def ray_run(spec: PipelineSpec, store: Path, inputs: list[str]) -> dict:
    runtime = spec.runtime
    return run_pipeline(
        spec, lambda prefix: RayPartitions(runtime.partitions, store, prefix, 2, 0.25, spec),
        store, inputs, progress=False,
        stage_factory=lambda prefix, stage: RayPartitions(
            stage.partitions, store, prefix, 2, 0.25, spec, stage))


def config_with(tmp_path: Path, name: str, registry: Path, threshold: float) -> Path:
    """configs/fraud.yaml scored by ``registry``'s latest ``fraud`` at ``threshold``."""
    config = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    config["source"]["batch_size"] = 3000
    config["steps"][0]["model"]["registry"] = str(registry)
    config["steps"][0]["threshold"] = threshold
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def scored_run(ray_local: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp_path = tmp_path_factory.mktemp("replay")
    table = simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=40, seed=5))
    write_monthly(table, tmp_path / "tx")
    assert train_into(tmp_path / "registry", table, seed=0) == 1
    config = config_with(tmp_path, "fraud", tmp_path / "registry", 0.2)
    spec = fraud_spec(**yaml.safe_load(config.read_text()))
    summary = ray_run(spec, tmp_path / "store", [str(tmp_path / "tx")])
    assert summary["alerts"] > 0
    return tmp_path, config, summary


def assert_same_rows(original: pl.DataFrame, again: pl.DataFrame) -> None:
    """Row for row, bit for bit: the ids, the model, the score and every model input."""
    assert_frame_equal(again, original, check_exact=True)


def read(store: Path, table: str) -> pl.DataFrame:
    return pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True).collect()


def test_replay_gives_the_same_scores_row_for_row(scored_run: tuple[Path, Path, dict]) -> None:
    tmp_path, config, summary = scored_run
    replayed = summary_of(eventray("replay", str(config), "--store", str(tmp_path / "store"),
                                   "--into", str(tmp_path / "again"), "--in-process", "--no-progress"))
    # only the transactions are fed again; labels and alerts are derived again
    assert replayed["events_in"] == summary["events_in"]
    assert (replayed["derived"], replayed["alerts"]) == (summary["derived"], summary["alerts"])
    for table in ("scores", "alerts"):
        original, again = read(tmp_path / "store", table), read(tmp_path / "again", table)
        assert_same_rows(original.sort("event_id"), again.sort("event_id"))
    events = [read(s, "events").drop("metadata").sort("event_id")
              for s in (tmp_path / "store", tmp_path / "again")]
    assert events[0].equals(events[1])
    compared = summary_of(eventray("compare", str(tmp_path / "store"), str(tmp_path / "again")))
    assert (compared["added"], compared["removed"], compared["changed"]) == (0, 0, 0)


def test_compare_shows_what_a_new_threshold_would_have_flagged(scored_run: tuple[Path, Path, dict]) -> None:
    tmp_path, _, summary = scored_run
    stricter = config_with(tmp_path, "strict", tmp_path / "registry", 0.5)
    summary_of(eventray("replay", str(stricter), "--store", str(tmp_path / "store"),
                        "--into", str(tmp_path / "strict"), "--in-process", "--no-progress"))
    plot = tmp_path / "diff.png"
    compared = summary_of(eventray("compare", str(tmp_path / "store"), str(tmp_path / "strict"),
                                   "--plot", str(plot)))
    flagged = read(tmp_path / "store", "alerts")
    assert compared["alerts_a"] == summary["alerts"] == flagged.height
    assert compared["removed"] == flagged.filter(pl.col("score") < 0.5).height > 0
    assert compared["added"] == 0 and compared["changed"] == flagged.filter(pl.col("score") >= 0.5).height
    assert plot.stat().st_size > 10_000


def test_replay_of_a_time_range_and_of_unknown_stores(scored_run: tuple[Path, Path, dict]) -> None:
    tmp_path, config, _ = scored_run
    part = summary_of(eventray("replay", str(config), "--store", str(tmp_path / "store"), "--into",
                               str(tmp_path / "part"), "--from", "2018-04-10", "--to", "2018-04-12",
                               "--in-process", "--no-progress"))
    created = read(tmp_path / "store", "events").filter(
        pl.col("event_type") == "transaction.created",
        pl.col("timestamp").dt.date().is_between(pl.date(2018, 4, 10), pl.date(2018, 4, 11)))
    assert part["events_in"] == created.height > 0
    same = eventray("replay", str(config), "--store", str(tmp_path / "store"), "--into",
                    str(tmp_path / "store"), "--in-process")
    assert same.returncode == 2 and "another store" in same.stderr and "Traceback" not in same.stderr


def test_explain_a_random_alert_shows_the_inputs_and_model_of_its_scores_row(
    scored_run: tuple[Path, Path, dict]
) -> None:
    tmp_path, _, _ = scored_run
    store = tmp_path / "store"
    alerts = read(store, "alerts")
    alert = alerts.row(random.Random(7).randrange(alerts.height), named=True)
    result = eventray("explain", "--store", str(store), alert["alert_id"])
    evidence = summary_of(result)
    score = read(store, "scores").filter(pl.col("event_id") == alert["event_id"]).row(0, named=True)
    assert evidence["model"] == score["model"] == "fraud:1"
    assert len(evidence["inputs"]) == 15
    assert evidence["inputs"] == {name: score[name] for name in evidence["inputs"]}
    assert list(evidence["inputs"])[0] == "TX_AMOUNT"
    assert evidence["threshold"] == 0.2 and evidence["score"] == alert["score"]
    assert [label["event_type"] for label in evidence["labels"]] == ["fraud.reported"]
    assert evidence["actions"] == []
    assert "action    none" in result.stdout and "TERMINAL_ID_RISK_30DAY_WINDOW" in result.stdout
    missing = eventray("explain", "--store", str(store), "no-such-alert")
    assert missing.returncode == 2 and "no alert" in missing.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["alert_id"] == alert["alert_id"]
