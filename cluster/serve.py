"""``eventray serve``: a pipeline over live sources until SIGTERM or SIGINT, then a drain.

The loop: poll the live source (any :class:`~pipelines.live.LiveSource`: the HTTP ingest
journal, Redis Streams, MQTT), ingest what arrived (normalise, dedup, dead-letter), send it
through the enrichment stages and into the keyed partitions, and every
``store.commit_interval`` take an aligned checkpoint and then tell the source what it
covers (``committed``: journal segments removed, ``XACK``...). Checkpoints come every
``runtime.checkpoint_interval`` under load (each drains what is in flight, so decisions
wait behind it), and ``store.commit_interval`` after the source goes quiet; the store's
files do not wait for them (the partitions group-commit every ``store.commit_interval``).
Live sources decide in arrival order: no decision waits for a watermark.

Decisions leave the partitions as soon as a batch is scored: on Ray each partition hands
them straight to the ingress actor, which answers the waiting ``POST /score`` handlers;
in process they come back with the batch's receipt (:attr:`BatchReceipt.decisions`) and
the driver hands them on (:class:`ScoreReplies`). The driver itself answers the events
that never reach a partition: dead letters, duplicates, the late lane.

On SIGTERM or SIGINT: the ingress stops accepting (what it accepted is in the journal),
the run reads the source to its end, processes it, takes a final checkpoint, acknowledges
it, and returns the run's one-line summary.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from cluster.accounting import RunCounts, weighted_percentiles
from cluster.dispatchers import RayDispatchers
from cluster.driver import (
    ActionsFactory,
    PartitionFactory,
    PipelineRun,
    StageFactory,
    config_digest,
)
from cluster.partitions import wait_for_any
from cluster.ray_runtime import settle_heap
from pipelines.decisions import answers
from pipelines.errors import ConfigError
from pipelines.event_ids import derived_event_ids
from pipelines.journal import SCORE_PART, HttpSourceOptions, JournalSource
from pipelines.keyed import BatchReceipt
from pipelines.kinds import build_source, source_kind
from pipelines.live import LiveSource
from pipelines.normalise import Clock, utc_now
from pipelines.sources import RawBatch
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

    def __init__(self, spec: PipelineSpec, send: Send, direct: bool = False) -> None:
        self.send, self.direct = send, direct
        ref = spec.mapping.event_id
        self.id_path = f"$.{ref}" if isinstance(ref, str) else None
        self.waiting: set[str] = set()

    def expect(self, raw: RawBatch, events: pa.Table, dead: pa.Table, late: pa.Table) -> None:
        """A ``score`` batch has been ingested: ``events`` go on, ``dead`` were dead-lettered,
        ``late`` were stored in the late lane (older than their key's latest: no decision)."""
        lines = pl.Series(raw.records.column("line")).cast(pl.String)
        given = lines.str.json_path_match(self.id_path) if self.id_path else None
        if given is None or given.null_count():  # derived only for lines without an id
            derived = pl.Series(derived_event_ids(raw.source, raw.part, raw.offsets))
            given = derived if given is None else given.fill_null(derived)
        asked = set(given.to_list())
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


class LiveProgress:
    """One line on a terminal, rewritten every second: events/s, p99 decision latency,
    alerts; silent otherwise."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
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
        print(f"\reventray serve: {rate:8.0f} ev/s  p99 {p99 * 1000:7.1f} ms  alerts {counts.alerts}"
              f"  stored {counts.stored}  dead {counts.dead_lettered}   ", end="",
              file=sys.stderr, flush=True)
        self.last, self.last_read, self.latencies = now, counts.read, []

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


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

    def poll_once(self, timeout: float, idle: float | None = None) -> int | None:
        """Ingest what the source has (waiting up to ``timeout``, or ``idle`` when nothing is
        in flight), collect receipts; returns the rows read, or ``None`` when the source was
        not read (no room: see :meth:`has_room`)."""
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
                self.replies.expect(raw, events, self.ingest.last_dead, self.ingest.last_late)
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
        live = LiveProgress(progress)
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
        replies = self.replies

        def hook(receipt: BatchReceipt) -> None:
            live.observe(receipt)
            if replies is not None:
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


def ingress_name(run: str) -> str:
    """The ingress actor's name in namespace ``eventray``: the partitions reply to it."""
    return f"{run}-ingress"


def journal_folder(spec: PipelineSpec, store_root: Path) -> Path:
    """The ``http`` source's journal: ``source.path[0]``, under the store when relative."""
    folder = Path(spec.source.path[0])
    return folder if folder.is_absolute() else store_root / folder


def serve_pipeline(config: Path, store: Path | None = None, address: str | None = None,
                   port: int | None = None, progress: bool | None = None,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``eventray serve``: load ``config``, serve until SIGTERM/SIGINT, drain; the summary."""
    from cluster.ray_runtime import prepare_environment

    prepare_environment(address)
    from pipelines.pipeline import load_pipeline

    spec = load_pipeline(config)
    store_root = Path(store or spec.store.path).resolve()
    _, options = source_kind(spec.source, tuple(spec.search_path))
    http = isinstance(options, HttpSourceOptions)
    inputs = [str(journal_folder(spec, store_root))] if http else None
    source = build_source(spec, inputs)
    if spec.source.ordering != "arrival":
        raise ConfigError("serve: a live source decides in arrival order (an event older than "
                          "its key's latest goes the late lane); set source.ordering: arrival")
    if not isinstance(source, LiveSource):
        raise ConfigError(f"serve: source format {spec.source.format!r} is not a live source "
                          "(http, or a kind implementing pipelines.live.LiveSource)")
    token = None
    if http:
        token = os.environ.get(options.token_env)
        if not token:
            raise ConfigError(f"serve: the http source's token is read from ${options.token_env}, "
                              "which is not set")
        if port is not None:
            options = options.model_copy(update={"port": port})
    return _serve_on_ray(spec, store_root, source, options if http else None, token, address,
                         progress, log)


def _serve_on_ray(spec: PipelineSpec, store_root: Path, source: LiveSource,
                  options: HttpSourceOptions | None, token: str | None, address: str | None,
                  progress: bool | None, log: Callable[[str], None]) -> dict[str, Any]:
    import ray

    from cluster.ingress import IngressReplies, ingress_actor_class
    from cluster.job import code_folders
    from cluster.partitions import NAMESPACE, RayPartitions, ray_stages
    from cluster.ray_runtime import ray_session

    runtime = spec.runtime
    stop = threading.Event()
    # Ctrl-C on a terminal signals the whole process group, Ray's own processes too, which
    # would die before the drain: they inherit SIGINT ignored; serve alone handles it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ray_session(address, object_store_mb=runtime.object_store_mb,
                     code_search_path=code_folders(spec, {})) as facts:
        for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
            signal.signal(signum, lambda *_: stop.set())
        http = options is not None
        # a source with a reply channel of its own (a Redis stream of decisions)
        sink = source.decision_sink() if hasattr(source, "decision_sink") else None
        run = LiveRun(spec, lambda run_id: RayPartitions(
            runtime.partitions, store_root, run_id, runtime.max_in_flight, None, spec,
            live=True, decisions_to=IngressReplies(ingress_name(run_id)) if http else sink),
            store_root, source,
            stages=ray_stages(spec, store_root, runtime.max_in_flight),
            actions=lambda run_id: RayDispatchers(spec.actions, store_root, run_id))
        ingress, bound = None, None
        if options is not None:
            assert token is not None and isinstance(source, JournalSource)
            ingress = ingress_actor_class().options(name=ingress_name(run.run),
                                                    namespace=NAMESPACE).remote(
                spec, str(source.folder), options, token)
            bound = ray.get(ingress.start.remote())
            log(f"listening on http://{options.host}:{bound} (POST /events, POST /score, "
                "GET /healthz)")
            run.replies = ScoreReplies(spec, lambda answers: ingress.resolve.remote(answers),
                                       direct=True)
            run.progress_to = lambda consumed: ingress.progress.remote(consumed)

        def ready() -> None:
            if ingress is not None:
                ray.get(ingress.set_ready.remote())
            log("ready")

        def drain_to() -> dict[str, int] | None:
            log("draining")
            return ray.get(ingress.stop_accepting.remote()) if ingress is not None else None

        try:
            summary = run.serve(stop, ready, drain_to, progress)
        finally:
            if ingress is not None:
                ray.get(ingress.close.remote())
                ray.kill(ingress)
    return {**summary, "port": bound, "ray": facts["mode"]}
