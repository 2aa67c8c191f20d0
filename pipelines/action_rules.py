"""Action rules in config (the ``actions:`` section): what a decision sets off, and where.

``actions:`` in a pipeline config is a list of rules, or a mapping with ``allow_hosts`` (the
hosts every rule may reach) and ``rules``::

    actions:
      - name: notify-risk-team
        event_types: [fraud.suspected, fraud.card_testing]   # wildcards allowed
        where: "data.score > 0.9"                           # optional filter (SQL subset)
        kind: webhook
        url: http://127.0.0.1:9000/hooks/fraud
        secret_env: FRAUD_HOOK_SECRET
        rate_limit: 200/s
        retry: {attempts: 8, backoff: exponential, max_delay: 5m}

A rule's target must be on its allow-list (``allow_hosts`` on the rule, else the top-level
one, else the hosts of all the rules' own URLs), so neither a payload nor a URL template can
send a delivery elsewhere. Secrets are never in config: ``secret_env`` names an environment
variable, read where deliveries are signed.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.timestamps import parse_duration

#: Placeholders a URL may carry, filled per action from its trigger: ``{key}``,
#: ``{event_type}``, ``{event_id}`` or a payload field ``{data.NAME}``.
URL_PLACEHOLDER = re.compile(r"\{(key|event_type|event_id|data\.[A-Za-z_][A-Za-z0-9_]*)\}")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(ms|s|m|h)\s*$")
_RATE_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _seconds(value: Any, field: str) -> float:
    if isinstance(value, int | float):
        return float(value)
    return parse_duration(value, field).total_seconds()


class RetrySpec(_Frozen):
    """How a failed delivery is retried: ``attempts`` in all (the first included), waiting
    ``backoff`` (``exponential`` from ``initial_delay``, doubling, or ``fixed``) at most
    ``max_delay`` between two; a ``Retry-After`` from the target is honoured up to it."""

    attempts: int = Field(default=8, ge=1, le=100)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial_delay: float = Field(default=0.5, ge=0)
    max_delay: float = Field(default=300.0, ge=0)

    @field_validator("initial_delay", "max_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float:
        return _seconds(value, info.field_name)


class BreakerSpec(_Frozen):
    """A circuit breaker per endpoint: ``failures`` in a row open it for ``reset``; while
    open, attempts to that endpoint fail at once (and count against the retry budget)."""

    failures: int = Field(default=20, ge=1)
    reset: float = Field(default=5.0, gt=0)

    @field_validator("reset", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float:
        return _seconds(value, info.field_name)


class ActionRuleSpec(_Frozen):
    """One action rule: which events set it off, and what it does with each.

    Kinds: ``webhook`` (``url``, signed when ``secret_env`` is given), ``notify``
    (``channel: chat`` posts JSON text to ``url``; ``channel: email`` mails ``to`` through
    ``smtp``), ``workflow`` (``event_type``: a command event routed into the pipeline; or
    ``task``: a Ray task ``module:function``), ``update`` (an upsert of the trigger's
    ``fields`` into ``table`` by ``key``), or a kind from the ``eventray.actions`` plugins
    (its settings in ``params``).
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    event_types: list[str] = Field(min_length=1)
    where: str | None = None
    kind: str = Field(min_length=1)
    url: str | None = None
    secret_env: str | None = Field(default=None, pattern=ENV_NAME)
    rate_limit: float | None = Field(default=None, gt=0, description="actions per second")
    retry: RetrySpec = Field(default_factory=RetrySpec)
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    timeout: float = Field(default=10.0, gt=0, description="seconds per attempt")
    allow_hosts: list[str] | None = None
    channel: Literal["chat", "email"] | None = None
    smtp: str | None = Field(default=None, description="host:port of the SMTP server")
    to: list[str] | None = None
    sender: str = "eventray@localhost"
    event_type: str | None = None
    task: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    table: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,62}$")
    fields: list[str] | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = _RATE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a rate such as '200/s' or '30/m'")
        return float(match[1]) / _RATE_UNITS[match[2]]

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        return _seconds(value, "timeout")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(URL_PLACEHOLDER.sub("x", value))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> ActionRuleSpec:
        needs = {"webhook": ["url"], "update": ["table", "fields"]}.get(self.kind, [])
        if self.kind == "notify":
            needs = ["url"] if self.channel in (None, "chat") else ["smtp", "to"]
        if self.kind == "workflow" and (self.event_type is None) == (self.task is None):
            raise ValueError("a workflow action gives one of event_type or task")
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} action needs {', '.join(missing)}")
        return self

    @property
    def url_host(self) -> str | None:
        """The host of ``url`` when it is literal (a template may not choose the host)."""
        if self.url is None:
            return None
        host = urlsplit(self.url).netloc.rpartition("@")[2]
        return None if URL_PLACEHOLDER.search(host) else urlsplit(self.url).hostname

    @property
    def delivered(self) -> bool:
        """Whether dispatchers deliver it (``False``: it takes effect in the partition)."""
        return not (self.kind == "update" or (self.kind == "workflow" and self.event_type))


class ActionsSpec(_Frozen):
    """The ``actions:`` section: rules and the hosts they may reach.

    Example:
        >>> spec = ActionsSpec.model_validate([{"name": "hook", "event_types": ["a.*"],
        ...     "kind": "webhook", "url": "http://127.0.0.1:9000/x"}])
        >>> spec.allowed_hosts(spec.rules[0])
        ['127.0.0.1']
    """

    allow_hosts: list[str] | None = None
    rules: list[ActionRuleSpec] = Field(default_factory=list)
    dispatchers: int = Field(default=2, ge=1, le=64)
    concurrency: int = Field(default=64, ge=1, le=4096, description="deliveries in flight per dispatcher")
    poll_interval: float = Field(default=0.05, gt=0, description="seconds between outbox scans")

    @model_validator(mode="before")
    @classmethod
    def _list_is_rules(cls, value: Any) -> Any:
        return {"rules": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _checked(self) -> ActionsSpec:
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"action names must be unique, got {names}")
        for index, rule in enumerate(self.rules):
            host = rule.url_host
            if rule.url is not None and host is not None and host not in self.allowed_hosts(rule):
                raise ValueError(f"rules.{index}.url: host {host!r} is not in the allow-list "
                                 f"{self.allowed_hosts(rule)}")
        return self

    def allowed_hosts(self, rule: ActionRuleSpec) -> list[str]:
        """The hosts ``rule`` may reach: its own list, the section's, or the rules' hosts."""
        if rule.allow_hosts is not None:
            return list(rule.allow_hosts)
        if self.allow_hosts is not None:
            return list(self.allow_hosts)
        return sorted({host for r in self.rules if (host := r.url_host) is not None})

    @property
    def delivered(self) -> bool:
        """Whether any rule is delivered by the run's dispatchers (not only recorded)."""
        return any(r.delivered for r in self.rules)

    def secret_envs(self) -> list[str]:
        """The environment variables the delivered rules sign with."""
        return sorted({r.secret_env for r in self.rules if r.secret_env and r.delivered})


def retry_after_seconds(value: str | None, now: dt.datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date).

    Example:
        >>> retry_after_seconds("3", dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        3.0
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())
