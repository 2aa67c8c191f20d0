"""A run on a three-node cluster on this machine, losing a worker node mid-run.

Run as a subprocess (never in pytest's process, which may hold its own Ray):

    python multinode_run.py --config CONFIG --input DATA --store STORE [--partitions 4]

Starts ``ray.cluster_utils.Cluster``: a head and two worker nodes with ``NODE_CPUS`` logical
CPUs and an explicit 100 MB object store each (they share one host), health checks tuned so a lost
node is noticed in about a second. Runs the pipeline in a background thread (through
``cluster.job.run_job``, as ``eventray run --address`` does), records where the partition
actors run, kills a worker node that hosts some of them (all its processes, SIGKILL: a lost
machine, not a drained one) once the first checkpoint is committed, and waits for the run
to end. The node removed is never the one this driver is attached to (several raylets
share 127.0.0.1 here; removing the driver's own would end the driver, not test recovery).
Prints one JSON line: nodes, placement before and after, the node removed, the summary or
the error.
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
from actors import get_named  # noqa: E402  (this folder, beside the script)
from ray.cluster_utils import Cluster  # noqa: E402

NAMESPACE = "eventray"
NODE_MB = 100
#: Logical CPUs per node. Ray places an actor only on a node with a CPU free at that moment
#: (partition actors hold none once running); with one each, SPREAD had fewer nodes to choose
#: from while actors were being created together, and put 3 of 4 partitions on one node.
NODE_CPUS = 2
#: A lost node is declared dead after ~ initial delay / period * threshold: about a second.
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_timeout_ms": 200,
    "health_check_failure_threshold": 5,
}


def log(message: str) -> None:
    print(f"multinode_run: {message}", file=sys.stderr, flush=True)


def committed_rows(store: Path) -> int:
    best = 0
    for manifest in store.glob("_checkpoints/*/manifest-*.json"):
        try:
            best = max(best, int(json.loads(manifest.read_text())["counts"]["read"]))
        except (OSError, ValueError, KeyError):
            continue
    return best


def placement(partitions: int, wait_s: float, avoid: str | None = None) -> dict[int, dict[str, Any]]:
    """partition -> {node_id, pid}, asked of the live actors (retried while recovering);
    an answer from node ``avoid`` (an actor of a node being lost) is asked again."""
    found: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait_s
    while len(found) < partitions and time.monotonic() < deadline:
        for p in range(partitions):
            if p in found:
                continue
            try:
                actor = get_named(f"partition-{p}")
                where = ray.get(actor.where.remote(), timeout=5)
            except Exception:  # not created yet, or being replaced
                time.sleep(0.05)
                continue
            if where["node_id"] != avoid:
                found[p] = where
            else:
                time.sleep(0.05)
    return found


def wait_until_dead(node_id: str, wait_s: float) -> bool:
    """Whether the cluster has declared the node dead within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes()):
            return True
        time.sleep(0.05)
    return False


def start_run(args: argparse.Namespace, cluster: Cluster, outcome: dict[str, Any]) -> threading.Thread:
    """The run, as ``eventray run --address`` does it, in a background thread."""

    def target() -> None:
        from cluster.job import run_job

        try:
            outcome["summary"] = run_job(args.config, address=cluster.address, store=args.store,
                                         inputs=[str(args.input)], partitions=args.partitions,
                                         progress=False)
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
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": NODE_CPUS, "object_store_memory": NODE_MB * 1024 * 1024,
        "include_dashboard": False, "_system_config": HEALTH_CHECKS})
    try:
        workers = [cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=NODE_MB * 1024 * 1024)
                   for _ in range(2)]
        cluster.wait_for_nodes()
        report["cluster_start_s"] = round(time.monotonic() - started, 1)
        log(f"head and {len(workers)} worker nodes up in {report['cluster_start_s']} s")
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
        log(f"first checkpoint committed at {report['first_checkpoint_rows']} rows")
        before = placement(args.partitions, 10)
        report["before"] = {p: w["node_id"] for p, w in before.items()}
        hosting = {w["node_id"] for w in before.values()}
        report["driver_node"] = driver_node = ray.get_runtime_context().get_node_id()
        victim = next((n for n in workers if n.node_id in hosting and n.node_id != driver_node),
                      None)
        if victim is None or not thread.is_alive():
            report["error"] = "no worker node hosts a partition, or the run ended too early"
        else:
            report["removed_node"] = victim.node_id
            report["removed_at_rows"] = committed_rows(args.store)
            report["removed_partitions"] = sorted(
                p for p, w in before.items() if w["node_id"] == victim.node_id)
            log(f"killing node {victim.node_id} (partitions {report['removed_partitions']})")
            cluster.remove_node(victim, allow_graceful=False)
            removed_at = time.monotonic()
            report["node_declared_dead"] = wait_until_dead(victim.node_id, 30)
            report["declared_dead_in_s"] = round(time.monotonic() - removed_at, 2)
            after = placement(args.partitions, 90, avoid=victim.node_id)
            report["after"] = {p: w["node_id"] for p, w in after.items()}
            report["replaced_in_s"] = round(time.monotonic() - removed_at, 2)
            log(f"every partition answers again after {report['replaced_in_s']} s")
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
