"""A real webhook receiver on 127.0.0.1, for tests and benchmarks of actions (part of the
testing kit): flaky on demand, and deduplicating by ``webhook-id`` as the Standard Webhooks
spec asks receivers to.

Each request is verified with the shared secret (``standardwebhooks``), then, unless its
``webhook-id`` was accepted before (answered 200 again, counted as a duplicate), it is
failed with ``fail_status`` with probability ``fail_rate``, or accepted; an accepted one is
answered only after ``slow_s`` with probability ``slow_rate`` (past the sender's timeout:
the sender sees a failure and resends, the receiver has it already).
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class Behaviour:
    fail_rate: float = 0.0
    fail_status: int = 500
    slow_rate: float = 0.0
    slow_s: float = 0.0
    retry_after: str | None = None
    location: str | None = None  # answer every request with a redirect here
    seed: int = 0


@dataclass
class Received:
    accepted: dict[str, dict] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    bad_signatures: int = 0
    statuses: Counter = field(default_factory=Counter)
    paths: Counter = field(default_factory=Counter)


class Receiver:
    """``with Receiver(secret, Behaviour(...)) as hook: ... hook.url``"""

    def __init__(self, secret: str | None, behaviour: Behaviour | None = None) -> None:
        self.secret, self.behaviour = secret, behaviour or Behaviour()
        self.received = Received()
        self.lock = threading.Lock()
        self.random = random.Random(self.behaviour.seed)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fraud"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, headers: dict[str, str], body: bytes) -> tuple[int, float, dict[str, str]]:
        """(status, delay, extra headers) for one request; records what it accepts."""
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        behaviour, got = self.behaviour, self.received
        with self.lock:
            got.requests += 1
            if self.secret is not None:
                try:
                    Webhook(self.secret).verify(body, headers)
                except WebhookVerificationError:
                    got.bad_signatures += 1
                    return 401, 0.0, {}
            if behaviour.location is not None:
                return 307, 0.0, {"location": behaviour.location}
            hook_id = headers.get("webhook-id", "")
            if hook_id in got.accepted:
                got.duplicates += 1
                return 200, 0.0, {}
            if self.random.random() < behaviour.fail_rate:
                extra = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
                return behaviour.fail_status, 0.0, extra
            got.accepted[hook_id] = json.loads(body)
            slow = self.random.random() < behaviour.slow_rate
            return 200, behaviour.slow_s if slow else 0.0, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, delay, extra = receiver.decide(headers, body)
                with receiver.lock:
                    receiver.received.statuses[status] += 1
                    receiver.received.paths[self.path] += 1
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting: nothing to answer
                    pass

            def log_message(self, *args: object) -> None:
                pass

        return Handler
