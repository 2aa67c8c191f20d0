"""Dispatcher actors: delivering a run's committed outbox beside its processing.

:class:`RayDispatchers` starts ``actions.dispatchers`` async actors named
``<run>-dispatcher-<i>`` in namespace ``eventray``, each running an
:class:`~pipelines.actions.dispatch.OutboxDispatcher` over its shard of the action ids. They
read the store and the run's checkpoint manifests themselves: the driver never waits for a
delivery while it processes, and an action is sent only once a committed checkpoint covers
its outbox row. Signing secrets reach the actors as environment variables of their runtime
environment, never as arguments or store rows.

A dispatcher actor that dies (killed, its node lost) is replaced under the same name when
the driver next looks (after each checkpoint, and while draining); the new one reads the
ledger, skips what was acknowledged or dead-lettered, and sends the rest again with the
same ``webhook-id``. At the end of a bounded run :meth:`RayDispatchers.drain` waits until
every committed action is delivered or dead-lettered.

:class:`LocalDispatchers` runs the same dispatchers on an event loop in a thread of this
process, for the in-process runner.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from cluster.partitions import NAMESPACE
from pipelines.action_rules import ActionsSpec
from pipelines.actions.dispatch import OutboxDispatcher, read_secrets
from pipelines.actions.ledger import committed_outbox_files
from pipelines.errors import PipelineError
from pipelines.store import EventStore

SPAWN_TIMEOUT_S = 60.0
#: Seconds a drain may go without any dispatcher making progress before it gives up.
DRAIN_STALL_S = 900.0


class DrainTimeout(PipelineError):
    """The outbox did not drain: actions are still pending (their ledger says which)."""


def drained(status: dict[str, int], expected_files: int) -> bool:
    """Whether a dispatcher has read every committed outbox file and finished all of it,
    its ledger written."""
    return status["files"] >= expected_files and status["pending"] == 0 and status["buffered"] == 0


async def serve_dispatcher(dispatcher: OutboxDispatcher, poll_interval: float,
                           stop: asyncio.Event) -> dict[str, int]:
    """Step ``dispatcher`` every ``poll_interval`` until ``stop`` is set."""
    async with dispatcher:
        while not stop.is_set():
            await dispatcher.step()
            try:
                await asyncio.wait_for(stop.wait(), poll_interval)
            except TimeoutError:
                pass
    counters = dispatcher.counters
    return {"delivered": counters.delivered, "dead_lettered": counters.dead_lettered,
            "attempts": counters.attempts}


def status_of(dispatcher: OutboxDispatcher | None) -> dict[str, int]:
    if dispatcher is None:
        return {"files": -1, "pending": 1, "buffered": 0, "delivered": 0}
    return {"files": len(dispatcher.seen_files), "pending": dispatcher.pending,
            "buffered": dispatcher.ledger.buffered, "delivered": dispatcher.counters.delivered}


def _actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class DispatcherActor:
        """Delivers one shard of a run's outbox: a thin shell around OutboxDispatcher."""

        def __init__(self, store_root: str, run: str, shard: int, shards: int,
                     spec: ActionsSpec) -> None:
            self.args = (store_root, run, shard, shards)
            self.spec = spec
            self.dispatcher: OutboxDispatcher | None = None
            self.stopping: asyncio.Event | None = None

        async def serve(self) -> dict[str, int]:
            store_root, run, shard, shards = self.args
            self.stopping = asyncio.Event()
            self.dispatcher = OutboxDispatcher(
                store_root, run, shard, shards, secrets=read_secrets(self.spec.secret_envs()),
                concurrency=self.spec.concurrency, run_task=self._run_task)
            return await serve_dispatcher(self.dispatcher, self.spec.poll_interval, self.stopping)

        async def _run_task(self, path: str, payload: dict[str, Any]) -> Any:
            from pipelines.plugins import import_path

            function = import_path(path)
            return await ray.remote(function).options(name=path).remote(payload)

        async def status(self) -> dict[str, int]:
            return status_of(self.dispatcher)

        async def stop(self) -> None:
            if self.stopping is not None:
                self.stopping.set()

    return DispatcherActor


