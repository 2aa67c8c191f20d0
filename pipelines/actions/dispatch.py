"""Delivering committed outbox rows: retries, breakers, rate limits, the record of it all.

An :class:`OutboxDispatcher` owns a shard of a run's actions (by a stable hash of the
action id). Each :meth:`OutboxDispatcher.step` reads the outbox files a committed checkpoint
newly covers, drops the actions this store has acknowledged or dead-lettered already, and
starts a delivery task for each of the rest, at most ``concurrency`` sending at once. A
delivery makes attempts through its kind (:mod:`pipelines.actions.kinds`) under tenacity:

- success is 2xx only; 429 and 503 wait their ``Retry-After`` (up to ``max_delay``);
- a 410 marks the endpoint gone: nothing more is sent to it, its actions are dead letters;
- a target whose host is not on the rule's allow-list is never called (``host_not_allowed``);
- a per-endpoint :class:`CircuitBreaker` opens after ``failures`` in a row: while open,
  attempts fail at once (``breaker_open``) and use up the retry budget, so its actions stay
  pending until the breaker closes or the budget runs out;
- a per-rule :class:`aiolimiter.AsyncLimiter` spaces attempts to ``rate_limit`` (shared by
  the run's dispatchers: each takes its share).

Every attempt is a row of ``action_attempts`` and a hopeless action one of
``actions_deadletter`` (:class:`pipelines.actions.ledger.LedgerWriter`), written durably on
every step. The dispatcher is an asyncio object with no Ray in it: ``cluster.dispatchers``
runs it in actors, ``eventray actions retry`` and the in-process runner run it here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow as pa
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_fixed

from pipelines.action_rules import ActionRuleSpec, BreakerSpec
from pipelines.actions.kinds import Action, DeliveryContext, DeliveryFailed, action_kind
from pipelines.actions.ledger import (
    LedgerWriter,
    committed_outbox_files,
    deadlettered_ids,
    delivered_ids,
    utc_now,
)
from pipelines.errors import ConfigError
from pipelines.hashing import partition_of
from pipelines.store import EventStore

Clock = Callable[[], dt.datetime]


def read_secrets(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The signing secrets by variable name, from the environment only.

    Raises:
        ConfigError: a variable is not set (named; its value never appears anywhere).
    """
    environ = os.environ if environ is None else environ
    missing = sorted(name for name in names if not environ.get(name))
    if missing:
        raise ConfigError(f"actions: environment variable {', '.join(missing)} is not set "
                          "(secret_env of an action rule)")
    return {name: environ[name] for name in names}


class CircuitBreaker:
    """Consecutive failures of one endpoint open it for ``reset`` seconds (monotonic time,
    injected); the first attempt after that is a trial: success closes it, failure reopens.

    Example:
        >>> now = [0.0]
        >>> breaker = CircuitBreaker(BreakerSpec(failures=2, reset=5), lambda: now[0])
        >>> breaker.failure(); breaker.failure(); breaker.allows()
        False
        >>> now[0] = 6.0; breaker.allows()
        True
    """

    def __init__(self, spec: BreakerSpec, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.monotonic = spec, monotonic
        self.failures, self.open_until = 0, 0.0

    def allows(self) -> bool:
        return self.failures < self.spec.failures or self.monotonic() >= self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.spec.failures:
            self.open_until = self.monotonic() + self.spec.reset

    @property
    def is_open(self) -> bool:
        return not self.allows()


def endpoint_of(url: str | None) -> str:
    """An endpoint's identity for its breaker: scheme, host and port."""
    if url is None:
        return "-"
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port or ''}"


def host_allowed(url: str | None, rule: ActionRuleSpec) -> bool:
    """Whether a resolved URL's host (as the HTTP client parses it) is on the allow-list."""
    if url is None:
        return True
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return False
    return parsed.scheme in ("http", "https") and parsed.host in (rule.allow_hosts or [])


@dataclass
class Counters:
    """What a dispatcher did since it started (the ledger is the durable record)."""

    delivered: int = 0
    dead_lettered: int = 0
    attempts: int = 0
    skipped: int = 0  # acknowledged or dead-lettered already (a replay, a restart)
    latencies_ms: list[float] = field(default_factory=list)


