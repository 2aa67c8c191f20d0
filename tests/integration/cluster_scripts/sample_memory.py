"""Sample the memory of a running pipeline's driver and partition actors from outside.

Run as a subprocess (never in pytest's process, which may hold its own Ray), before the
driver starts its run:

    python sample_memory.py --address 127.0.0.1:PORT --driver-pid-file FILE --partitions 1 \
        --ready-file FILE

It joins the cluster as a second driver (and creates ``--ready-file`` once joined), waits
for the driver's process id in ``--driver-pid-file``, then until the driver exits reads the
resident set size (RSS) and the unique set size (USS: pages no other process shares, so
not the object store's shared mappings) of the driver and of every ``partition-<i>`` actor
(namespace ``eventray``) whose process id the actor method ``where()`` has given. It polls
for the actors' names closely and samples the driver the moment they all resolve: the
driver creates its partitions right before it reads its first batch, so that sample is the
driver before reading. Prints one JSON line: ``{"before_reading": {"rss": bytes, "uss":
bytes}, "samples": [...]}``, each sample ``{"t": seconds since the names resolved,
"driver": {...}, "actors": {name: {...}}}`` (actors present once every one has answered),
oldest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Before ray is imported: loopback only, token auth named explicitly.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"

import psutil  # noqa: E402
import ray  # noqa: E402
from actors import get_named  # noqa: E402  (this folder, beside the script)

NAMESPACE = "eventray"


def memory_of(process: psutil.Process) -> dict[str, int] | None:
    try:
        info = process.memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return {"rss": info.rss, "uss": info.uss}


def registered(names: list[str]) -> bool:
    """Whether every actor name resolves (true from the moment the driver creates them)."""
    try:
        for name in names:
            get_named(name)
    except ValueError:
        return False
    return True


def actor_process(name: str) -> psutil.Process | None:
    """The process of the live actor called ``name``, or None while it does not answer."""
    try:
        actor = get_named(name)
        return psutil.Process(ray.get(actor.where.remote(), timeout=10)["pid"])
    except Exception:  # not started yet, being replaced, or gone at the end of the run
        return None


def running(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--driver-pid-file", type=Path, required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    Path(args.ready_file).touch()
    deadline = time.monotonic() + args.timeout
    # the file may exist before its pid is written: wait for its text
    while not (args.driver_pid_file.exists() and args.driver_pid_file.read_text().strip()) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    driver = psutil.Process(int(args.driver_pid_file.read_text()))
    names = [f"partition-{p}" for p in range(args.partitions)]
    while not registered(names) and running(driver) and time.monotonic() < deadline:
        time.sleep(0.005)
    before_reading, started = memory_of(driver), time.monotonic()
    actors: dict[str, psutil.Process] = {}
    samples: list[dict[str, Any]] = []
    while running(driver) and time.monotonic() < deadline:
        for name in names:
            if name not in actors or not actors[name].is_running():
                found = actor_process(name)
                if found is not None:
                    actors[name] = found
        sample = {"t": round(time.monotonic() - started, 3), "driver": memory_of(driver)}
        if len(actors) == len(names):
            sample["actors"] = {name: memory_of(process) for name, process in actors.items()}
            if not all(sample["actors"].values()):  # an actor ended: the run is closing
                del sample["actors"]
        if sample["driver"] is not None:
            samples.append(sample)
        time.sleep(args.interval)
    print(json.dumps({"before_reading": before_reading, "samples": samples,
                      "actor_pids": {n: p.pid for n, p in actors.items()}}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
