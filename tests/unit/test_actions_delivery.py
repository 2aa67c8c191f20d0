"""Deliveries against real receivers on 127.0.0.1 (HTTP, SMTP), in-process runs of the
example events with action rules: dead letters and ``eventray actions retry``, SSRF
refusals, 410, ``Retry-After``, the breaker, and the other kinds."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.job import run_in_process
from pipelines.action_rules import ActionRuleSpec
from pipelines.actions.kinds import ACTION_KINDS, Action, ActionKind, DeliveryContext, Sent
from pipelines.actions.receiver import Behaviour, Receiver, new_secret
from pipelines.pipeline import load_pipeline, validate_spec
from pipelines.store import EventStore
from tests.support import ROOT, eventray, summary_of

LOGINS = 7  # user.login events stored from examples/events.jsonl
FAST_RETRY = {"attempts": 3, "initial_delay": 0.01, "max_delay": 0.05}


def run_with(tmp_path: Path, *rules: dict[str, Any], allow_hosts: list[str] | None = None,
             concurrency: int = 64) -> dict[str, Any]:
    raw = load_pipeline(ROOT / "configs" / "events.yaml").model_dump(by_alias=True, exclude_unset=True)
    raw["source"]["path"] = [str(ROOT / "examples" / "events.jsonl")]
    raw["actions"] = {"rules": list(rules), "concurrency": concurrency,
                      "dispatchers": 1 if concurrency == 1 else 2,
                      **({"allow_hosts": allow_hosts} if allow_hosts else {})}
    return run_in_process(validate_spec(raw, "events with actions"), tmp_path / "store")


def hook(url: str, **changes: Any) -> dict[str, Any]:
    return {"name": "logins", "event_types": ["user.login"], "kind": "webhook", "url": url,
            "timeout": 2, "retry": FAST_RETRY, **changes}


def table(tmp_path: Path, name: str) -> pl.DataFrame:
    return EventStore(tmp_path / "store").scan(name).collect()


def test_always_500_dead_letters_and_actions_retry_delivers_once_it_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    monkeypatch.setenv("LOGIN_HOOK_SECRET", secret)
    with Receiver(secret, Behaviour(fail_rate=1.0)) as receiver:
        summary = run_with(tmp_path, hook(receiver.url, secret_env="LOGIN_HOOK_SECRET"))
        assert summary["actions"] | {"dispatch_ms": None} == {
            "actions": LOGINS, "delivered": 0, "dead_lettered": LOGINS, "pending": 0,
            "dispatch_ms": None, "dispatcher_restarts": 0}
        assert receiver.received.requests == 3 * LOGINS and not receiver.received.accepted
        parked = table(tmp_path, "actions_deadletter")
        assert parked.height == LOGINS and set(parked["reason"]) == {"retries_exhausted"}
        assert set(parked["attempts"]) == {3} and set(parked["error"]) == {"HTTP 500"}

        receiver.behaviour.fail_rate = 0.0  # the receiver recovers
        env = {"LOGIN_HOOK_SECRET": secret}
        retried = summary_of(eventray("actions", "retry", "--store", str(tmp_path / "store"), env=env))
        assert retried == {"retried": LOGINS, "delivered": LOGINS, "dead_lettered": 0}
        assert sorted(receiver.received.accepted) == sorted(parked["action_id"])
        assert receiver.received.bad_signatures == 0
        again = summary_of(eventray("actions", "retry", "--store", str(tmp_path / "store"), env=env))
        assert again == {"retried": 0, "delivered": 0, "dead_lettered": 0}  # never twice
    attempts = table(tmp_path, "action_attempts")
    assert attempts.filter(pl.col("status") == "delivered").height == LOGINS
    secret_bytes = secret.removeprefix("whsec_").encode()
    assert not any(secret_bytes in p.read_bytes() for p in (tmp_path / "store").rglob("*.parquet"))


def test_retry_takes_a_rule_and_a_time(tmp_path: Path) -> None:
    with Receiver(None, Behaviour(fail_rate=1.0)) as receiver:
        run_with(tmp_path, hook(receiver.url), {**hook(receiver.url), "name": "orders",
                                                "event_types": ["order.placed"]})
        receiver.behaviour.fail_rate = 0.0
        store = str(tmp_path / "store")
        later = summary_of(eventray("actions", "retry", "--store", store, "--since", "2999-01-01"))
        assert later["retried"] == 0
        only = summary_of(eventray("actions", "retry", "--store", store, "--rule", "orders"))
        assert only == {"retried": 6, "delivered": 6, "dead_lettered": 0}  # 6 orders stored
        bad = eventray("actions", "retry", "--store", store, "--since", "tuesday")
        assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr


def test_a_url_templated_outside_the_allow_list_is_never_called(tmp_path: Path) -> None:
    with Receiver(None) as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        # the key fills the host: an attacker-chosen event could aim anywhere
        summary = run_with(tmp_path, hook(f"http://{{key}}:{port}/x"), allow_hosts=["127.0.0.1"])
        assert receiver.received.requests == 0
    parked = table(tmp_path, "actions_deadletter")
    assert summary["actions"]["dead_lettered"] == LOGINS and set(parked["reason"]) == {"host_not_allowed"}
    assert set(table(tmp_path, "action_attempts")["status"]) == {"refused"}


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    with Receiver(None, Behaviour(location="http://169.254.169.254/latest/meta-data")) as receiver:
        run_with(tmp_path, hook(receiver.url))
        assert receiver.received.requests == LOGINS  # one each, none to the redirect's target
    assert set(table(tmp_path, "actions_deadletter")["reason"]) == {"redirect_refused"}


def test_410_stops_deliveries_to_the_endpoint(tmp_path: Path) -> None:
    with Receiver(None, Behaviour(fail_rate=1.0, fail_status=410)) as receiver:
        run_with(tmp_path, hook(receiver.url), concurrency=1)
        assert receiver.received.requests == 1  # the first answered 410; the rest never sent
    parked = table(tmp_path, "actions_deadletter")
    assert parked.height == LOGINS and set(parked["reason"]) == {"gone"}


def test_retry_after_on_429_is_honoured(tmp_path: Path) -> None:
    with Receiver(None, Behaviour(fail_rate=1.0, fail_status=429, retry_after="1")) as receiver:
        run_with(tmp_path, hook(receiver.url, where="event_id = 'ee62ebf7-4d34-5db7-990f-50ea73c453aa'",
                                retry={"attempts": 2, "initial_delay": 0.01, "max_delay": 5}))
        assert receiver.received.requests == 2
    times = table(tmp_path, "action_attempts").sort("attempt")["attempted_at"]
    assert (times[1] - times[0]).total_seconds() >= 1.0  # waited as asked, not 10 ms


def test_an_open_breaker_keeps_actions_pending_until_their_budget_runs_out(tmp_path: Path) -> None:
    with Receiver(None, Behaviour(fail_rate=1.0)) as receiver:
        run_with(tmp_path, hook(receiver.url, breaker={"failures": 2, "reset": "1h"},
                                retry={"attempts": 4, "initial_delay": 0.01, "max_delay": 0.02}),
                 concurrency=1)
        assert receiver.received.requests == 2  # then the breaker opened for the rest
    attempts = table(tmp_path, "action_attempts")
    assert attempts.filter(pl.col("status") == "breaker_open").height == 4 * LOGINS - 2
    assert table(tmp_path, "actions_deadletter").height == LOGINS


def test_notify_by_email_through_a_real_smtp_server(tmp_path: Path) -> None:
    import mailbox
    import subprocess
    import sys
    import time

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # aiosmtpd's own server in a process of its own, delivering into a Maildir
    server = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                               "-c", "aiosmtpd.handlers.Mailbox", str(tmp_path / "maildir")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        summary = run_with(tmp_path, {
            "name": "mail", "event_types": ["order.placed"], "kind": "notify", "channel": "email",
            "smtp": f"127.0.0.1:{port}", "to": ["risk@example.org"]})
    finally:
        server.terminate()
        server.wait(timeout=30)
    messages = list(mailbox.Maildir(tmp_path / "maildir", create=False))
    assert summary["actions"]["delivered"] == 6
    assert len(messages) == 6 and {m["To"] for m in messages} == {"risk@example.org"}
    ids = {m["Message-ID"].strip("<>").split("@")[0] for m in messages}
    assert ids == set(table(tmp_path, "actions")["action_id"])  # the receiver's dedup key


def test_notify_by_chat(tmp_path: Path) -> None:
    with Receiver(None) as chat:
        summary = run_with(tmp_path, {"name": "chat", "event_types": ["user.login"], "kind": "notify",
                                      "url": chat.url})
        texts = [body["text"] for body in chat.received.accepted.values()]
    assert summary["actions"]["delivered"] == LOGINS
    assert len(texts) == LOGINS and all(t.startswith("[chat] user.login for ") for t in texts)


def test_workflow_command_events_and_state_updates_take_effect_in_the_partition(tmp_path: Path) -> None:
    summary = run_with(
        tmp_path,
        {"name": "open-case", "event_types": ["user.login"], "kind": "workflow", "event_type": "case.opened"},
        {"name": "block", "event_types": ["order.placed"], "kind": "update", "table": "blocked_users",
         "fields": ["user"], "params": {"reason": "review", "ttl_s": 3600}})
    events = table(tmp_path, "events")
    cases = events.filter(pl.col("event_type") == "case.opened")
    logins = events.filter(pl.col("event_type") == "user.login")
    assert cases.height == LOGINS and set(cases["key"]) == set(logins["key"])
    assert set(cases["source"]) == {"action:open-case"}
    blocked = EventStore(tmp_path / "store").scan("blocked_users").sort("timestamp") \
        .group_by("key").last().collect()  # the current state: the last row per key
    orders = events.filter(pl.col("event_type") == "order.placed")
    assert blocked.height == orders["key"].n_unique() and set(blocked["reason"]) == {"review"}
    assert set((blocked["until"] - blocked["since"]).dt.total_seconds()) == {3600}
    assert blocked.join(orders.group_by("key").agg(pl.col("timestamp").max()), on=["key", "timestamp"]) \
        .height == blocked.height  # each key's row is its latest order's
    assert summary["derived"] == LOGINS and "actions" in summary


CALLS: list[dict[str, Any]] = []
LOCK = threading.Lock()


def record_call(action: dict[str, Any]) -> None:
    """A workflow task: records the action it was called with."""
    with LOCK:
        CALLS.append(action)


class MemoKind(ActionKind):
    """A user's action kind: remembers what it was sent."""

    sent: list[str] = []

    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        MemoKind.sent.append(action.action_id)
        return Sent(200)


