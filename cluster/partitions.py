"""Partition executors: where a partition's batches are applied, how many are in flight,
and how a partition that died is brought back exactly where it was.

:class:`RayPartitions` owns one :class:`PartitionActor` per partition, named
``partition-<i>`` in namespace ``eventray`` and spread over the cluster's nodes. A plain
synchronous actor runs one caller's calls in submission order, so a partition's batches
apply in sequence; at most ``max_in_flight`` are outstanding per partition, which bounds
the driver's and the object store's memory whatever the source's speed.

Recovery. Ray's own retries reorder and duplicate calls, so actors run with
``max_restarts=0`` and ``max_task_retries=0`` and the executor recovers itself: it keeps
every batch sent since the last committed checkpoint; when a call fails because the actor
died (killed, its node lost) or refused a sequence gap, it starts a new actor under the
same name, which restores its state from the last committed checkpoint, asks it where it
stands and resends the batches from there, in order. Re-applied batches rewrite the same
store files (named by partition and sequence), so the store ends as if nothing happened.
An actor that is alive but answers nothing for ``runtime.batch_timeout_s`` (hung, its
process stopped) is stalled and replaced the same way. A partition that fails again and
again without applying a batch ends the run with :class:`PartitionFailed`.

:class:`LocalPartitions` runs the same :class:`~pipelines.keyed.PartitionWorker` in
process: the in-process runner for tests and debugging.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from cluster.arrow_wire import send_tables_as_ipc
from cluster.operators import ImmediateExecutor
from cluster.ray_runtime import settle_heap
from pipelines.actions.outbox import outbox_rules
from pipelines.checkpoint import CheckpointStore
from pipelines.decisions import DecisionSink
from pipelines.errors import PipelineError
from pipelines.group_commit import GroupCommitSink
from pipelines.keyed import DEADLETTER_STEP, BatchReceipt, PartitionWorker
from pipelines.kinds import build_stage, build_steps
from pipelines.spec import EnrichSpec, PipelineSpec, RuntimeSpec, StoreSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId

NAMESPACE = "eventray"
LATENCY_BUCKETS_S = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]
RECOVERY_TIMEOUT_S = 120.0
#: Recoveries of one partition in a row without an acknowledged batch before giving up:
#: a batch that fails every time is a bug to report, not a crash to retry forever.
MAX_FUTILE_RECOVERIES = 5
#: How long a recovery waits for a killed actor's calls to fail, to fetch their errors.
DISCARD_TIMEOUT_S = 5.0


class PartitionFailed(PipelineError):
    """A partition could not go on, however often its actor was replaced.

    The run stops; its checkpoints hold everything up to the last one, so once the cause
    is fixed ``eventray run ... --resume`` continues from there.

    Attributes:
        actor: the actor's name (``partition-3``, ``terminal-0``).
        what: what it could not do (``batch 12``, ``checkpoint 4``, ``to restart``).
        attempts: how many times in a row it was tried.
    """

    def __init__(self, actor: str, what: str, attempts: int, cause: str) -> None:
        self.actor, self.what, self.attempts = actor, what, attempts
        times = "once" if attempts == 1 else f"{attempts} times in a row"
        super().__init__(
            f"{actor} failed {what} {times}; last: {cause}. The run's checkpoints hold it up "
            "to the last one: fix the cause, then run again with --resume")


def error_line(exc: BaseException) -> str:
    """An error in a line: its type and the last line of its message (Ray's wrapping puts
    the traceback first)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def actor_name(partition: int, stage: EnrichSpec | None = None) -> str:
    """``partition-<i>``, or ``<stage>-<i>`` for an enrichment stage's actors: the name in
    messages. In Ray the actor is registered as ``<run>-<name>`` (see
    :meth:`RayPartitions.ray_name`), so two runs on one cluster never collide."""
    return f"{stage.name if stage else 'partition'}-{partition}"


