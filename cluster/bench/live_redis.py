"""``eventray bench --live``, Redis part: from ``XADD`` to the decision, and to the store.

``eventray serve`` of the Redis config runs as its own process against a redis-server this
bench starts on 127.0.0.1. Every figure is taken client-side, in this process:

1. **Peak.** A burst of events is added as fast as the server takes them; the peak is the
   burst over the time until its last decision is in the stream of decisions
   (``source.decisions_stream``, where the partitions add each decision as it is made).
2. **Decision latency at 20 % of peak**, open loop: each event is added at its scheduled
   time, one ``XADD`` each; its latency runs from that time to the moment its decision is
   read from the stream of decisions (``XREAD BLOCK``), so a stalled server is not hidden
   by a producer that waits for it.
3. **Commit lag** of the same events: from the scheduled time to when the event is in a
   committed file of the store's ``events`` table (the store is listed every
   :data:`STORE_POLL_S`, so the lag is known to that much).

The run is then drained with SIGTERM; the group must have no pending entries left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from cluster.bench.servers import Server, start_redis
from cluster.produce import simulated_events, without_collection_pauses

#: How often the store's committed files are listed for the commit lag.
STORE_POLL_S = 0.05
#: Events of the warm-up (not counted: the actors load the model, plans are compiled).
WARMUP_EVENTS = 300
#: Events of the burst that measures the peak.
PEAK_EVENTS = 20_000
#: The share of the peak offered while latencies are taken.
LOAD_SHARE = 0.2
STREAM, DECISIONS, GROUP = "transactions", "transactions.decisions", "eventray"


class DecisionReader(threading.Thread):
    """Reads the stream of decisions as they come; ``seen`` maps an event id to when its
    first decision was read (``time.perf_counter``)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(url)
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stopping.is_set():
            reply = self.client.xread({DECISIONS: last}, count=10_000, block=100)
            now = time.perf_counter()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.seen.setdefault(fields[b"event_id"].decode(), now)
                    last = entry_id

    def wait_for(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in self.seen for i in ids):
                return True
            time.sleep(0.02)
        return False


class StoreWatcher(threading.Thread):
    """Lists the store's ``events`` files every :data:`STORE_POLL_S`; ``seen`` maps an event
    id to when the first file holding it was found (a file appears whole: it is renamed
    into place once written and fsynced)."""

    def __init__(self, store: Path) -> None:
        super().__init__(daemon=True)
        self.folder = store / "events"
        self.seen: dict[str, float] = {}
        self.files: set[Path] = set()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.perf_counter()
            for path in set(self.folder.glob("event_type=*/date=*/*.parquet")) - self.files:
                self.files.add(path)
                for event_id in pq.read_table(path, columns=["event_id"]).column(0).to_pylist():
                    self.seen.setdefault(event_id, now)
            time.sleep(STORE_POLL_S)


def _config_for(config: Path, server: Server, work: Path) -> Path:
    """The config with the bench's server, stream and stream of decisions (its relative
    paths still found from the original's folder)."""
    raw = yaml.safe_load(config.read_text())
    raw["source"].update(url=server.url, stream=STREAM, group=GROUP, decisions_stream=DECISIONS)
    raw.setdefault("search_path", [str(config.resolve().parent), os.getcwd()])
    copy = work / "live-redis-bench.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def _wait_for_group(client: Any, process: subprocess.Popen, timeout: float = 300) -> None:
    """The run is ready once its source has created the consumer group (after its
    partitions started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {process.communicate()[1][-2000:]}")
        if client.exists(STREAM) and any(g["name"] == GROUP.encode() for g in client.xinfo_groups(STREAM)):
            return
        time.sleep(0.2)
    raise RuntimeError("serve did not create its consumer group")


def _add_open_loop(client: Any, lines: list[bytes], rate: float) -> list[float]:
    """``XADD`` each line at its scheduled time; returns the scheduled times."""
    with without_collection_pauses():
        start = time.perf_counter() + 0.05
        due = [start + i / rate for i in range(len(lines))]
        for at, line in zip(due, lines, strict=True):
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            client.xadd(STREAM, {"event": line})
    return due


def _percentiles(ms: np.ndarray) -> dict[str, float | None]:
    if ms.size == 0:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2), "max": round(float(ms.max()), 2)}


def bench_live_redis(config: Path, work: Path, seconds: float,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Serve ``config`` (a Redis source) against a redis-server of its own; the peak, the
    decision latency at 20 % of it and the store's commit lag, taken client-side."""
    import redis

    server = start_redis(work / "redis")
    store = work / "live-redis-store"
    shutil.rmtree(store, ignore_errors=True)  # not resumed: its ids would all be duplicates
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    eventray = str(Path(sys.executable).parent / "eventray")
    process = subprocess.Popen(
        [eventray, "serve", str(_config_for(config, server, work)), "--store", str(store),
         "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    client = redis.Redis.from_url(server.url)
    decisions, watcher = DecisionReader(server.url), StoreWatcher(store)
    figures: dict[str, Any] = {}
    try:
        _wait_for_group(client, process)
        decisions.start()
        watcher.start()
        events = [json.dumps(e).encode() for e in simulated_events(
            WARMUP_EVENTS + PEAK_EVENTS + int(5_000 * seconds), seed=21)]
        ids = [json.loads(line)["eventId"] for line in events]
        _add_open_loop(client, events[:WARMUP_EVENTS], 100.0)
        if not decisions.wait_for(ids[:WARMUP_EVENTS], timeout=120):
            raise RuntimeError("the warm-up's decisions did not all come within 120 s")
        log(f"redis: peak, a burst of {PEAK_EVENTS:,} events")
        burst = slice(WARMUP_EVENTS, WARMUP_EVENTS + PEAK_EVENTS)
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for line in events[burst]:
            pipe.xadd(STREAM, {"event": line})
        pipe.execute()
        if not decisions.wait_for(ids[burst], timeout=600):
            raise RuntimeError("the burst's decisions did not all come within 600 s")
        peak = PEAK_EVENTS / (max(decisions.seen[i] for i in ids[burst]) - started)
        rate = max(1.0, LOAD_SHARE * peak)
        count = int(rate * seconds)
        measured = slice(burst.stop, burst.stop + count)
        log(f"redis: {rate:,.0f} events/s ({LOAD_SHARE:.0%} of a peak of {peak:,.0f}/s) "
            f"for {seconds:g} s")
        load = os.getloadavg()[0]
        due = _add_open_loop(client, events[measured], rate)
        decisions.wait_for(ids[measured], timeout=120)
        time.sleep(3 * STORE_POLL_S + 2.0)  # the last commit interval, and one more listing
        latency = np.array([(decisions.seen[i] - t) * 1000 for i, t in zip(ids[measured], due, strict=True)
                            if i in decisions.seen])
        lag = np.array([(watcher.seen[i] - t) * 1000 for i, t in zip(ids[measured], due, strict=True)
                        if i in watcher.seen])
        figures = {"peak_events_per_s": round(peak, 1), "offered_per_s": round(rate, 1),
                   "events": count, "decided": int(latency.size), "committed": int(lag.size),
                   "decision_ms": _percentiles(latency), "commit_lag_ms": _percentiles(lag),
                   "load_average": round(load, 1)}
    finally:
        decisions.stopping.set()
        watcher.stopping.set()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=600)
        pending = client.xpending(STREAM, GROUP)["pending"] if client.exists(STREAM) else None
        client.close()
        server.stop()
    summary = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else {"error": err[-2000:]}
    return {**figures, "pending_after_drain": pending, "serve": summary}
