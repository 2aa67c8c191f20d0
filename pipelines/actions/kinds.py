"""Action kinds that reach outside: how one attempt of one action is made.

A kind is an :class:`ActionKind` with one coroutine, :meth:`ActionKind.send`, which makes
a single attempt and returns a :class:`Sent` (or raises :class:`DeliveryFailed`); retries,
breakers, rate limits and the record of attempts are the dispatcher's
(:mod:`pipelines.actions.dispatch`). Built in: ``webhook`` (an HTTP POST signed per
Standard Webhooks), ``notify`` (a chat-style JSON webhook, or an email over SMTP) and
``workflow`` with ``task`` (a function ``module:function`` called with the action, as a Ray
task where the dispatcher runs on Ray). Installed packages add kinds through the
``eventray.actions`` entry-point group, like step kinds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import smtplib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx

from pipelines.action_rules import ActionRuleSpec
from pipelines.errors import PipelineError
from pipelines.plugins import PluginRegistry, import_path


class DeliveryFailed(PipelineError):
    """One attempt failed. ``retryable``: another attempt may succeed; ``retry_after``:
    seconds the target asked to wait; ``reason``: the dead-letter reason if it is the last.
    The message never holds a secret (it names what failed, not the request)."""

    def __init__(self, message: str, *, retryable: bool, reason: str = "retries_exhausted",
                 status: int | None = None, retry_after: float | None = None,
                 attempt_status: str = "failed") -> None:
        super().__init__(message)
        self.retryable, self.reason, self.status = retryable, reason, status
        self.retry_after, self.attempt_status = retry_after, attempt_status


@dataclass(frozen=True)
class Sent:
    """A successful attempt: the target's status code (2xx for HTTP, 250 for SMTP)."""

    status: int | None = None


@dataclass(frozen=True)
class Action:
    """One outbox row as a dispatcher handles it."""

    action_id: str
    rule: str
    kind: str
    event_id: str
    event_type: str
    timestamp: dt.datetime
    key: str
    decided_at: dt.datetime
    url: str | None
    body: str
    target: str

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Action:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass
class DeliveryContext:
    """What a kind sends with: the HTTP client, the signing secrets by variable name, the
    clock and a runner for workflow tasks."""

    client: httpx.AsyncClient
    secrets: Mapping[str, str]
    clock: Callable[[], dt.datetime]
    run_task: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None


class ActionKind(ABC):
    """How one attempt of an action of this kind is made."""

    @abstractmethod
    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        """Make one attempt; raise :class:`DeliveryFailed` when it fails."""


def signed_headers(action: Action, body: bytes, secret: str | None, now: dt.datetime) -> dict[str, str]:
    """Standard Webhooks headers: ``webhook-id`` (the action's id: the idempotency key),
    ``webhook-timestamp`` and, with a secret, ``webhook-signature`` (``v1,<base64>``)."""
    headers = {"webhook-id": action.action_id, "webhook-timestamp": str(int(now.timestamp())),
               "content-type": "application/json"}
    if secret:
        from standardwebhooks.webhooks import Webhook

        headers["webhook-signature"] = Webhook(secret).sign(action.action_id, now, body)
    return headers


def _http_failure(response: httpx.Response, now: dt.datetime) -> DeliveryFailed:
    from pipelines.action_rules import retry_after_seconds

    code = response.status_code
    if code == 410:
        return DeliveryFailed("410 Gone: the endpoint asked not to be called again",
                              retryable=False, reason="gone", status=code, attempt_status="refused")
    if 300 <= code < 400:
        return DeliveryFailed(f"{code} redirect not followed", retryable=False,
                              reason="redirect_refused", status=code, attempt_status="refused")
    if code in (408, 425, 429) or code >= 500:
        wait = retry_after_seconds(response.headers.get("retry-after"), now) if code in (429, 503) else None
        return DeliveryFailed(f"HTTP {code}", retryable=True, status=code, retry_after=wait)
    return DeliveryFailed(f"HTTP {code}", retryable=False, reason="rejected", status=code,
                          attempt_status="refused")


async def post_json(url: str, body: bytes, headers: dict[str, str], rule: ActionRuleSpec,
                    context: DeliveryContext) -> Sent:
    """POST ``body``; 2xx is success, anything else a :class:`DeliveryFailed`. Redirects
    are never followed (a redirect could leave the allow-list)."""
    try:
        response = await context.client.post(url, content=body, headers=headers,
                                             timeout=rule.timeout, follow_redirects=False)
    except httpx.TimeoutException:
        raise DeliveryFailed(f"no answer within {rule.timeout:g} s", retryable=True) from None
    except httpx.TransportError as exc:
        raise DeliveryFailed(f"{type(exc).__name__}", retryable=True) from None
    if 200 <= response.status_code < 300:
        return Sent(response.status_code)
    raise _http_failure(response, context.clock())


