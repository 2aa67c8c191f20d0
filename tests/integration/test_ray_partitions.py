"""Partition actors on a real local Ray: per-key order, nothing lost or doubled, and the
same store as the in-process runner (online equals in-process, deterministic under a clock)."""

from __future__ import annotations

import pickle
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions, RayPartitions
from pipelines.pipeline import load_pipeline
from pipelines.testing import FakeClock
from tests.support import ROOT, numbered_events, spec_for, stored_in_apply_order


@pytest.mark.ray
def test_ray_partitions_keep_per_key_order(ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=300, per_key=40)
    spec = spec_for(tmp_path, partitions=4, batch_size=700)
    store = tmp_path / "store"
    summary = run_pipeline(
        spec, lambda prefix: RayPartitions(4, store, prefix, 2, 0.5), store, progress=False)
    assert summary["stored"] == summary["events_in"] == 12_000
    events = stored_in_apply_order(store)
    assert events["event_id"].n_unique() == 12_000
    per_key = events.group_by("key", maintain_order=True).agg(pl.col("seq"))
    for seqs in per_key["seq"]:
        assert seqs.to_list() == list(range(40))


@pytest.mark.ray
def test_ray_and_in_process_runs_write_identical_stores(ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=50, per_key=20, seed=1)
    spec = spec_for(tmp_path, partitions=3, batch_size=128)
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    run_pipeline(spec, lambda prefix: RayPartitions(3, on_ray, prefix, 2, 0.5), on_ray,
                 progress=False, clock=FakeClock())
    run_pipeline(spec, lambda prefix: LocalPartitions(3, local, prefix), local,
                 progress=False, clock=FakeClock())
    ray_files = sorted(p.relative_to(on_ray) for p in on_ray.rglob("*.parquet"))
    local_files = sorted(p.relative_to(local) for p in local.rglob("*.parquet"))
    assert ray_files == local_files
    for relative in ray_files:
        assert (on_ray / relative).read_bytes() == (local / relative).read_bytes(), relative


@pytest.mark.ray
def test_routed_run_with_priority_derived_events_and_adaptive_batches(
        ray_local: object, tmp_path: Path) -> None:
    numbered_events(tmp_path / "in.jsonl", keys=60, per_key=50, seed=2)
    spec = load_pipeline(ROOT / "configs" / "events.yaml", {
        "source": {"path": [str(tmp_path / "in.jsonl")], "batch_size": 100},
        "runtime": {"partitions": 3, "max_in_flight": 1, "max_queued_batches": 3,
                    "adaptive_batching": {"target_latency_ms": 20, "min_rows": 50,
                                          "max_rows": 2000}},
        "routing": {"routes": [
            {"name": "alarms", "event_types": ["iot.*"], "priority": "high",
             "filter": "key IN ('key-1', 'key-2', 'key-3')",
             "emit": {"event_type": "alarm.raised"}},
            {"name": "quiet", "event_types": ["iot.*"], "filter": "key = 'key-4'", "drop": True},
        ]},
    })
    store = tmp_path / "store"
    summary = run_pipeline(spec, lambda run: RayPartitions(3, store, run, 1, 0.5), store,
                           progress=False)
    assert summary["derived"] == 150 and summary["filtered"] == 50
    assert summary["stored"] == 3000 + 150 - 50
    events = stored_in_apply_order(store)
    assert events.height == summary["stored"]
    assert "key-4" not in set(events["key"])
    readings = events.filter(pl.col("event_type") == "iot.reading")
    for seqs in readings.group_by("key", maintain_order=True).agg("seq")["seq"]:
        assert seqs.to_list() == list(range(50))
    # Every derived alarm is applied after its parent reading (same key, same partition):
    # in the parent's batch (the lanes queue it behind the parent, and a batch keeps queue
    # order) or a later one. Rows of one batch are stored one file per event type, so the
    # store cannot tell their order within the batch; across batches it can.
    alarms = events.filter(pl.col("event_type") == "alarm.raised")
    parents = readings.filter(pl.col("key").is_in(["key-1", "key-2", "key-3"]))
    assert alarms.height == parents.height == 150
    pairs = alarms.join(parents, on=["key", "seq"], how="left", suffix="_parent")
    assert pairs["event_id_parent"].null_count() == 0
    assert (pairs["writer"] == pairs["writer_parent"]).all()
    early = pairs.filter(pl.col("batch") < pl.col("batch_parent"))
    assert early.is_empty(), early.select("key", "seq", "batch", "batch_parent")


def test_a_partition_connects_to_the_ingress_as_it_starts(ray_local: object) -> None:
    """The ingress is looked up, and a call answered, before the first decision; a missing
    ingress is no failure (its decisions go nowhere)."""
    import ray

    from cluster.ingress import IngressReplies

    @ray.remote(num_cpus=0)
    class Decided:
        def __init__(self) -> None:
            self.ids: list[str] = []

        def decided(self, decisions: pa.Table) -> None:
            self.ids += decisions.column("event_id").to_pylist()

        def seen(self) -> list[str]:
            return self.ids

    ingress = Decided.options(name="run-ingress", namespace="eventray-test").remote()
    replies = IngressReplies("run-ingress", namespace="eventray-test")
    replies = pickle.loads(pickle.dumps(replies))  # as it reaches a partition's process
    replies.connect()
    assert replies._actor is not None
    replies.send(pa.table({"event_id": ["e1", "e2"]}))
    replies.send(pa.table({"event_id": pa.array([], pa.string())}))  # nothing to send
    assert ray.get(ingress.seen.remote()) == ["e1", "e2"]
    missing = IngressReplies("no-such-ingress", namespace="eventray-test")
    missing.connect()
    missing.send(pa.table({"event_id": ["e3"]}))
    assert missing._actor is None
    ray.kill(ingress)