class _RunWorker(PartitionWorker):
    """A worker whose files carry the run's id, restored from the run's last checkpoint.

    With ``stage`` it is a partition of that enrichment stage: it runs the stage's logic,
    stores nothing, and its state is checkpointed under the stage's name.
    """

    def __init__(self, partition: int, store_root: str | Path, run: str,
                 spec: PipelineSpec | None = None, stage: EnrichSpec | None = None,
                 objects: dict[str, Any] | None = None, live: bool = False) -> None:
        if stage is not None:
            assert spec is not None, "an enrichment stage needs its pipeline"
            steps = [build_stage(stage, spec)]
        else:
            steps = build_steps(spec, objects) if spec is not None else []
        writer = WriterId.partition(run, partition)
        owner = WriterId.stage(run, stage.name, partition) if stage is not None else writer
        store = StoreSpec() if spec is None else spec.store
        self.store = EventStore(store_root)
        # A replay commits at points its input decides (every commit_rows rows and at each
        # checkpoint), so a recovered run's files equal a fault-free run's byte for byte; a
        # live run also every commit_interval, which bounds the store's commit lag.
        self.grouped = GroupCommitSink(self.store, store.commit_rows,
                                       store.commit_interval.total_seconds() if live else math.inf,
                                       on_time=live)
        actions = outbox_rules(spec) if stage is None and spec is not None else None
        super().__init__(partition, self.grouped, steps=steps, store_events=stage is None,
                         writer=writer, deadletter_writer=owner.for_step(DEADLETTER_STEP),
                         actions=actions)
        self.run, self.stage = run, stage
        self.decisions = live  # a live run's receipts carry decisions (/score)
        self.owner = owner.local
        self.checkpoints = CheckpointStore(store_root, run)
        latest = self.checkpoints.latest()
        if latest is not None:
            seqs = latest.partition_seqs if stage is None else latest.stage_seqs.get(stage.name, {})
            if partition in seqs:
                self.restore(self.checkpoints.read_state(latest.epoch, self.owner))
        # what a predecessor committed past the checkpoint may be grouped otherwise than the
        # replay will group it: remove it, the replay writes it again
        self.store.truncate_writers(run, dict.fromkeys(self._writers(), self.next_seq))

    def _writers(self) -> list[str]:
        """The writers (without the run) this partition's files are named by."""
        names = [self.deadletter_writer.local]
        if self.store_events:
            names += [self.writer.local, *(self.writer.for_step(s.name).local for s in self.steps)]
        return names

    def apply(self, seq: int, events: pa.Table) -> BatchReceipt:
        receipt = super().apply(seq, events)
        if self.grouped.due():  # committed in a thread: the receipt leaves now
            self.grouped.flush_in_background()
        return receipt

    def checkpoint(self, epoch: int) -> int:
        """Commit the held store writes, then write this partition's state for ``epoch``;
        returns its next sequence number."""
        self.grouped.flush()
        self.checkpoints.write_state(epoch, self.owner, self.snapshot())
        return self.next_seq


class LocalPartitions(ImmediateExecutor):
    """All partitions in this process; a batch is applied when submitted."""

    def __init__(self, partitions: int, store_root: str | Path, run: str,
                 spec: PipelineSpec | None = None, stage: EnrichSpec | None = None,
                 objects: dict[str, Any] | None = None, live: bool = False) -> None:
        self.workers = [_RunWorker(p, store_root, run, spec, stage, objects, live)
                        for p in range(partitions)]
        self._done: list[BatchReceipt] = []

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self._done.append(self.workers[partition].apply(seq, rows))

    def poll(self, block: bool = False) -> list[BatchReceipt]:
        done, self._done = self._done, []
        return done

    def checkpoint(self, epoch: int) -> dict[int, int]:
        return {w.partition: w.checkpoint(epoch) for w in self.workers}


def ray_stages(spec: PipelineSpec, store_root: str | Path, max_in_flight: int,
               cpus_per_actor: float | None = None) -> Callable[[str, EnrichSpec], Any]:
    """The factory of a Ray run's enrichment stages: each stage's partition actors, or its
    partitions in this (the driver's) process for ``placement: driver``."""

    def build(run: str, stage: EnrichSpec) -> RayPartitions | LocalPartitions:
        if stage.placement == "driver":
            return LocalPartitions(stage.partitions, store_root, run, spec, stage)
        return RayPartitions(stage.partitions, store_root, run, max_in_flight, cpus_per_actor,
                             spec, stage)
    return build


def wait_for_any(executors: list[Any], timeout: float) -> bool | None:
    """Wait up to ``timeout`` seconds until a batch in flight on any of ``executors`` has
    finished (in Ray, without holding the GIL or spinning).

    Returns:
        whether one has finished; ``None`` at once when none of them has a batch in flight
        on Ray (the caller waits its own way).
    """
    refs = [ref for executor in executors if isinstance(executor, RayPartitions)
            for ref in executor.in_flight_refs()]
    if not refs:
        return None
    import ray

    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return bool(ready)


