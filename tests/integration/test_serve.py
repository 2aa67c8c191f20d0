"""`eventray serve configs/live.yaml` as a user runs it: a subprocess, real HTTP, real
SIGTERM, then the store read back with Polars."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pytest

from cluster.produce import simulated_events
from tests.support import EVENTRAY, ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(port: int, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Served:
    """A running `eventray serve` subprocess."""

    def __init__(self, config: Path, store: Path) -> None:
        self.port, self.store = free_port(), store
        self.process = subprocess.Popen(
            [EVENTRAY, "serve", str(config), "--store", str(store), "--port", str(self.port),
             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "EVENTRAY_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "PYTHONWARNINGS": "ignore"},
            start_new_session=True)  # the signal goes to serve alone, as `kill PID` sends it

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise AssertionError("serve did not become ready")

    def terminate(self, timeout: float = 180) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(ROOT / "configs" / "live.yaml", tmp_path / "store")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


def malformed_events(count: int) -> list[Any]:
    """Events the run must dead-letter, each for a stated reason."""
    kinds = [
        lambda i: {"eventId": f"bad-{i}", "eventType": "transaction.created",
                   "timestamp": "not a time", "data": {"CUSTOMER_ID": 1}},
        lambda i: {"eventId": f"bad-{i}", "timestamp": "2018-04-01T00:00:00Z", "data": {}},
        lambda i: {"eventId": f"bad-{i}", "eventType": "transaction.created",
                   "timestamp": "2018-04-01T00:00:00Z", "data": {"TX_AMOUNT": "lots"}},
        lambda i: [i],
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def test_serve_accepts_durably_and_stores_each_event_once(served: Served) -> None:
    port = served.port
    assert post(port, "/events", b"[]", token=None)[0] == 401
    assert post(port, "/events", b"[]", token="wrong")[0] == 401
    assert post(port, "/events", b"[" + b" " * (2 << 20) + b"]")[0] == 413

    events = simulated_events(10_000, seed=3)
    statuses = []
    for start in range(0, len(events), 100):
        statuses.append(post(port, "/events", json.dumps(events[start:start + 100]).encode()))
    retried = post(port, "/events", json.dumps(events[:100]).encode())  # a client's retry
    bad = post(port, "/events", "\n".join(json.dumps(e) for e in malformed_events(100)).encode())
    assert all(status == 202 for status, _ in [*statuses, retried, bad])
    assert all(answer["accepted"] == 100 for _, answer in statuses)
    assert bad[1]["accepted"] == 0
    assert len(bad[1]["dead_lettered"]) == 100
    assert {d["reason"] for d in bad[1]["dead_lettered"]} >= {"bad_timestamp", "missing_event_type",
                                                              "not_an_object"}

    decided = simulated_events(10_001, seed=4)[-1]
    decided["timestamp"], decided["data"]["TX_DATETIME"] = "2019-01-01T00:00:00Z", "2019-01-01T00:00:00"
    status, answer = post(port, "/score", json.dumps(decided).encode())
    assert status == 200, answer
    assert answer["event_id"] == decided["eventId"]
    assert answer["scores"][0]["step"] == "fraud" and "model" in answer["scores"][0], answer
    assert answer["latency_ms"] > 0
    late = {**decided, "eventId": "late-one", "timestamp": "2018-12-31T00:00:00Z"}
    assert post(port, "/score", json.dumps(late).encode())[1]["late"] is True
    assert post(port, "/score", json.dumps(decided).encode())[1]["duplicate"] is True

    summary = served.terminate()
    assert summary["duplicates"] == 101
    assert summary["checkpoints"] >= 1
    stored = pl.scan_parquet(served.store / "events" / "**" / "*.parquet",
                             hive_partitioning=True).filter(  # not the alerts' derived events
        pl.col("event_type") == "transaction.created").select("event_id").collect()
    expected = {e["eventId"] for e in events} | {decided["eventId"], "late-one"}
    assert stored.height == len(expected)
    assert set(stored["event_id"].to_list()) == expected
    dead = pl.scan_parquet(served.store / "deadletter" / "**" / "*.parquet",
                           hive_partitioning=True).collect()
    assert dead.height == 100
    assert dead["reason"].null_count() == 0
    assert not list((served.store / "_journal" / "events").glob("seg-*.ndjson"))[1:]


def unchained(tmp_path: Path) -> Path:
    """``configs/live.yaml`` with its operators in actors of their own (``runtime.chain:
    false``): the driver reads the journal and hands batches to the stage and partition
    actors, as a run with more partitions does."""
    text = (ROOT / "configs" / "live.yaml").read_text()
    assert "  chain: true\n" in text
    config = tmp_path / "live.yaml"
    config.write_text(text.replace("  chain: true\n", "  chain: false\n"))
    return config


def wait_for_checkpoint(store: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((store / "_checkpoints").rglob("manifest-*.json")):
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)


def stored_transactions(store: Path) -> pl.Series:
    stored = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    return stored.filter(pl.col("event_type") == "transaction.created").select(
        "event_id").collect()["event_id"]


def test_a_killed_serve_resumes_from_its_journal_and_stores_each_event_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    events = simulated_events(3_000, seed=5)
    first = Served(unchained(tmp_path), store)
    try:
        first.wait_ready()
        for start in range(0, 2_000, 100):
            assert post(first.port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
        wait_for_checkpoint(store)
        for start in range(2_000, 2_500, 100):  # accepted after the checkpoint, then the crash
            assert post(first.port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
        os.killpg(first.process.pid, signal.SIGKILL)  # the driver and its Ray, no clean-up
        first.process.communicate()
    finally:
        first.kill()
    second = Served(unchained(tmp_path), store)
    try:
        second.wait_ready()
        for start in range(2_400, 3_000, 100):  # a client retries its last unanswered POST
            assert post(second.port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
        summary = second.terminate()
    finally:
        second.kill()
    assert summary["resumed"] is True
    ids = stored_transactions(store)
    assert ids.len() == ids.n_unique() == 3_000
    assert set(ids.to_list()) == {e["eventId"] for e in events}


def chain_actor(served: Served) -> psutil.Process:
    """The chained run's actor process among the serve's own (its embedded Ray's workers)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for process in psutil.Process(served.process.pid).children(recursive=True):
            try:
                if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::ChainedRun"):
                    return process
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError("no ray::ChainedRun process under serve")


def test_a_killed_chain_actor_is_replaced_and_each_event_is_stored_once(served: Served) -> None:
    """`configs/live.yaml` runs chained: its one actor killed mid-stream, the driver starts
    another from the last checkpoint; what the ingress accepted meanwhile, and a /score
    asked then, are decided by the replacement, and the store holds each event once."""
    events = simulated_events(3_001, seed=6)
    port = served.port
    for start in range(0, 2_000, 100):
        assert post(port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
    wait_for_checkpoint(served.store)
    for start in range(2_000, 2_500, 100):
        assert post(port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
    victim = chain_actor(served)
    victim.kill()
    victim.wait(timeout=30)
    for start in range(2_500, 3_000, 100):  # accepted while the chain is down: durable
        assert post(port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
    status, answer = post(port, "/score", json.dumps(events[3_000]).encode())
    assert status == 200 and answer["event_id"] == events[3_000]["eventId"], answer
    assert answer["scores"][0]["step"] == "fraud", answer
    assert chain_actor(served).pid != victim.pid
    summary = served.terminate()
    assert summary["restarts"] == 1
    ids = stored_transactions(served.store)
    assert ids.len() == ids.n_unique() == 3_001
    assert set(ids.to_list()) == {e["eventId"] for e in events}
    assert summary["stored"] >= 3_001 and summary["dead_lettered"] == 0


def test_a_stalled_chain_actor_is_replaced_and_each_event_is_stored_once(tmp_path: Path) -> None:
    """The chained actor's process stopped (SIGSTOP: alive, answering nothing) mid-stream:
    after ``runtime.batch_timeout_s`` without its loop turning the driver replaces it from
    the last checkpoint, a /score asked then is answered by the replacement, and the store
    holds each event once."""
    text = (ROOT / "configs" / "live.yaml").read_text()
    assert "  chain: true\n" in text
    config = tmp_path / "live.yaml"
    config.write_text(text.replace("  chain: true\n", "  chain: true\n  batch_timeout_s: 3\n"))
    served = Served(config, tmp_path / "store")
    try:
        served.wait_ready()
        events = simulated_events(1_501, seed=8)
        for start in range(0, 1_000, 100):
            assert post(served.port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
        wait_for_checkpoint(served.store)
        victim = chain_actor(served)
        victim.suspend()
        for start in range(1_000, 1_500, 100):  # accepted while the chain is stopped: durable
            assert post(served.port, "/events", json.dumps(events[start:start + 100]).encode())[0] == 202
        deadline = time.monotonic() + 120
        while chain_actor(served).pid == victim.pid:
            assert time.monotonic() < deadline, "the stopped chain actor was not replaced"
            time.sleep(0.5)
        status, answer = post(served.port, "/score", json.dumps(events[1_500]).encode())
        assert status == 200 and answer["scores"][0]["step"] == "fraud", answer
        served.process.send_signal(signal.SIGTERM)
        out, err = served.process.communicate(timeout=180)
    finally:
        served.kill()
    assert served.process.returncode == 0, err[-3000:]
    assert "made no progress for runtime.batch_timeout_s = 3 s" in err, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["restarts"] == 1
    ids = stored_transactions(served.store)
    assert ids.len() == ids.n_unique() == 1_501
    assert set(ids.to_list()) == {e["eventId"] for e in events}


def test_a_chained_runs_own_error_ends_serve_in_one_line(tmp_path: Path) -> None:
    """The run inside the chain actor fails (its Redis server is not there): serve exits 2
    with the run's own error in one line, as the unchained driver does, not a traceback
    and not an actor replaced again and again."""
    text = (ROOT / "configs" / "live-redis.yaml").read_text()
    assert "url: redis://127.0.0.1:6379" in text and "  max_in_flight: 1\n" in text
    config = tmp_path / "live-redis.yaml"
    config.write_text(text.replace("url: redis://127.0.0.1:6379", f"url: redis://127.0.0.1:{free_port()}")
                      .replace("  max_in_flight: 1\n", "  max_in_flight: 1\n  chain: true\n"))
    done = subprocess.run([EVENTRAY, "serve", str(config), "--store", str(tmp_path / "store"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("eventray serve: error:")]
    assert len(errors) == 1 and "redis://127.0.0.1" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "died" not in done.stderr