def test_workflow_tasks_and_plugin_kinds_are_delivered(tmp_path: Path) -> None:
    ACTION_KINDS.register("memo", MemoKind)
    CALLS.clear()
    summary = run_with(
        tmp_path,
        {"name": "task", "event_types": ["iot.reading"], "kind": "workflow",
         "task": "tests.unit.test_actions_delivery:record_call"},
        {"name": "memo", "event_types": ["order.placed"], "kind": "memo"})
    assert summary["actions"]["delivered"] == 7 + 6
    assert len(CALLS) == 7 and {c["event_type"] for c in CALLS} == {"iot.reading"}
    assert json.dumps(CALLS[0]["body"]) and len(MemoKind.sent) == 6


def test_a_rerun_into_the_same_store_never_sends_an_acknowledged_action_again(tmp_path: Path) -> None:
    with Receiver(None) as receiver:
        first = run_with(tmp_path, hook(receiver.url))
        again = run_with(tmp_path, hook(receiver.url))  # the same run id: its files rewritten
        assert receiver.received.requests == LOGINS
    assert first["run"] == again["run"] and again["actions"]["delivered"] == LOGINS


def test_a_rule_rate_limit_spaces_its_deliveries(tmp_path: Path) -> None:
    with Receiver(None) as receiver:
        run_with(tmp_path, hook(receiver.url, rate_limit="2/s"), concurrency=1)
        assert len(receiver.received.accepted) == LOGINS
    times = table(tmp_path, "action_attempts").sort("attempted_at")["attempted_at"]
    # a burst of 2, then 2 a second: 7 deliveries span at least 2 s (unlimited: milliseconds)
    assert (times[-1] - times[0]).total_seconds() >= 2.0