class RayDispatchers:
    """The run's dispatcher actors: started, watched, replaced, drained."""

    def __init__(self, spec: ActionsSpec, store_root: str | Path, run: str) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self._ray, self._failures = ray, (RayActorError, RayTaskError, GetTimeoutError)
        self.spec, self.run = spec, run
        self.store_root = str(Path(store_root).resolve())
        # checked here, before any actor starts: a missing secret is a start-up error
        self._env = read_secrets(spec.secret_envs())
        self._actor = _actor_class()
        self.actors: list[Any] = []
        self.serving: list[Any] = []
        for shard in range(spec.dispatchers):
            self.actors.append(None)
            self.serving.append(None)
            self._spawn(shard)
        self.restarts = 0

    def ray_name(self, shard: int) -> str:
        """``<run>-dispatcher-<i>``, the name the actor is registered under."""
        return f"{self.run}-dispatcher-{shard}"

    def _spawn(self, shard: int) -> None:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            try:
                actor = self._actor.options(
                    name=self.ray_name(shard), namespace=NAMESPACE, num_cpus=0,
                    runtime_env={"env_vars": self._env} if self._env else None,
                ).remote(self.store_root, self.run, shard, self.spec.dispatchers, self.spec)
                break
            except ValueError:  # the dead actor's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.actors[shard], self.serving[shard] = actor, actor.serve.remote()

    def ready(self) -> None:
        """Wait until every dispatcher answers."""
        for shard in range(len(self.actors)):
            self._status(shard, timeout=SPAWN_TIMEOUT_S)

    def _status(self, shard: int, timeout: float = 30.0) -> dict[str, int] | None:
        try:
            return self._ray.get(self.actors[shard].status.remote(), timeout=timeout)
        except self._failures:
            self._replace(shard)
            return None

    def _replace(self, shard: int) -> None:
        try:
            self._ray.kill(self.actors[shard])
        except Exception:  # already gone: nothing to kill
            pass
        self._fetch(self.serving[shard])
        self._spawn(shard)
        self.restarts += 1

    def _fetch(self, ref: Any) -> None:
        """Fetch a dead actor's failed call, so Ray does not report it as unhandled."""
        try:
            self._ray.get(ref, timeout=5)
        except Exception:  # the failure is the expected outcome
            pass

    def poll(self) -> None:
        """Replace dispatchers that have died (called after each checkpoint)."""
        ready, _ = self._ray.wait(list(self.serving), num_returns=len(self.serving), timeout=0)
        for shard, ref in enumerate(self.serving):
            if ref in ready:
                self._replace(shard)

    def drain(self, poll_interval: float = 0.05) -> None:
        """Wait until every committed action is delivered or dead-lettered.

        Raises:
            DrainTimeout: no dispatcher made progress for :data:`DRAIN_STALL_S`.
        """
        expected = len(committed_outbox_files(EventStore(self.store_root), self.run, set()))
        progress, last = -1, time.monotonic()
        while True:
            self.poll()
            statuses = [self._status(shard) for shard in range(len(self.actors))]
            if all(s is not None and drained(s, expected) for s in statuses):
                return
            done = sum(s["delivered"] for s in statuses if s is not None)
            if done != progress:
                progress, last = done, time.monotonic()
            elif time.monotonic() - last > DRAIN_STALL_S:
                raise DrainTimeout(f"actions still pending after {DRAIN_STALL_S:g} s without progress")
            time.sleep(poll_interval)

    def close(self) -> None:
        for shard, actor in enumerate(self.actors):
            try:
                self._ray.get(actor.stop.remote(), timeout=10)
                self._ray.get(self.serving[shard], timeout=30)
            except Exception:  # a dead or stuck dispatcher: its ledger has what it finished
                pass
            try:
                self._ray.kill(actor)
            except Exception:  # already gone
                pass


class LocalDispatchers:
    """The run's dispatchers on one event loop in a thread of this process."""

    restarts = 0

    def __init__(self, spec: ActionsSpec, store_root: str | Path, run: str) -> None:
        self.spec, self.run, self.store_root = spec, run, str(Path(store_root).resolve())
        self.secrets = read_secrets(spec.secret_envs())
        self.loop = asyncio.new_event_loop()
        self.dispatchers: list[OutboxDispatcher] = []
        self.stop: asyncio.Event | None = None
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"{run}-dispatchers", daemon=True)
        self.started = threading.Event()
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        except BaseException as exc:  # reported by poll() and drain() in the driver's thread
            self.failure = exc
        finally:
            self.loop.close()  # an unclosed loop warns when collected, anywhere
            self.started.set()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        shards = self.spec.dispatchers
        self.dispatchers = [OutboxDispatcher(self.store_root, self.run, shard, shards,
                                             secrets=self.secrets, concurrency=self.spec.concurrency)
                            for shard in range(shards)]
        self.started.set()
        await asyncio.gather(*(serve_dispatcher(d, self.spec.poll_interval, self.stop)
                               for d in self.dispatchers))

    def ready(self) -> None:
        self.started.wait(SPAWN_TIMEOUT_S)

    def poll(self) -> None:
        if not self.thread.is_alive():
            raise PipelineError(f"the in-process dispatchers stopped: {self.failure!r}")

    def drain(self, poll_interval: float = 0.05) -> None:
        expected = len(committed_outbox_files(EventStore(self.store_root), self.run, set()))
        while not all(drained(status_of(d), expected) for d in self.dispatchers):
            self.poll()
            time.sleep(poll_interval)

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=60)