class WebhookKind(ActionKind):
    """An HTTP POST of the action's body, signed per Standard Webhooks."""

    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        assert action.url is not None
        body = action.body.encode()
        secret = context.secrets.get(rule.secret_env) if rule.secret_env else None
        return await post_json(action.url, body, signed_headers(action, body, secret, context.clock()),
                               rule, context)


class NotifyKind(ActionKind):
    """A notification: chat-style JSON (``{"text": ...}``) to ``url``, or an email."""

    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        text = f"[{rule.name}] {action.event_type} for {action.key} at {action.timestamp:%Y-%m-%d %H:%M:%S}Z"
        if rule.channel == "email":
            return await asyncio.to_thread(self._mail, action, rule, text)
        body = json.dumps({"text": text, "action_id": action.action_id,
                           "event": json.loads(action.body)}).encode()
        secret = context.secrets.get(rule.secret_env) if rule.secret_env else None
        assert action.url is not None
        return await post_json(action.url, body, signed_headers(action, body, secret, context.clock()),
                               rule, context)

    @staticmethod
    def _mail(action: Action, rule: ActionRuleSpec, text: str) -> Sent:
        assert rule.smtp is not None and rule.to
        host, _, port = rule.smtp.rpartition(":")
        message = EmailMessage()
        message["From"], message["To"] = rule.sender, ", ".join(rule.to)
        message["Subject"] = f"{rule.name}: {action.event_type} ({action.key})"
        message["Message-ID"] = f"<{action.action_id}@eventray>"  # the receiver's dedup key
        message.set_content(f"{text}\n\n{action.body}\n")
        try:
            with smtplib.SMTP(host, int(port), timeout=rule.timeout) as smtp:
                smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            raise DeliveryFailed(f"SMTP {exc.smtp_code}", retryable=exc.smtp_code < 500,
                                 reason="rejected" if exc.smtp_code >= 500 else "retries_exhausted",
                                 status=exc.smtp_code) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryFailed(f"SMTP: {type(exc).__name__}", retryable=True) from None
        return Sent(250)


class TaskKind(ActionKind):
    """A workflow task: ``module:function`` called with the action (as a dict); a raise is
    a failed attempt. On Ray the dispatcher runs it as a Ray task."""

    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        assert rule.task is not None
        payload = {**action.__dict__, "body": json.loads(action.body)}
        try:
            if context.run_task is not None:
                await context.run_task(rule.task, payload)
            else:
                await asyncio.to_thread(import_path(rule.task), payload)
        except Exception as exc:  # the task's own failure is the attempt's outcome
            raise DeliveryFailed(f"task {rule.task}: {type(exc).__name__}: {exc}", retryable=True) from None
        return Sent(None)


ACTION_KINDS = PluginRegistry("action kind", "eventray.actions", {
    "webhook": WebhookKind(), "notify": NotifyKind(), "workflow": TaskKind(),
})


def action_kind(name: str) -> ActionKind:
    """The delivered kind ``name`` (built-in, entry point or ``module:attr``); a class is
    instantiated without arguments."""
    kind = ACTION_KINDS.resolve(name)
    if isinstance(kind, type):
        kind = kind()
    if not isinstance(kind, ActionKind):
        raise PipelineError(f"action kind {name!r} is {kind!r}, not an ActionKind")
    return kind


class StateUpdateKind(ActionKind):
    """``update``: an upsert into a state table, written by the partition in the apply that
    decides it (:mod:`pipelines.actions.outbox`); never delivered."""

    async def send(self, action: Action, rule: ActionRuleSpec, context: DeliveryContext) -> Sent:
        raise DeliveryFailed("update actions take effect in the partition", retryable=False,
                             reason="rejected", attempt_status="refused")


ACTION_KINDS.register("update", StateUpdateKind())


def check_action_kinds(spec: Any) -> None:
    """Resolve the kind of every action rule of a pipeline spec, naming the field of an
    unknown one (its error lists the allowed names)."""
    from pipelines.errors import UnknownPluginError

    for index, rule in enumerate(spec.actions.rules if spec.actions is not None else []):
        try:
            action_kind(rule.kind)
        except UnknownPluginError as exc:
            raise exc.at(f"actions.rules.{index}.kind") from None
