"""A live run: a pipeline fed by polling a live source until told to stop, then a drain.

The loop (:class:`LiveRun`): poll the live source (any :class:`~pipelines.live.LiveSource`:
the HTTP ingest journal, Redis Streams, MQTT), ingest what arrived (normalise, dedup,
dead-letter), send it through the enrichment stages and into the keyed partitions, and
every ``store.commit_interval`` take an aligned checkpoint and then tell the source what it
covers (``committed``: journal segments removed, ``XACK``...). Checkpoints come every
``runtime.checkpoint_interval`` under load (each drains what is in flight, so decisions
wait behind it), and ``store.commit_interval`` after the source goes quiet; the store's
files do not wait for them (the partitions group-commit every ``store.commit_interval``).
Live sources decide in arrival order: no decision waits for a watermark.

Decisions leave the partitions as soon as a batch is scored: on Ray each partition hands
them straight to the ingress actor, which answers the waiting ``POST /score`` handlers;
in process they come back with the batch's receipt (:attr:`BatchReceipt.decisions`) and
the run hands them on (:attr:`LiveRun.decisions_to`, or :class:`ScoreReplies`). The run
itself answers the events that never reach a partition: dead letters, duplicates, the
late lane.

The loop runs in ``eventray serve``'s driver (:mod:`cluster.serve`), or in one actor with
every operator (``runtime.chain``: :mod:`cluster.chained`).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.accounting import RunCounts, weighted_percentiles
from cluster.driver import (
    ActionsFactory,
    PartitionFactory,
    PipelineRun,
    StageFactory,
    config_digest,
)
from cluster.partitions import wait_for_any
from cluster.ray_runtime import settle_heap
from pipelines.decisions import DecisionSink, answers
from pipelines.journal import SCORE_PART, JournalSource
from pipelines.keyed import BatchReceipt
from pipelines.live import LiveSource
from pipelines.normalise import Clock, utc_now
from pipelines.spec import PipelineSpec

#: How long one poll of the source waits while batches are in flight, before the loop
#: collects their receipts again.
POLL_WAIT_S = 0.001
#: How long it waits with nothing in flight: a live source wakes the moment something
#: comes (the journal by inotify, Redis by XREADGROUP's BLOCK, MQTT by its queue), so this
#: only bounds how late the loop turns to its other work (progress, checkpoints, SIGTERM).
IDLE_POLL_S = 0.02
#: How often the ingress hears how far the run has read (its in-flight bound).
PROGRESS_EVERY_S = 0.05

Send = Callable[[list[dict[str, Any]]], None]


def live_run_id(spec: PipelineSpec, source: LiveSource) -> str:
    """A live run's id: of its config and source, so a restarted ``serve`` resumes it."""
    text = "\n".join([spec.name, config_digest(spec), source.name, "live"])
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:10]


class ScoreReplies:
    """The driver's side of ``POST /score``: which events are awaited, and their answers.

    Events read from the journal's ``score`` part are awaited: those ingest dead-letters
    are answered at once with the reason, duplicates of stored events at once as such, the
    rest when their decisions come (``direct``: the partitions send those to the ingress
    themselves; otherwise a receipt brings them here).
    """

    def __init__(self, send: Send, direct: bool = False) -> None:
        self.send, self.direct = send, direct
        self.waiting: set[str] = set()

    def expect(self, ids: Sequence[pa.Array | pa.ChunkedArray], events: pa.Table, dead: pa.Table,
               late: pa.Table) -> None:
        """A ``score`` batch has been ingested: ``ids`` are its lines' event ids as ingest
        gave them (:attr:`~cluster.ingest.Ingest.last_ids`: each line's own, or the one
        derived from its offset, as the ingress derives it), ``events`` go on, ``dead`` were
        dead-lettered, ``late`` were stored in the late lane (older than their key's latest:
        no decision); the ids neither of these are duplicates skipped."""
        asked = {i for column in ids for i in column.to_pylist()}
        asked.discard(None)
        going = set(events.column("event_id").to_pylist())
        replies = [{"event_id": row["event_id"], "dead_letter": {
                    "reason": row["reason"], "message": row["message"]}}
                   for row in dead.select(["event_id", "reason", "message"]).to_pylist()
                   if row["event_id"] in asked]
        replies += [{"event_id": i, "late": True, "scores": [], "alerts": []}
                    for i in late.column("event_id").to_pylist() if i in asked]
        answered = going | {a["event_id"] for a in replies}
        replies += [{"event_id": i, "duplicate": True} for i in sorted(asked - answered)]
        if not self.direct:
            self.waiting |= going & asked
        if replies:
            self.send(replies)

    def decided(self, receipt: BatchReceipt) -> None:
        """A partition's receipt: answer the awaited events it applied."""
        decisions = receipt.decisions
        if decisions is None or not self.waiting or decisions.num_rows == 0:
            return
        found = answers(decisions, pa.array(list(self.waiting), pa.string()))
        if found:
            self.waiting -= {answer["event_id"] for answer in found}
            self.send(found)


