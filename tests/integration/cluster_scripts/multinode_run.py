"""A run on a three-node cluster on this machine, losing a worker node mid-run.

Run as a subprocess (never in pytest's process, which may hold its own Ray):

    python multinode_run.py --config CONFIG --input DATA --store STORE [--partitions 4]

Starts ``ray.cluster_utils.Cluster``: a head and two worker nodes with one CPU and an
explicit 100 MB object store each (they share one host), health checks tuned so a lost
node is noticed in about a second. Runs the pipeline in a background thread (through
``cluster.job.run_job``, as ``eventray run --address`` does, or with
``--executor-cpus`` through ``run_pipeline`` and ``RayPartitions`` directly), records
where the partition actors run, removes a worker node that hosts some of them once the
first checkpoint is committed, and waits for the run to end. Prints one JSON line:
nodes, placement before and after, the node removed, the summary or the error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# Before ray is imported: loopback only, token auth named explicitly, and a private
# temporary directory (Cluster writes the "current cluster" file under it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
TEMP_DIR = tempfile.mkdtemp(prefix="erm-")
os.environ["RAY_TMPDIR"] = TEMP_DIR

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

NAMESPACE = "eventray"
NODE_MB = 100
#: A lost node is declared dead after ~ initial delay / period * threshold: about a second.
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_timeout_ms": 200,
    "health_check_failure_threshold": 5,
}


def committed_rows(store: Path) -> int:
    best = 0
    for manifest in store.glob("_checkpoints/*/manifest-*.json"):
        try:
            best = max(best, int(json.loads(manifest.read_text())["counts"]["read"]))
        except (OSError, ValueError, KeyError):
            continue
    return best


def placement(partitions: int, wait_s: float) -> dict[int, dict[str, Any]]:
    """partition -> {node_id, pid}, asked of the live actors (retried while recovering)."""
    found: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait_s
    while len(found) < partitions and time.monotonic() < deadline:
        for p in range(partitions):
            if p in found:
                continue
            try:
                actor = ray.get_actor(f"partition-{p}", namespace=NAMESPACE)
                found[p] = ray.get(actor.where.remote(), timeout=5)
            except Exception:  # not created yet, or being replaced
                time.sleep(0.05)
    return found


def start_run(args: argparse.Namespace, cluster: Cluster, outcome: dict[str, Any]) -> threading.Thread:
    def target() -> None:
        try:
            if args.executor_cpus is None:
                from cluster.job import run_job

                outcome["summary"] = run_job(args.config, address=cluster.address,
                                             store=args.store, inputs=[str(args.input)],
                                             partitions=args.partitions, progress=False)
            else:
                from cluster.driver import run_pipeline
                from cluster.partitions import RayPartitions
                from pipelines.spec import load_pipeline

                spec = load_pipeline(args.config, {"runtime": {"partitions": args.partitions}})
                outcome["summary"] = run_pipeline(
                    spec, lambda run: RayPartitions(args.partitions, args.store, run,
                                                    spec.runtime.max_in_flight,
                                                    args.executor_cpus),
                    args.store, [str(args.input)], progress=False)
        except BaseException as exc:  # reported in the JSON line, not a traceback
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["traceback"] = traceback.format_exc()[-3000:]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")  # run the clean-up of main's finally


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--executor-cpus", type=float, default=None,
                        help="drive RayPartitions directly with this many CPUs per actor")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": NODE_MB * 1024 * 1024,
        "include_dashboard": False, "_system_config": HEALTH_CHECKS})
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=NODE_MB * 1024 * 1024)
                   for _ in range(2)]
        cluster.wait_for_nodes()
        # Joined in this thread before the run's thread calls ray.init: with --executor-cpus
        # the run uses this connection; run_job connects itself (and so must come first).
        if args.executor_cpus is not None:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        report["cluster_start_s"] = round(time.monotonic() - started, 1)
        outcome: dict[str, Any] = {}
        thread = start_run(args, cluster, outcome)
        while not ray.is_initialized() and thread.is_alive():
            time.sleep(0.05)
        report["node_addresses"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        report["gcs_address"] = cluster.address
        deadline = time.monotonic() + 60
        while committed_rows(args.store) == 0 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        report["first_checkpoint_rows"] = committed_rows(args.store)
        before = placement(args.partitions, 10)
        report["before"] = {p: w["node_id"] for p, w in before.items()}
        hosting = {w["node_id"] for w in before.values()}
        victim = next((n for n in workers if n.node_id in hosting), None)
        if victim is None or not thread.is_alive():
            report["error"] = "no worker node hosts a partition, or the run ended too early"
        else:
            report["removed_node"] = victim.node_id
            report["removed_at_rows"] = committed_rows(args.store)
            report["removed_partitions"] = sorted(
                p for p, w in before.items() if w["node_id"] == victim.node_id)
            cluster.remove_node(victim)
            removed_at = time.monotonic()
            after = placement(args.partitions, 60)
            report["after"] = {p: w["node_id"] for p, w in after.items()}
            report["replaced_in_s"] = round(time.monotonic() - removed_at, 2)
        thread.join(max(1.0, args.timeout - (time.monotonic() - started)))
        report["finished"] = not thread.is_alive()
        report.update(outcome)
        report["total_s"] = round(time.monotonic() - started, 1)
    finally:
        print(json.dumps(report, default=str), flush=True)
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(TEMP_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
