"""The driver of a run: a short loop over the run's operators.

Per source batch: ingest it (normalise, dead-letter, schedule labels), release it (paced,
or at once) into the enrichment stages (:mod:`cluster.enrichment`), route the slices that
leave them into the keyed partitions (:mod:`cluster.dispatch`), and every
``checkpoint_every`` batches take an aligned checkpoint (:mod:`cluster.checkpointing`).
At the end: drain, check that events read + derived = stored + dead-lettered + filtered,
and summarise. The loop is the same for an embedded Ray, a cluster and the in-process
runner; only the executors differ.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.accounting import RunCounts
from cluster.checkpointing import Checkpointer, RunIdentity
from cluster.dispatch import Dispatcher
from cluster.enrichment import EnrichmentChain
from cluster.ingest import Ingest
from cluster.operators import KeyedExecutor
from pipelines.actions.ledger import run_outcomes
from pipelines.envelope import envelope_schema
from pipelines.errors import ConfigError
from pipelines.kinds import build_source, repartitioned_patterns, stage_class, wants_watermarks
from pipelines.merged_source import EventTimeMergedSource, TimestampMicros
from pipelines.normalise import Clock, utc_now
from pipelines.pacing import Pacer
from pipelines.processing import PATTERN_COPY
from pipelines.sources import CsvSource, ParquetSource, RawBatch, Source, iter_batches
from pipelines.spec import EnrichSpec, PipelineSpec
from pipelines.store import EventStore

#: How often the paced driver polls its executors while waiting for the next release.
IDLE_POLL_S = 0.001

PartitionFactory = Callable[[str], KeyedExecutor]
StageFactory = Callable[[str, EnrichSpec], KeyedExecutor]
#: Builds the run's action dispatchers, given its id (see :mod:`cluster.dispatchers`).
ActionsFactory = Callable[[str], Any]


def config_digest(spec: PipelineSpec) -> str:
    """A digest of what the pipeline computes: the config less its runtime, store and
    search path (changing the partition count keeps the run's identity, so that
    ``--resume`` can refuse the change instead of silently starting another run)."""
    # no actions: the digest of a pipeline from before the section existed, run ids unchanged
    unset = {"actions"} if spec.actions is None else set()
    text = spec.model_dump_json(exclude={"runtime", "store", "search_path", *unset})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(spec: PipelineSpec, source: Source) -> str:
    """The default id of a run: of its config and its input (source name and parts), so
    rerunning the same input rewrites its files, and adding a file makes another run."""
    text = "\n".join([spec.name, config_digest(spec), source.name, *source.list_parts()])
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:10]


def estimate_rows(source: Source) -> int | None:
    """Rows the source will yield, when its format says so cheaply (Parquet footers)."""
    if not isinstance(source, ParquetSource):
        return None
    return sum(pq.ParquetFile(source.path_of(part)).metadata.num_rows
               for part in source.list_parts())


class Progress:
    """A progress bar on a terminal (events, events/s); silent otherwise."""

    def __init__(self, total: int | None, enabled: bool | None = None, initial: int = 0) -> None:
        from tqdm import tqdm

        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=initial, unit="ev", unit_scale=True,
                        disable=not show, file=sys.stderr, dynamic_ncols=True, desc="events")

    def update(self, rows: int, counts: RunCounts, in_flight: int) -> None:
        self.bar.update(rows)
        # lag: events read but not yet stored (queued in the driver or in flight)
        self.bar.set_postfix(stored=counts.stored, dead=counts.dead_lettered,
                             lag=counts.read + counts.derived - counts.filtered
                             - counts.dead_lettered - counts.stored,
                             in_flight=in_flight, refresh=False)

    def close(self) -> None:
        self.bar.close()


def routed_schema(spec: PipelineSpec) -> pa.Schema:
    """The schema of routed batches: the envelope, the enrichment stages' transit columns,
    and the copy marker when patterns are keyed otherwise than their events."""
    transit = [pa.field(c, pa.float64()) for stage in spec.enrich
               for c in stage_class(stage, tuple(spec.search_path)).columns]
    if repartitioned_patterns(spec):
        transit.append(pa.field(PATTERN_COPY, pa.int32()))
    return pa.schema([*envelope_schema(spec.registry()), *transit])


class PipelineRun:
    """One run: its operators and the loop over them. Use :func:`run_pipeline`."""

    def __init__(self, spec: PipelineSpec, partitions: PartitionFactory,
                 store_root: str | Path, inputs: list[str] | None, clock: Clock,
                 stages: StageFactory | None = None, run: str | None = None,
                 actions: ActionsFactory | None = None) -> None:
        source = build_source(spec, inputs)
        self.wire(spec, partitions, store_root, source, run or run_id(spec, source),
                  source.list_parts(), clock, stages, actions)
        pace = spec.source.pace
        self.pacer = Pacer(pace.speedup, pace.linger_ms / 1000) if pace else None

    def wire(self, spec: PipelineSpec, partitions: PartitionFactory, store_root: str | Path,
             source: Any, run: str, parts: list[str], clock: Clock, stages: StageFactory | None,
             actions: ActionsFactory | None, live: bool = False) -> None:
        """What every run has: its store, ingest, checkpointer, executor factories and the
        schema of its routed batches (``parts``: what the run's identity is made of)."""
        if spec.enrich and stages is None:
            raise ConfigError("enrich: this runner has no executor for enrichment stages")
        self.spec, self.source, self.run = spec, source, run
        self.store = EventStore(store_root)
        self.counts = RunCounts()
        self.ingest = Ingest(spec, self.store, run, clock, live=live)
        self.checkpointer = Checkpointer(spec, self.store, run, RunIdentity.of(
            spec, config_digest(spec), parts), clock)
        self.pacer: Pacer | None = None
        self.partition_factory, self.stage_factory = partitions, stages
        delivered = spec.actions is not None and spec.actions.delivered
        self.actions_factory = actions if delivered else None
        self.actions: Any = None
        self.routed_schema = routed_schema(spec)
        self.watermarks = wants_watermarks(spec)
        self.live = live

    def _start(self, resume: bool) -> tuple[bool, dict[str, int]]:
        """Restore (or reset) the run, then start its executors and wait for them."""
        restored = self.checkpointer.restore(resume, self.ingest)
        if restored is not None:
            self.counts = restored.counts
        seqs = restored.partition_seqs if restored else [0] * self.spec.runtime.partitions
        stage_seqs = {s.name: (restored.stage_seqs.get(s.name) if restored else None)
                      or [0] * s.partitions for s in self.spec.enrich}
        if self.actions_factory is not None:  # secrets checked before any partition starts
            self.actions = self.actions_factory(self.run)
        executor = self.partition_factory(self.run)
        stage_executors = [self.stage_factory(self.run, stage)  # type: ignore[misc]
                           for stage in self.spec.enrich]
        for started in [executor, *stage_executors, *([self.actions] if self.actions else [])]:
            started.ready()  # actors up (imports, models, restored state) before the clock
        # live: a partition's queued pieces go as one batch (their number depends on timing
        # alone; a replay's batches are those of its input, so that its files are the same)
        coalesce = self.spec.source.batch_size if self.live else None
        self.dispatcher = Dispatcher(self.spec, executor, seqs, self.counts, self.routed_schema,
                                     coalesce)
        self.chain = EnrichmentChain(self.spec, stage_executors, stage_seqs, self.counts)
        return restored is not None, dict(restored.source_offsets) if restored else {}

    def release(self, events: pa.Table) -> None:
        """Release a batch into the stages: at once, or paced (working while it waits)."""
        if self.pacer is None:
            self.enter(events)
            return
        self.pacer.add(events)
        while self.pacer.pending:
            piece = self.pacer.take()
            if piece is not None:
                self.enter(piece)
                continue
            wake = self.pacer.next_wake() or 0.0
            while (left := wake - time.monotonic()) > 0:
                self.pump()
                time.sleep(min(left, IDLE_POLL_S))

    def enter(self, events: pa.Table) -> None:
        """One released slice: through the stages, routed, dispatched (bounded queues)."""
        for finished in self.chain.submit(events):
            self.dispatcher.route(finished)
        self.dispatcher.pump()
        while self.dispatcher.over_queued():
            self.dispatcher.pump(block=True)
            for finished in self.chain.advance():
                self.dispatcher.route(finished)

    def pump(self) -> None:
        """Route what left the stages, acknowledge what the partitions finished, dispatch."""
        for finished in self.chain.advance():
            self.dispatcher.route(finished)
        self.dispatcher.pump()

    def checkpoint(self, offsets: dict[str, int], final: bool = False) -> None:
        """An aligned checkpoint at this source-batch boundary (drains in-flight batches);
        steps that want the watermark are told it first (``final``: the input has ended)."""
        for finished in self.chain.finish():
            self.dispatcher.route(finished)
        if self.watermarks:
            self.dispatcher.advance_watermark(self.ingest.watermark_us, final)
        self.checkpointer.take(self.dispatcher, self.chain, self.ingest, self.counts, offsets)
        if self.actions is not None:
            self.actions.poll()  # a dead dispatcher is replaced; it resends what is unacknowledged

    def _batches(self, offsets: dict[str, int]) -> Iterator[RawBatch]:
        """The source's batches; a bounded Parquet or CSV source in event-time order reads
        its files merged by their timestamps, whatever order they were given in."""
        source, mapping = self.source, self.spec.mapping
        merge = self.spec.source.ordering == "event-time" and len(source.list_parts()) > 1
        if merge and isinstance(source, ParquetSource | CsvSource):  # one file needs no merge
            merged = EventTimeMergedSource(source, mapping.timestamp, TimestampMicros(mapping.timestamp_unit))
            return merged.batches(offsets)
        return iter_batches(source, offsets)

    def execute(self, resume: bool, progress: bool | None) -> dict[str, Any]:
        if not isinstance(self.source, Source):  # a live source has no end to run to
            raise ConfigError(f"source format {self.spec.source.format!r} is a live source: "
                              "`eventray serve` runs it (`run` reads a source to its end)")
        starting = time.perf_counter()
        resumed, offsets = self._start(resume)
        bar = Progress(estimate_rows(self.source), progress, initial=self.counts.read)
        every = self.spec.runtime.checkpoint_every
        started = time.perf_counter()
        try:
            for raw in self._batches(offsets):
                self.release(self.ingest.read(raw, self.counts))
                offsets[raw.part] = raw.next_offset
                self.pump()
                if self.counts.batches % every == 0:
                    self.checkpoint(offsets)
                bar.update(raw.num_rows, self.counts, self.dispatcher.executor.in_flight())
            rest = self.ingest.rest(self.counts)
            if rest is not None:  # the source has ended: no pacing, nothing comes after it
                self.enter(rest)
            self.checkpoint(offsets, final=True)
            self.drain_actions()
        finally:
            bar.close()
            self.close()
        return self.result(starting, started, resumed)

    def drain_actions(self) -> None:
        """A run ends once its outbox is drained: what it decided is delivered or parked."""
        if self.actions is not None:
            self.actions.drain()
        self.counts.restarts = self.dispatcher.executor.restarts + self.chain.restarts

    def close(self) -> None:
        """Stop the run's executors and action dispatchers."""
        self.dispatcher.executor.close()
        self.chain.close()
        if self.actions is not None:
            self.actions.close()

    def result(self, starting: float, started: float, resumed: bool) -> dict[str, Any]:
        """The run's summary, once the accounting invariant is checked."""
        self.counts.check()
        elapsed = time.perf_counter() - started
        return {**self.summary(elapsed), "startup_s": round(started - starting, 3),
                "run": self.run, "resumed": resumed}

    def summary(self, elapsed: float) -> dict[str, Any]:
        """The run's summary fields, with its actions' outcomes when it has actions."""
        summary = _summary(self.spec, self.counts, self.dispatcher, elapsed, self.store)
        if self.spec.actions is not None:
            summary["actions"] = {**run_outcomes(self.store, self.run),
                                  "dispatcher_restarts": getattr(self.actions, "restarts", 0)}
        return summary


def run_pipeline(
    spec: PipelineSpec,
    executor_factory: PartitionFactory,
    store_root: str | Path,
    inputs: list[str] | None = None,
    progress: bool | None = None,
    clock: Clock = utc_now,
    resume: bool = False,
    stage_factory: StageFactory | None = None,
    run_id: str | None = None,
    actions_factory: ActionsFactory | None = None,
) -> dict[str, Any]:
    """Run a pipeline to the end of its source; returns the summary (see the CLI).

    Args:
        spec: the validated pipeline.
        executor_factory: builds the partitions' executor, given the run's id.
        store_root: the event store's directory.
        inputs: paths to read instead of ``spec.source.path``.
        progress: show a progress bar (default: when stderr is a terminal).
        clock: stamps ``ingested_at`` (inject a fixed clock for byte-identical stores).
        resume: continue from the run's last checkpoint instead of starting over.
        stage_factory: builds an enrichment stage's executor, given the run's id and the
            stage (needed when the pipeline has ``enrich`` stages).
        run_id: the run's id (default: derived from the config and the input).
        actions_factory: builds the run's action dispatchers, given its id (needed to
            deliver the actions of a pipeline with ``actions``; the outbox is written
            without it).
    """
    run = PipelineRun(spec, executor_factory, store_root, inputs, clock, stage_factory, run_id,
                      actions_factory)
    return run.execute(resume, progress)


def _summary(spec: PipelineSpec, counts: RunCounts, dispatcher: Dispatcher,
             elapsed: float, store: EventStore) -> dict[str, Any]:
    p50, p99 = dispatcher.latencies.percentiles([50, 99])
    return {
        "pipeline": spec.name,
        "events_in": counts.read,
        "stored": counts.stored,
        "dead_lettered": counts.dead_lettered,
        "duplicates": counts.duplicates,
        "filtered": counts.filtered,
        "derived": counts.derived,
        "hop_limited": counts.hop_limited,
        "alerts": counts.alerts,
        "reasons": dict(sorted(counts.reasons.items())),
        "partitions": spec.runtime.partitions,
        "batches": counts.batches,
        "checkpoints": counts.checkpoints,
        "restarts": counts.restarts,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(counts.read / elapsed, 1) if elapsed > 0 else None,
        "latency_ms": {"p50": round(p50 * 1000, 2), "p99": round(p99 * 1000, 2)},
        "store": str(store.root),
        **dict(sorted(counts.steps.items())),  # the steps' own counters (pattern matches...)
    }