class TerminalLine:
    """A progress line on this process's terminal (stderr): rewritten in place, ended by
    :meth:`close`. A run whose terminal is another process's keeps its line instead (see
    :mod:`cluster.chained`), with the same two methods."""

    def show(self, line: str) -> None:
        print(f"\r{line}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


class LiveProgress:
    """One line, rewritten every second: events/s, p99 decision latency, alerts; silent
    otherwise (``line``: where it goes, by default this process's terminal)."""

    def __init__(self, enabled: bool | None, line: TerminalLine | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.line = line or TerminalLine()
        self.last, self.last_read, self.latencies = time.monotonic(), 0, []

    def observe(self, receipt: BatchReceipt) -> None:
        if receipt.rows:
            self.latencies.append(receipt.latency_s)

    def tick(self, counts: RunCounts) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 1.0:
            return
        rate = (counts.read - self.last_read) / (now - self.last)
        p99 = weighted_percentiles(np.array(self.latencies), np.ones(len(self.latencies)), [99])[0]
        self.line.show(f"eventray serve: {rate:8.0f} ev/s  p99 {p99 * 1000:7.1f} ms  alerts {counts.alerts}"
                       f"  stored {counts.stored}  dead {counts.dead_lettered}")
        self.last, self.last_read, self.latencies = now, counts.read, []

    def close(self) -> None:
        if self.enabled:
            self.line.close()


class LiveRun(PipelineRun):
    """A run over a live source: the driver's operators, fed by polling.

    Args:
        spec: the pipeline.
        partitions: builds the partitions' executor (with decisions in its receipts).
        store_root: the event store.
        source: the live source.
        clock: stamps ``ingested_at``.
        stages: builds an enrichment stage's executor.
        run: the run's id (default :func:`live_run_id`).
        actions: builds the run's action dispatchers (see :class:`PipelineRun`).
    """

    def __init__(self, spec: PipelineSpec, partitions: PartitionFactory, store_root: str | Path,
                 source: LiveSource, clock: Clock = utc_now, stages: StageFactory | None = None,
                 run: str | None = None, actions: ActionsFactory | None = None) -> None:
        self.wire(spec, partitions, store_root, source, run or live_run_id(spec, source),
                  [source.name], clock, stages, actions, live=True)
        self.replies: ScoreReplies | None = None
        self.progress_to: Callable[[dict[str, int]], None] | None = None
        #: where the receipts' decisions go (the partitions in process: a chained run's
        #: source's own reply channel, a Redis decision stream), besides the awaited ones
        #: to :attr:`replies`
        self.decisions_to: DecisionSink | None = None
        #: where the live progress line goes (default: this process's terminal)
        self.progress_line: TerminalLine = TerminalLine()
        #: polls so far: a watchdog's sign that the loop turns (:mod:`cluster.chained`)
        self.turns = 0

    def poll_once(self, timeout: float, idle: float | None = None) -> int | None:
        """Ingest what the source has (waiting up to ``timeout``, or ``idle`` when nothing is
        in flight), collect receipts; returns the rows read, or ``None`` when the source was
        not read (no room: see :meth:`has_room`)."""
        self.turns += 1
        rows = 0
        size = self.spec.source.batch_size
        executors = [self.dispatcher.executor, *(e for _, e in self.chain.stages)]
        if not self.has_room():
            # what arrives meanwhile waits in the source, to be read as one batch when there
            # is room: batches grow with the load instead of queueing (a batch's cost is
            # mostly fixed: at 300 events/s, read at once, each was 7 events and they queued).
            # Nothing else can happen until a batch finishes: wait for that, as long as the
            # loop's other work allows (each look at the executors is a Ray call or three)
            done = wait_for_any(executors, timeout if idle is None else max(timeout, idle))
            if done is None:
                self.dispatcher.pump(block=True)
            if done is not False:
                self.pump()
            return None
        raws = self.source.poll(size, 0.0)  # type: ignore[attr-defined]
        finished: bool | None = None
        if not raws and timeout > 0:
            # with batches in flight, wait on them rather than on the source: a stage's
            # answer goes on to the partitions the moment it comes, and the wait spins not
            finished = wait_for_any(executors, timeout)
            wait = 0.0 if finished is not None else (timeout if idle is None else idle)
            raws = self.source.poll(size, wait)  # type: ignore[attr-defined]
        for raw in raws:
            events = self.ingest.read(raw, self.counts)
            if self.replies is not None and raw.part == SCORE_PART:
                self.replies.expect(self.ingest.last_ids, events, self.ingest.last_dead,
                                    self.ingest.last_late)
            self.enter(events)
            rows += raw.num_rows
        if rows or finished is not False:  # a wait that timed out: nothing to collect
            self.pump()
        return rows

    def has_room(self) -> bool:
        """Whether the stages and the partitions take another batch now: fewer than
        ``runtime.max_in_flight`` slices in the stages, and no piece queued for a partition."""
        return len(self.chain) < self.spec.runtime.max_in_flight and not self.dispatcher.queued()

    def commit(self) -> None:
        """An aligned checkpoint of everything read so far, then the source's ack."""
        positions = self.source.positions()  # type: ignore[attr-defined]
        self.checkpoint(positions)
        self.source.committed(positions)  # type: ignore[attr-defined]

    def serve(self, stop: threading.Event, ready: Callable[[], None],
              drain_to: Callable[[], dict[str, int] | None], progress: bool | None) -> dict[str, Any]:
        """Run until ``stop`` is set, then drain; returns the summary.

        Args:
            stop: set by the signal handler.
            ready: called once the partitions are up (``/healthz`` turns 200).
            drain_to: stops intake and returns where each part of the source ends (``None``:
                read until a poll brings nothing).
            progress: the live progress line (default: when stderr is a terminal).
        """
        starting = time.perf_counter()
        latest = self.checkpointer.checkpoints.latest()
        resumed, offsets = self._start(resume=latest is not None)
        live = LiveProgress(progress, self.progress_line)
        self.dispatcher.on_receipt = self._receipt_hook(live)
        self.source.open(offsets or None)  # type: ignore[attr-defined]
        settle_heap()
        ready()
        started = time.perf_counter()
        idle_after = self.spec.store.commit_interval.total_seconds()
        interval = max(idle_after, self.spec.runtime.checkpoint_interval.total_seconds())
        last_commit = last_progress = last_read = time.monotonic()
        try:
            read_since = 0
            while not stop.is_set():
                rows = self.poll_once(POLL_WAIT_S, IDLE_POLL_S)
                now = time.monotonic()
                if rows:
                    read_since, last_read = read_since + rows, now
                if now - last_progress >= PROGRESS_EVERY_S:
                    self._report_progress()
                    last_progress = now
                # under load every checkpoint_interval (it stalls decisions); idle, at once
                if read_since and (now - last_commit >= interval or now - last_read >= idle_after):
                    self.commit()
                    last_commit, read_since = time.monotonic(), 0
                live.tick(self.counts)
            self._drain(drain_to())
            self.commit()
            self.drain_actions()
        finally:
            live.close()
            self.close()
            self.source.close()  # type: ignore[attr-defined]
        return self.result(starting, started, resumed)

    def _receipt_hook(self, live: LiveProgress) -> Callable[[BatchReceipt], None]:
        replies, sink = self.replies, self.decisions_to

        def hook(receipt: BatchReceipt) -> None:
            live.observe(receipt)
            if sink is not None and receipt.decisions is not None and receipt.decisions.num_rows:
                sink.send(receipt.decisions)
            elif replies is not None:
                replies.decided(receipt)
        return hook

    def _report_progress(self) -> None:
        if self.progress_to is not None and isinstance(self.source, JournalSource):
            self.progress_to(self.source.read_offsets())

    def _drain(self, ends: dict[str, int] | None) -> None:
        """Read the source to ``ends`` (or until it has nothing more) and process it."""
        while True:
            rows = self.poll_once(0.01 if ends else 0.0)
            if ends is not None and isinstance(self.source, JournalSource):
                at = self.source.read_offsets()
                if all(at.get(part, 0) >= end for part, end in ends.items()):
                    break
            elif rows == 0:  # read, and nothing came (None: not read, busy)
                break