class OutboxDispatcher:
    """Delivers one shard of a run's committed actions.

    Args:
        store_root: the event store.
        run: the run's id.
        shard, shards: this dispatcher's share of the action ids.
        secrets: signing secrets by variable name (:func:`read_secrets`).
        concurrency: deliveries in flight at once.
        clock: stamps attempts and signatures (UTC).
        run_task: runs a workflow task ``module:function`` (a Ray task on Ray).
        owner: the writer name of its ledger files (``dispatcher-0``).
    """

    def __init__(self, store_root: str | Path, run: str, shard: int = 0, shards: int = 1, *,
                 secrets: Mapping[str, str] | None = None, concurrency: int = 64,
                 clock: Clock = utc_now, owner: str | None = None,
                 run_task: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None) -> None:
        self.store, self.run = EventStore(store_root), run
        self.shard, self.shards = shard, shards
        self.secrets, self.clock, self.run_task = dict(secrets or {}), clock, run_task
        self.ledger = LedgerWriter(self.store, run, owner or f"dispatcher-{shard}")
        self.owner = owner or f"dispatcher-{shard}"
        self.semaphore = asyncio.Semaphore(concurrency)
        self.seen_files: set[Path] = set()
        self.finished = delivered_ids(self.store) | deadlettered_ids(self.store)
        self.tasks: dict[str, asyncio.Task] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.gone: set[str] = set()
        self.limiters: dict[str, AsyncLimiter] = {}
        self.rules: dict[str, ActionRuleSpec] = {}
        self.counters = Counters()
        self.client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> OutboxDispatcher:
        self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.ledger.flush()
        if self.client is not None:
            await self.client.aclose()

    def load(self) -> int:
        """Start delivering the actions newly covered by a committed checkpoint."""
        files = committed_outbox_files(self.store, self.run, self.seen_files)
        started = self.submit(pl.read_parquet(files, hive_partitioning=False) if files else None)
        self.seen_files.update(files)  # only now: a drain counts files read as files started
        return started

    def submit(self, rows: pl.DataFrame | None) -> int:
        """Start a delivery task for each of ``rows`` in this shard not finished already."""
        if rows is None or rows.height == 0:
            return 0
        mine = partition_of(rows["action_id"].to_arrow(), self.shards) == self.shard
        started = 0
        for row in rows.filter(pl.Series(mine)).iter_rows(named=True):
            action = Action.of(row)
            if action.action_id in self.finished or action.action_id in self.tasks:
                self.counters.skipped += action.action_id in self.finished
                continue
            self.tasks[action.action_id] = asyncio.create_task(self.deliver(action))
            started += 1
        return started

    async def step(self) -> None:
        """One round: load newly committed actions, reap finished deliveries, and write
        the ledger's new rows durably."""
        self.load()
        for action_id in [a for a, t in self.tasks.items() if t.done()]:
            self.tasks.pop(action_id).result()  # a bug in delivery surfaces here
        self.ledger.flush()

    @property
    def pending(self) -> int:
        return len(self.tasks)

    def rule_of(self, action: Action) -> ActionRuleSpec:
        rule = self.rules.get(action.target)
        if rule is None:
            rule = self.rules[action.target] = ActionRuleSpec.model_validate_json(action.target)
        return rule

    def _limiter(self, rule: ActionRuleSpec) -> AsyncLimiter | None:
        if rule.rate_limit is None:
            return None
        if rule.name not in self.limiters:  # each dispatcher takes its share of the rate
            share = rule.rate_limit / self.shards
            period = max(1.0, 1.0 / share)  # at least one action per period
            self.limiters[rule.name] = AsyncLimiter(share * period, period)
        return self.limiters[rule.name]

    def _wait(self, rule: ActionRuleSpec) -> Callable[[Any], float]:
        base = wait_exponential(multiplier=rule.retry.initial_delay, max=rule.retry.max_delay) \
            if rule.retry.backoff == "exponential" else wait_fixed(rule.retry.initial_delay)

        def wait(state: Any) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = getattr(error, "retry_after", None)
            return min(asked, rule.retry.max_delay) if asked is not None else base(state)

        return wait

    async def deliver(self, action: Action) -> None:
        """Attempt until delivered, hopeless or out of budget; record it all."""
        rule = self.rule_of(action)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(rule.retry.attempts), wait=self._wait(rule), reraise=True,
            retry=retry_if_exception(lambda e: isinstance(e, DeliveryFailed) and e.retryable))
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    await self.attempt(action, rule, attempts)
        except DeliveryFailed as failure:
            self._deadletter(action, failure, attempts)
            return
        self.finished.add(action.action_id)

    async def attempt(self, action: Action, rule: ActionRuleSpec, number: int) -> None:
        """One attempt: checks (allow-list, gone, breaker), rate limit, send, record."""
        endpoint = endpoint_of(action.url)
        breaker = self.breakers.setdefault(endpoint, CircuitBreaker(rule.breaker))
        async with self.semaphore:  # checked when its turn comes: a 410 or a breaker may be new
            refusal = self._refusal(action, rule, endpoint, breaker)
            if refusal is not None:
                self._record(action, number, refusal, None)
                raise refusal
            limiter = self._limiter(rule)
            if limiter is not None:
                await limiter.acquire()
            started = time.perf_counter()
            try:
                sent = await action_kind(rule.kind).send(action, rule, self._context())
            except DeliveryFailed as failure:
                self._settle(breaker, endpoint, failure)
                self._record(action, number, failure, time.perf_counter() - started)
                raise
        breaker.success()
        self._delivered(action, number, sent.status, time.perf_counter() - started)

    def _refusal(self, action: Action, rule: ActionRuleSpec, endpoint: str,
                 breaker: CircuitBreaker) -> DeliveryFailed | None:
        if not host_allowed(action.url, rule):
            return DeliveryFailed("host not on the allow-list", retryable=False,
                                  reason="host_not_allowed", attempt_status="refused")
        if endpoint in self.gone:
            return DeliveryFailed("endpoint answered 410 Gone before", retryable=False,
                                  reason="gone", attempt_status="refused")
        if not breaker.allows():
            return DeliveryFailed("circuit breaker open", retryable=True, reason="breaker_open",
                                  attempt_status="breaker_open")
        return None

    def _settle(self, breaker: CircuitBreaker, endpoint: str, failure: DeliveryFailed) -> None:
        if failure.reason == "gone":
            self.gone.add(endpoint)
        elif failure.retryable:
            breaker.failure()

    def _context(self) -> DeliveryContext:
        assert self.client is not None, "use the dispatcher in 'async with'"
        return DeliveryContext(self.client, self.secrets, self.clock, self.run_task)

    def _row(self, action: Action, number: int, status: str, http: int | None,
             seconds: float | None, error: str | None) -> dict[str, Any]:
        return {"action_id": action.action_id, "rule": action.rule, "kind": action.kind,
                "event_id": action.event_id, "event_type": action.event_type,
                "timestamp": action.timestamp, "attempt": number, "status": status,
                "http_status": http, "latency_ms": None if seconds is None else seconds * 1000,
                "dispatch_ms": None, "error": error, "attempted_at": self.clock(),
                "dispatcher": self.owner}

    def _record(self, action: Action, number: int, failure: DeliveryFailed, seconds: float | None) -> None:
        self.counters.attempts += 1
        self.ledger.attempt(self._row(action, number, failure.attempt_status, failure.status,
                                      seconds, str(failure)))

    def _delivered(self, action: Action, number: int, status: int | None, seconds: float) -> None:
        row = self._row(action, number, "delivered", status, seconds, None)
        row["dispatch_ms"] = (row["attempted_at"] - action.decided_at).total_seconds() * 1000
        self.counters.attempts += 1
        self.counters.delivered += 1
        self.counters.latencies_ms.append(row["dispatch_ms"])
        self.ledger.attempt(row)

    def _deadletter(self, action: Action, failure: DeliveryFailed, attempts: int) -> None:
        self.counters.dead_lettered += 1
        self.finished.add(action.action_id)
        self.ledger.deadletter({**action.__dict__, "reason": failure.reason, "attempts": attempts,
                                "error": str(failure), "deadlettered_at": self.clock()})


