"""Actions on a real local Ray: the handbook's transactions scored by a fraud model, a
webhook rule on ``fraud.suspected``, a flaky receiver on 127.0.0.1 (30 % answered 500, 5 %
answered past the sender's timeout, deduplicating by ``webhook-id``), and a partition actor
and a dispatcher actor killed from outside during the run. The receiver must end with
exactly one accepted delivery per row of the store's ``alerts``, every one signed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from cluster.dispatchers import RayDispatchers
from cluster.driver import run_pipeline
from cluster.partitions import NAMESPACE, RayPartitions
from pipelines.actions.receiver import Behaviour, Receiver, new_secret
from pipelines.pipeline import validate_spec
from pipelines.spec import PipelineSpec
from tests.support import fraud_spec, train_into

DAYS = 14  # of the handbook's April: ~134k transactions, a few hundred alerts
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def handbook_days(tmp_path_factory: pytest.TempPathFactory, handbook_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("actions-handbook")
    april = pl.read_parquet(handbook_dir / "transactions-2018-04.parquet")
    subset = april.filter(pl.col("TX_DATETIME") < pl.datetime(2018, 4, 1 + DAYS))
    (root / "tx").mkdir()
    subset.write_parquet(root / "tx" / "transactions-2018-04.parquet")
    train_into(root / "registry", subset.to_arrow(), seed=0)
    return root / "tx", root / "registry"


def hooked_spec(registry: Path, url: str) -> PipelineSpec:
    base = fraud_spec()
    raw = base.model_dump(by_alias=True, exclude_unset=True)
    raw.update(
        source={**base.source.model_dump(exclude_none=True), "batch_size": 4000,
                # the days released over ~15 s, so that the kills land mid-run
                "pace": {"speedup": DAYS * 86_400 / 15}},
        steps=[{"kind": "fraud", "threshold": 0.3, "event_types": ["transaction.created"],
                "model": {"registry": str(registry), "name": "fraud", "version": 1}}],
        runtime={**base.runtime.model_dump(exclude_none=True), "checkpoint_every": 3},
        actions={"rules": [{
            "name": "notify-risk-team", "event_types": ["fraud.suspected", "fraud.card_*"],
            "where": "data.score >= 0.3",  # a field of the alert event's JSON payload
            "kind": "webhook", "url": url, "secret_env": "FRAUD_HOOK_SECRET",
            "rate_limit": "2000/s", "timeout": TIMEOUT_S,
            "retry": {"attempts": 15, "backoff": "exponential", "initial_delay": 0.05, "max_delay": 0.5},
            "breaker": {"failures": 40, "reset": 0.2}}]})
    raw.pop("search_path", None)
    return validate_spec(raw, "hooked fraud pipeline")


def kill_mid_run(run: str, store: Path, receiver: Receiver, kills: list[str]) -> None:
    """Kill partition-0 once a checkpoint has committed, then dispatcher-0 once deliveries
    have been accepted: from outside, by name, as an operator would."""
    import ray

    deadline = time.monotonic() + 120
    manifests = store / "_checkpoints" / run
    while time.monotonic() < deadline and len(list(manifests.glob("manifest-*.json"))) < 2:
        time.sleep(0.05)
    ray.kill(ray.get_actor(f"{run}-partition-0", namespace=NAMESPACE))
    kills.append("partition-0")
    while time.monotonic() < deadline and len(receiver.received.accepted) < 40:
        time.sleep(0.02)
    ray.kill(ray.get_actor(f"{run}-dispatcher-0", namespace=NAMESPACE))
    kills.append("dispatcher-0")


@pytest.mark.ray
def test_flaky_receiver_gets_each_alert_exactly_once_through_kills(
    ray_local: object, tmp_path: Path, handbook_days: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, registry = handbook_days
    secret = new_secret()
    monkeypatch.setenv("FRAUD_HOOK_SECRET", secret)
    store, run, kills = tmp_path / "store", "ractions1", []
    flaky = Behaviour(fail_rate=0.3, slow_rate=0.05, slow_s=TIMEOUT_S + 0.5, seed=3)
    with Receiver(secret, flaky) as receiver:
        spec = hooked_spec(registry, receiver.url)
        killer = threading.Thread(target=kill_mid_run, args=(run, store, receiver, kills))
        killer.start()
        summary = run_pipeline(
            spec, lambda r: RayPartitions(2, store, r, 2, 0.25, spec), store, [str(data)],
            progress=False, run_id=run,
            stage_factory=lambda r, stage: RayPartitions(stage.partitions, store, r, 2, 0.25, spec, stage),
            actions_factory=lambda r: RayDispatchers(spec.actions, store, r))
        killer.join()
        got = receiver.received

    alerts = pl.read_parquet(store / "alerts" / "**" / "*.parquet", hive_partitioning=True)
    assert kills == ["partition-0", "dispatcher-0"]
    assert summary["restarts"] >= 1 and summary["actions"]["dispatcher_restarts"] >= 1
    assert 100 < alerts.height == summary["alerts"]
    # exactly one accepted delivery per alert, none missing, none extra
    accepted = pl.DataFrame({"event_id": [body["event_id"] for body in got.accepted.values()]})
    assert accepted.height == alerts.height
    assert set(accepted["event_id"]) == set(alerts["alert_id"])
    assert got.bad_signatures == 0 and got.statuses[401] == 0  # every signature verified
    assert got.statuses[500] > 0 and got.requests > alerts.height  # it was flaky, and retried
    assert summary["actions"] | {"dispatch_ms": None} == {
        "actions": alerts.height, "delivered": alerts.height, "dead_lettered": 0, "pending": 0,
        "dispatch_ms": None, "dispatcher_restarts": summary["actions"]["dispatcher_restarts"]}
    assert summary["actions"]["dispatch_ms"]["p99"] >= summary["actions"]["dispatch_ms"]["p50"] > 0
    attempts = pl.read_parquet(store / "action_attempts" / "**" / "*.parquet", hive_partitioning=True)
    assert attempts.filter(pl.col("status") == "delivered")["action_id"].n_unique() == alerts.height
    assert {"failed", "delivered"} <= set(attempts["status"])
    assert not list(store.rglob("*.parquet")) or secret not in "".join(
        p.read_bytes().decode("latin-1") for p in store.rglob("*.parquet"))
