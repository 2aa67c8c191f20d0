"""``eventray bench --scaling``: runs with reader actors on clusters of 1, 2 and 4 nodes.

Each shape (nodes, readers = partitions = nodes) runs the config once on a
:class:`ray.cluster_utils.Cluster` started for it (every node on this machine, 2 logical
CPUs each, loopback only), as ``eventray run --address ... --readers N --partitions N`` in
a child process, and records events/s and the run's CPU-seconds per million events by
kind of process. On one machine the nodes share its cores, so the table shows what an
event costs as readers and nodes are added, not a speed-up; the projection turns the
measured cost into the events/s that ``cores`` cores would sustain if every process kind
scaled out (the driver only coordinates: its share stays flat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SHAPES = ((1, 1), (2, 2), (4, 4))
PROJECTED_CORES = (2, 4, 8, 16, 32)
NODE_CPUS = 2
NODE_OBJECT_STORE = 300 * 1024 * 1024


def _run_on(address: str, config: Path, inputs: Sequence[Path], store: Path, readers: int) -> dict[str, Any]:
    command = [str(Path(sys.executable).parent / "eventray"), "run", str(config), "--address", address,
               "--readers", str(readers), "--partitions", str(readers), "--store", str(store),
               "--no-progress"]
    if inputs:
        command += ["--input", *map(str, inputs)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_shape(config: Path, inputs: Sequence[Path], work: Path, nodes: int,
                  readers: int) -> dict[str, Any]:
    """One run with ``readers`` readers on a fresh cluster of ``nodes`` nodes."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": NODE_CPUS, "object_store_memory": NODE_OBJECT_STORE, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=NODE_OBJECT_STORE)
        cluster.wait_for_nodes()
        summary = _run_on(cluster.address, config, inputs, work / f"store-{nodes}n-{readers}r", readers)
    finally:
        cluster.shutdown()
    per_million = summary["cpu_s_per_million"]
    return {"nodes": nodes, "readers": readers, "partitions": readers,
            "events": summary["events_in"], "events_per_s": summary["events_per_s"],
            "cpu_s_per_million": per_million, "total_cpu_s_per_million": round(sum(per_million.values()), 2),
            "driver_cpu_share": summary["driver_cpu_share"]}


def projection(cpu_s_per_million: float, driver_s_per_million: float) -> list[dict[str, float]]:
    """Events/s on ``cores`` cores from a measured cost per event: the driver's share on
    its own core, the rest spread over the others.

    Example:
        >>> projection(100.0, 1.0)[0]  # 2 cores for the 99 CPU-s a million not the driver's
        {'cores': 2, 'events_per_s': 20202.0}
    """
    rows = []
    for cores in PROJECTED_CORES:
        workers = cores / (cpu_s_per_million - driver_s_per_million) * 1e6
        driver = 1e6 / driver_s_per_million if driver_s_per_million > 0 else float("inf")
        rows.append({"cores": cores, "events_per_s": round(min(workers, driver), 0)})
    return rows


def run_scaling(config: Path, inputs: Sequence[Path], work: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    """The scaling table and the projection; written to ``work/scaling.json`` too."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for nodes, readers in SHAPES:
        log(f"scaling: {nodes} node(s), {readers} reader(s) and partition(s)")
        rows.append(measure_shape(config, inputs, work, nodes, readers))
    widest = rows[-1]
    doc = {"shapes": rows, "cores_on_this_machine": os.cpu_count(),
           "projection": projection(widest["total_cpu_s_per_million"],
                                    widest["cpu_s_per_million"].get("driver", 0.0)),
           "note": "all nodes share this machine's cores: the table shows cost per event as "
                   "readers and nodes are added, not speed-up; the projection assumes every "
                   "process kind but the driver spreads over the cores"}
    (work / "scaling.json").write_text(json.dumps(doc, indent=2))
    return doc


def scaling_table(doc: dict[str, Any]) -> str:
    """The scaling table and the projection as text."""
    lines = ["| nodes | readers = partitions | events/s | CPU-s per million events "
             "(driver / readers / stages / partitions) |", "|---:|---:|---:|---|"]
    for row in doc["shapes"]:
        cost = row["cpu_s_per_million"]
        parts = " / ".join(f"{cost.get(k, 0.0):.1f}" for k in ("driver", "readers", "stages", "partitions"))
        lines.append(f"| {row['nodes']} | {row['readers']} | {row['events_per_s']:,.0f} | {parts} "
                     f"(total {row['total_cpu_s_per_million']:.1f}) |")
    lines += ["", "| cores | projected events/s |", "|---:|---:|"]
    lines += [f"| {p['cores']} | {p['events_per_s']:,.0f} |" for p in doc["projection"]]
    return "\n".join(lines)