async def redeliver(store_root: str | Path, rows: pl.DataFrame, *, secrets: Mapping[str, str],
                    clock: Clock = utc_now, concurrency: int = 64) -> dict[str, int]:
    """Deliver ``rows`` (dead letters) again with a fresh retry budget each, recording the
    attempts as any dispatcher does (writer ``retry``); returns what happened."""
    dispatcher = OutboxDispatcher(store_root, "retry", secrets=secrets, concurrency=concurrency,
                                  clock=clock, owner="retry")
    dispatcher.finished = delivered_ids(dispatcher.store)  # dead letters are what we retry
    async with dispatcher:
        dispatcher.submit(rows.select(list(Action.__dataclass_fields__)))
        await asyncio.gather(*dispatcher.tasks.values())
        dispatcher.tasks.clear()
        dispatcher.ledger.flush()
    return {"retried": rows.height, "delivered": dispatcher.counters.delivered,
            "dead_lettered": dispatcher.counters.dead_lettered}


def dead_letters(store_root: str | Path, rule: str | None = None,
                 since: dt.datetime | None = None) -> pl.DataFrame:
    """The store's dead-lettered actions not delivered since (of ``rule``, parked at or
    after ``since``), one row per action."""
    store = EventStore(store_root)
    files = store.files("actions_deadletter")
    if not files:
        return pl.DataFrame(schema=pl.from_arrow(pa.schema([]).empty_table()).schema)
    frame = pl.scan_parquet(files, hive_partitioning=False)
    if rule is not None:
        frame = frame.filter(pl.col("rule") == rule)
    if since is not None:
        frame = frame.filter(pl.col("deadlettered_at") >= since)
    done = list(delivered_ids(store))
    return (frame.filter(~pl.col("action_id").is_in(done)).sort("deadlettered_at")
            .unique("action_id", keep="last", maintain_order=True).collect())


def retry_dead_letters(store_root: str | Path, rule: str | None = None,
                       since: dt.datetime | None = None) -> dict[str, int]:
    """``eventray actions retry``: send the store's dead letters (of ``rule``, parked since
    ``since``) again, each with its own id (the receiver's idempotency key) and a fresh
    retry budget; those that fail again are parked again.

    Raises:
        ConfigError: a rule's ``secret_env`` variable is not set.
    """
    rows = dead_letters(store_root, rule, since)
    if rows.height == 0:
        return {"retried": 0, "delivered": 0, "dead_lettered": 0}
    names = {r.secret_env for t in rows["target"].unique().to_list()
             if (r := ActionRuleSpec.model_validate_json(t)).secret_env}
    return asyncio.run(redeliver(store_root, rows, secrets=read_secrets(names)))