def _actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class PartitionActor:
        """Owns one partition: a thin shell around :class:`PartitionWorker`."""

        def __init__(self, partition: int, store_root: str, run: str, spec: PipelineSpec | None,
                     stage: EnrichSpec | None = None, objects: dict[str, Any] | None = None,
                     live: bool = False, decisions_to: DecisionSink | None = None) -> None:
            from ray.util.metrics import Counter, Histogram

            send_tables_as_ipc()
            self.worker = _RunWorker(partition, store_root, run, spec, stage, objects, live)
            self.decisions_to = decisions_to
            if decisions_to is not None:
                decisions_to.connect()
            self.tags = {"partition": str(partition)}
            self.stored = Counter("eventray_events_stored", "events applied and stored",
                                  tag_keys=("partition",))
            self.latency = Histogram("eventray_ingest_to_store_seconds",
                                     "ingestion to store latency of a batch",
                                     boundaries=LATENCY_BUCKETS_S, tag_keys=("partition",))
            self.settled = False

        def apply(self, seq: int, rows: pa.Table) -> BatchReceipt:
            receipt = self.worker.apply(seq, rows)
            if not self.settled:  # after the first batch: what it loads (a model) is set up
                settle_heap()
                self.settled = True
            if receipt.applied:  # exported to the Ray dashboard / Prometheus
                if receipt.rows:  # a counter refuses 0: a batch of poison events only
                    self.stored.inc(receipt.rows, tags=self.tags)
                self.latency.observe(receipt.latency_s, tags=self.tags)
            if self.decisions_to is not None and receipt.decisions is not None:
                self.decisions_to.send(receipt.decisions)  # a replayed batch's again
                receipt = dataclasses.replace(receipt, decisions=None)
            return receipt

        def position(self) -> int:
            return self.worker.next_seq

        def checkpoint(self, epoch: int) -> int:
            return self.worker.checkpoint(epoch)

        def where(self) -> dict[str, Any]:
            """Where this partition runs: node id and process id (for operators, tests)."""
            import os

            return {"partition": self.worker.partition, "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id()}

    return PartitionActor


class RayPartitions:
    """One named actor per partition, bounded in flight, recovering dead partitions."""

    def __init__(self, partitions: int, store_root: str | Path, run: str,
                 max_in_flight: int, cpus_per_actor: float | None,
                 spec: PipelineSpec | None = None, stage: EnrichSpec | None = None,
                 objects: dict[str, Any] | None = None, live: bool = False,
                 decisions_to: DecisionSink | None = None) -> None:
        """``cpus_per_actor``: CPUs each actor holds; ``None``: Ray's actor default (a CPU
        free to be placed, none held while running). ``objects``: processors registered in
        Python, shipped to every actor (each unpickles its own copy). ``live``: a live run
        (``eventray serve``): receipts carry each batch's decisions (see
        :attr:`PartitionWorker.decisions`) and the store commits also every
        ``store.commit_interval``. ``decisions_to``: where each batch's decisions go as soon
        as it is scored, from the partition itself instead of back in the receipt (the
        ingress that answers ``POST /score``, a Redis stream), so a decision does not wait
        for the driver's next turn."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        send_tables_as_ipc()
        self._ray = ray
        self._failures = (RayActorError, RayTaskError, GetTimeoutError)
        self._timeout, self._task_error = GetTimeoutError, RayTaskError
        self._actor = _actor_class()
        self.store_root, self.run = str(Path(store_root).resolve()), run
        self.cpus_per_actor, self.spec, self.stage = cpus_per_actor, spec, stage
        self.objects, self.live, self.decisions_to = objects, live, decisions_to
        self.batch_timeout_s = (spec.runtime if spec else RuntimeSpec()).batch_timeout_s
        self.actors = [self._spawn(p) for p in range(partitions)]
        self.max_in_flight = max_in_flight
        self.pending: list[deque[tuple[int, Any]]] = [deque() for _ in range(partitions)]
        # every batch sent since the last committed checkpoint, to resend after a recovery
        self.unacked: list[deque[tuple[int, pa.Table]]] = [deque() for _ in range(partitions)]
        self.acked_next = [0] * partitions
        self._checkpointed = [0] * partitions  # as the last checkpoint call wrote them
        self._committed = [0] * partitions  # as the last committed checkpoint holds them
        self._epoch: int | None = None
        self.restarts = 0
        self._futile = [0] * partitions
        self._done: list[BatchReceipt] = []

    def _spawn(self, partition: int) -> Any:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            try:
                return self._actor.options(
                    name=self.ray_name(partition), namespace=NAMESPACE,
                    num_cpus=self.cpus_per_actor, scheduling_strategy="SPREAD",
                ).remote(partition, self.store_root, self.run, self.spec, self.stage, self.objects,
                         self.live, self.decisions_to)
            except ValueError:  # the dead actor's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def ray_name(self, partition: int) -> str:
        """The name a partition's actor is registered under: ``<run>-partition-<i>``."""
        return f"{self.run}-{actor_name(partition, self.stage)}"

    def ready(self) -> None:
        """Wait until every actor has started (imports, model, restored state): the run's
        clock starts after this. Each partition continues where its restored state stands
        (the run's last checkpoint, or 0). An actor that fails to start is recovered here."""
        for partition, actor in enumerate(self.actors):
            try:
                position = self._ray.get(actor.position.remote(), timeout=RECOVERY_TIMEOUT_S)
                self.acked_next[partition] = self._checkpointed[partition] = position
                self._committed[partition] = position
            except self._failures:
                self._recover(partition)

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self.unacked[partition].append((seq, rows))
        while len(self.pending[partition]) >= self.max_in_flight:
            self._collect_oldest(partition)
        self.pending[partition].append((seq, self.actors[partition].apply.remote(seq, rows)))

    def _collect_oldest(self, partition: int, timeout: float | None = None) -> None:
        """Wait for the partition's oldest batch in flight (at most ``timeout``, by default
        ``batch_timeout_s``); a failure or no answer in time replaces the actor."""
        seq, ref = self.pending[partition].popleft()
        try:
            receipt = self._ray.get(ref, timeout=self.batch_timeout_s if timeout is None else timeout)
        except self._failures as exc:
            self._failed(partition, f"batch {seq}", exc)
            return
        self._ack(partition, receipt)

    def _failed(self, partition: int, what: str, exc: Exception) -> None:
        """Recover the partition after ``exc``, unless it has failed too often in a row."""
        self._futile[partition] += 1
        if self._futile[partition] > MAX_FUTILE_RECOVERIES:
            self._kill(partition)
            self._discard(partition)
            raise PartitionFailed(actor_name(partition, self.stage), what,
                                  self._futile[partition], self._cause(exc)) from exc
        self._recover(partition)

    def _cause(self, exc: Exception) -> str:
        """What went wrong, in a line: the step's own exception, not Ray's wrapping."""
        if isinstance(exc, self._timeout):
            return f"no answer within runtime.batch_timeout_s = {self.batch_timeout_s:g} s"
        if isinstance(exc, self._task_error) and getattr(exc, "cause", None) is not None:
            return f"{type(exc.cause).__name__}: {exc.cause}"
        return error_line(exc)

    def _ack(self, partition: int, receipt: BatchReceipt) -> None:
        # Replays after a recovery re-acknowledge batches already counted: count once. Only
        # a batch never acknowledged before is progress: replays that succeed while the batch
        # after them fails every time must not reset the count of futile recoveries.
        if receipt.seq == self.acked_next[partition]:
            self.acked_next[partition] += 1
            self._futile[partition] = 0
            self._done.append(receipt)

    def _discard(self, partition: int) -> None:
        """Drop the calls in flight to the partition's killed actor, fetching those that
        have failed: Ray reports a failed call nobody fetched as an unhandled error (on
        stderr, after the one line a failed run prints)."""
        refs = [ref for _, ref in self.pending[partition]]
        self.pending[partition].clear()
        if not refs:
            return
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=DISCARD_TIMEOUT_S)
        for ref in ready:
            try:
                self._ray.get(ref, timeout=0)
            except Exception:  # the failure itself is the expected outcome: nothing to do
                pass

    def _recover(self, partition: int) -> None:
        """Replace the partition's actor and resend what it has not applied, in order.
        ``restarts`` counts the actors started: a replacement that dies or does not answer
        while it starts is killed and replaced again."""
        self._kill(partition)
        self._discard(partition)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            self._kill(partition)
            self.actors[partition] = self._spawn(partition)
            self.restarts += 1
            try:
                position = self._ray.get(self.actors[partition].position.remote(), timeout=60)
                break
            except self._failures as exc:
                if time.monotonic() > deadline:
                    raise PartitionFailed(
                        actor_name(partition, self.stage), "to restart", 1,
                        f"no new actor started within {RECOVERY_TIMEOUT_S:g} s "
                        f"({self._cause(exc)})") from exc
        actor = self.actors[partition]
        # an actor that failed while starting a resumed run: its restored position is where
        # the partition stands (during a run, the position is never past what was acked)
        self.acked_next[partition] = max(self.acked_next[partition], position)
        self._checkpointed[partition] = max(self._checkpointed[partition], position)
        self._committed[partition] = max(self._committed[partition], position)
        for seq, rows in self.unacked[partition]:
            if seq >= position:
                self.pending[partition].append((seq, actor.apply.remote(seq, rows)))

    def poll(self, block: bool = False) -> list[BatchReceipt]:
        """Receipts of the batches finished since the last poll, each partition's in order.

        ``block``: first wait until at least one in-flight batch has finished (or failed); if
        none has within ``batch_timeout_s``, every partition with work in flight is stalled:
        each is collected now, which replaces its actor.
        """
        if block:
            self._wait_any()
        refs = self.in_flight_refs()
        if refs:  # one question for every batch in flight, not one per partition and batch
            ready = set(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0])
            for partition, queue in enumerate(self.pending):
                while queue and queue[0][1] in ready:
                    self._collect_oldest(partition)
        done, self._done = self._done, []
        return done

    def in_flight_refs(self) -> list[Any]:
        """The object refs of every batch in flight (what :func:`wait_for_any` waits on)."""
        return [ref for queue in self.pending for _, ref in queue]

    def _wait_any(self) -> None:
        heads = [queue[0][1] for queue in self.pending if queue]
        if not heads:
            return
        ready, _ = self._ray.wait(heads, num_returns=1, timeout=self.batch_timeout_s)
        if not ready:
            for partition, queue in enumerate(self.pending):
                if queue:
                    self._collect_oldest(partition, timeout=0)

    def _flush(self) -> None:
        for partition, queue in enumerate(self.pending):
            while queue:
                self._collect_oldest(partition)

    def in_flight(self) -> int:
        return sum(len(q) for q in self.pending)

    def capacity(self, partition: int) -> int:
        """Batches the partition can take now without exceeding ``max_in_flight``."""
        return max(0, self.max_in_flight - len(self.pending[partition]))

    def checkpoint(self, epoch: int) -> dict[int, int]:
        """Every partition's state at this point, written for ``epoch``; flushes first (the
        receipts come with the next :meth:`poll`). See :meth:`ask_checkpoint`."""
        return self.ask_checkpoint(epoch)()

    def ask_checkpoint(self, epoch: int) -> Callable[[], dict[int, int]]:
        """Ask every partition for its state at this point, written for ``epoch``, and
        return the call that waits for their answers (the actors work meanwhile: the driver
        may checkpoint other executors); flushes first.

        The driver commits each checkpoint before it asks for the next epoch, so when a new
        epoch is asked, batches before the previous epoch's are covered by a committed
        checkpoint and are never resent: they are dropped here. The driver may ask for one
        epoch more than once (acknowledged batches brought derived events to apply first):
        until the epoch changes, what those calls wrote is not committed, and a recovery
        meanwhile restores the previous epoch and resends from there.
        """
        if epoch != self._epoch:
            self._committed, self._epoch = list(self._checkpointed), epoch
        self._forget_committed()
        self._flush()
        # asked of every partition at once: each commits its files and state meanwhile
        asked = [actor.checkpoint.remote(epoch) for actor in self.actors]

        def collect() -> dict[int, int]:
            seqs: dict[int, int] = {}
            for partition in range(len(self.actors)):
                while partition not in seqs:
                    try:
                        seqs[partition] = self._ray.get(asked[partition],
                                                        timeout=self.batch_timeout_s)
                        self._futile[partition] = 0
                    except self._failures as exc:
                        self._failed(partition, f"checkpoint {epoch}", exc)
                        while self.pending[partition]:
                            self._collect_oldest(partition)
                        asked[partition] = self.actors[partition].checkpoint.remote(epoch)
            self._checkpointed = [seqs[p] for p in range(len(self.actors))]
            return seqs
        return collect

    def committed(self) -> None:
        """The checkpoint just taken is committed: the batches it covers are never resent."""
        self._committed = list(self._checkpointed)
        self._forget_committed()

    def _forget_committed(self) -> None:
        for partition, queue in enumerate(self.unacked):
            while queue and queue[0][0] < self._committed[partition]:
                queue.popleft()

    def _kill(self, partition: int) -> None:
        try:
            self._ray.kill(self.actors[partition])
        except Exception:  # already gone: nothing to kill
            pass

    def close(self) -> None:
        for partition in range(len(self.actors)):
            self._kill(partition)
