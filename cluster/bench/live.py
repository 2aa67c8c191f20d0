"""``eventray bench --live``: the decision path measured from outside, as a client sees it.

``eventray serve`` runs as its own process (embedded Ray, the ingress actor, the
partitions); the load generator (:mod:`cluster.produce`) offers single-event ``POST
/score`` requests open loop at each rate and takes every figure client-side. The run is
then drained with SIGTERM and the store's files counted. The machine's load average is
reported with each step: on a shared 2-core machine it says how much of the latency is
the neighbours'.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.produce import run_open_loop, simulated_events

#: The warm-up before the measured rates: 10 s at 20 requests/s.
WARMUP_EVENTS, WARMUP_RATE = 200, 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(port: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {process.communicate()[1][-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("serve did not become ready")


def bench_live(config: Path, work: Path, rates: tuple[float, ...], seconds: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Serve ``config``, offer ``/score`` at each rate for ``seconds``; the figures."""
    store, port, token = work / "live-store", _free_port(), secrets.token_hex(16)
    # a store left by an earlier bench would be resumed: the same simulated ids, all
    # duplicates then, answered at once and stored not at all
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "EVENTRAY_TOKEN": token, "PYTHONWARNINGS": "ignore"}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    eventray = str(Path(sys.executable).parent / "eventray")
    process = subprocess.Popen(
        [eventray, "serve", str(config), "--store", str(store), "--port", str(port),
         "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    steps = []
    try:
        _wait_ready(port, process)
        # warm-up, not counted: the actors' first batches load the model and compile plans
        warm = [json.dumps(e).encode() for e in simulated_events(WARMUP_EVENTS, seed=12)]
        run_open_loop(f"http://127.0.0.1:{port}/score", warm, WARMUP_RATE, token)
        offset = 0
        for rate in rates:
            count = int(rate * seconds)
            events = simulated_events(offset + count, seed=11)[offset:]
            offset += count
            bodies = [json.dumps(e).encode() for e in events]
            log(f"/score at {rate:g}/s for {seconds:g} s")
            load = os.getloadavg()[0]
            figures = run_open_loop(f"http://127.0.0.1:{port}/score", bodies, rate, token)
            steps.append({**figures, "load_average": round(load, 1)})
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=600)
    summary = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else {"error": err[-2000:]}
    files = {table.name: len(list(table.glob("event_type=*/date=*/*.parquet")))
             for table in store.iterdir() if not table.name.startswith("_") and table.is_dir()}
    return {"score": steps, "serve": summary, "store_files": files}
