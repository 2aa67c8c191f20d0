"""Kill a running pipeline's partition actors from outside, the way an operator would.

Run as a subprocess (never in pytest's process, which may hold its own Ray):

    python kill_partitions.py --address 127.0.0.1:PORT --partitions 2 --store S \
        --total ROWS --stop-file FILE --ready-file FILE

It joins the cluster as a second driver (and creates ``--ready-file`` once joined, so the
caller can start the run knowing the killer is watching), waits for ``partition-<i>`` (namespace
``eventray``), then every ``--interval`` seconds asks the next partition where it runs and
kills it. It stops killing once the run's last committed checkpoint has read
``--stop-fraction`` of ``--total`` rows, so every kill lands before the run's final
checkpoint and must be noticed by the driver; it exits when ``--stop-file`` appears.
Prints one JSON line: kills attempted, kills that hit a live actor, their pids, node
addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before ray is imported: loopback only, token auth named explicitly.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"

import ray  # noqa: E402
from actors import get_named  # noqa: E402  (this folder, beside the script)

NAMESPACE = "eventray"


def committed_rows(store: Path) -> int:
    """Rows read as of the run's newest committed checkpoint (0 before the first)."""
    best = 0
    for manifest in store.glob("_checkpoints/*/manifest-*.json"):
        try:
            best = max(best, int(json.loads(manifest.read_text())["counts"]["read"]))
        except (OSError, ValueError, KeyError):  # pruned or being replaced meanwhile
            continue
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--total", type=int, required=True, help="rows the run will read")
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.6)
    parser.add_argument("--stop-fraction", type=float, default=0.75)
    parser.add_argument("--max-kills", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    assert addresses == ["127.0.0.1"], addresses
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    args.ready_file.touch()

    attempts, live_kills, pids = 0, 0, []
    victim, next_kill = 0, 0.0
    deadline = time.monotonic() + args.timeout
    while not args.stop_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
        done = committed_rows(args.store) >= args.stop_fraction * args.total
        if done or live_kills >= args.max_kills or time.monotonic() < next_kill:
            continue
        try:
            actor = get_named(f"partition-{victim}")
            where = ray.get(actor.where.remote(), timeout=10)
        except Exception:  # not started yet, or being replaced by the driver right now
            continue
        attempts += 1
        ray.kill(actor)
        if where["pid"] not in pids:
            live_kills += 1
            pids.append(where["pid"])
        victim = (victim + 1) % args.partitions
        next_kill = time.monotonic() + args.interval
    print(json.dumps({"attempts": attempts, "kills": live_kills, "pids": pids,
                      "node_addresses": addresses}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
