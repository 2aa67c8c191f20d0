"""The driver of a run: read, normalise, dead-letter, split by key, dispatch, account.

One loop, the same for an embedded Ray, a cluster and the in-process runner (only the
partition executor differs). Per source batch: normalise (vectorised), write its dead
letters, split its events by partition keeping each key's order, hand each piece to its
partition with the next sequence number. At the end: drain, check that events read =
stored + dead-lettered + filtered, and summarise.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.partitions import partition_writer
from pipelines.checkpoint import Checkpoint, CheckpointStore
from pipelines.dedup import DuplicateFilter
from pipelines.envelope import envelope_schema
from pipelines.errors import AccountingError, ConfigError, UnknownPluginError
from pipelines.fraud import POSITION
from pipelines.keyed import BatchReceipt, split_by_partition
from pipelines.labels import LabelFeed
from pipelines.lanes import BatchSizer, LaneQueues
from pipelines.normalise import Clock, Normaliser, utc_now
from pipelines.pacing import Pacer
from pipelines.processing import stage_class
from pipelines.routing import Router
from pipelines.sources import CsvSource, JsonLinesSource, ParquetSource, Source, iter_batches
from pipelines.spec import EnrichSpec, PipelineSpec, SourceSpec
from pipelines.store import EventStore

INGEST_WRITER = "ingest"
#: How often the paced driver polls its executors while waiting for the next release.
IDLE_POLL_S = 0.001

SOURCE_FORMATS: dict[str, type[Source]] = {
    "parquet": ParquetSource,
    "csv": CsvSource,
    "jsonl": JsonLinesSource,
}


class PartitionExecutor(Protocol):
    restarts: int

    def start_at(self, seqs: dict[int, int]) -> None: ...
    def ready(self) -> None: ...
    def submit(self, partition: int, seq: int, rows: pa.Table) -> None: ...
    def completed(self) -> list[BatchReceipt]: ...
    def drain(self) -> list[BatchReceipt]: ...
    def in_flight(self) -> int: ...
    def capacity(self, partition: int) -> int: ...
    def wait(self) -> None: ...
    def checkpoint(self, epoch: int) -> dict[int, int]: ...
    def committed(self) -> None: ...
    def close(self) -> None: ...


StageFactory = Callable[[str, EnrichSpec], PartitionExecutor]


@dataclass
class _Enriching:
    """A released slice in the enrichment stages: the stage it waits on and its pieces there."""

    frame: pl.DataFrame  # the slice, with its row positions
    stage: int = 0
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (partition, seq) sent


@dataclass
class RunCounts:
    """Counters of one run; ``read + derived == stored + dead_lettered + filtered`` at the end."""

    read: int = 0
    stored: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    filtered: int = 0
    sent: int = 0
    derived: int = 0
    alerts: int = 0
    hop_limited: int = 0
    batches: int = 0
    checkpoints: int = 0
    restarts: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        produced = self.read + self.derived
        if produced != self.stored + self.dead_lettered + self.filtered or self.sent != self.stored:
            raise AccountingError({k: v for k, v in asdict(self).items() if k != "reasons"})


def build_source(spec: SourceSpec, inputs: list[str] | None = None) -> Source:
    """The configured source, reading ``inputs`` instead of ``spec.path`` when given."""
    cls = SOURCE_FORMATS.get(spec.format)
    if cls is None:
        raise UnknownPluginError("source format", spec.format, list(SOURCE_FORMATS))
    kwargs: dict[str, Any] = {"batch_size": spec.batch_size}
    if spec.pattern is not None:
        kwargs["pattern"] = spec.pattern
    return cls(spec.source_name, list(inputs or spec.path), **kwargs)


def ensure_simulated_input(spec: SourceSpec, log: Callable[[str], None]) -> None:
    """Generate the source's files with the simulator when configured and missing."""
    sim = spec.simulate_if_missing
    target = Path(spec.path[0])
    if sim is None or target.exists():
        return
    if spec.format != "parquet":
        raise ConfigError("source.simulate_if_missing needs source.format: parquet")
    from pipelines.simulator import SimulationSpec, simulate_transactions, write_monthly

    log(f"simulating {sim.n_days} days of transactions into {target} (seed {sim.seed})")
    table = simulate_transactions(SimulationSpec(
        n_customers=sim.n_customers, n_terminals=sim.n_terminals,
        start_date=sim.start_date, n_days=sim.n_days, seed=sim.seed))
    write_monthly(table, target)


def run_id(spec: PipelineSpec, source: Source) -> str:
    """A short id of (pipeline, source, parts): rerunning the same input rewrites its files."""
    text = "\n".join([spec.name, source.name, *source.list_parts()])
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:10]


def estimate_rows(source: Source) -> int | None:
    """Rows the source will yield, when its format says so cheaply (Parquet footers)."""
    if not isinstance(source, ParquetSource):
        return None
    return sum(pq.ParquetFile(source.path_of(part)).metadata.num_rows
               for part in source.list_parts())


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: list[float]) -> list[float]:
    """Percentiles of ``values`` where each counts ``weights`` times."""
    if len(values) == 0 or weights.sum() == 0:
        return [0.0 for _ in qs]
    order = np.argsort(values)
    cum = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][min(np.searchsorted(cum, q / 100), len(cum) - 1)]) for q in qs]


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


class PipelineRun:
    """One run: the driver loop, its checkpoints and its resume.

    Use :func:`run_pipeline`; this class only keeps the loop's state in one place.
    """

    def __init__(self, spec: PipelineSpec, executor_factory: Callable[[str], PartitionExecutor],
                 store_root: str | Path, inputs: list[str] | None, clock: Clock,
                 stage_factory: StageFactory | None = None) -> None:
        self.spec = spec
        self.source = build_source(spec.source, inputs)
        self.store = EventStore(store_root)
        self.run = run_id(spec, source=self.source)
        self.checkpoints = CheckpointStore(store_root, self.run)
        self.normaliser, self.duplicates = Normaliser(spec, clock), DuplicateFilter()
        pace = spec.source.pace
        self.pacer = Pacer(pace.speedup, pace.linger_ms / 1000, sleep=self._idle) if pace else None
        self.router = Router(spec)
        self.queues = LaneQueues(spec.runtime.partitions)
        adaptive = spec.runtime.adaptive_batching
        self.sizer = BatchSizer(adaptive, spec.runtime.partitions) if adaptive else None
        self.counts, self.receipts = RunCounts(), []
        self.seqs = [0] * spec.runtime.partitions
        self.offsets: dict[str, int] = {}
        self.epoch = 0
        self.executor_factory = executor_factory
        if spec.enrich and stage_factory is None:
            raise ConfigError("enrich: this runner has no executor for enrichment stages")
        self.stage_factory = stage_factory
        self.stage_seqs = {stage.name: [0] * stage.partitions for stage in spec.enrich}
        self.stage_executors: list[tuple[EnrichSpec, PartitionExecutor]] = []
        self.stage_answers: list[dict[tuple[int, int], pa.Table | None]] = [{} for _ in spec.enrich]
        self.enriching: deque[_Enriching] = deque()
        self.executor: PartitionExecutor | None = None
        self.transit = {c: pa.float64() for stage in spec.enrich for c in stage_class(stage).columns}
        schema = envelope_schema(spec.registry())
        self.labels = LabelFeed(spec.labels, spec.registry(), schema) if spec.labels else None
        self.routed_schema = pa.schema([*schema, *(pa.field(c, t) for c, t in self.transit.items())])

    def restore_or_reset(self, resume: bool) -> bool:
        """Continue from the last checkpoint (``resume``) or clear the run's old output."""
        latest = self.checkpoints.latest() if resume else None
        if latest is None:
            self.checkpoints.clear()
            self.store.truncate(self.run, {})
            return False
        # Keep what each writer wrote before the checkpoint: a partition's events, and the
        # tables its steps wrote under the same sequence numbers.
        writers = {partition_writer(p): seq for p, seq in latest.partition_seqs.items()}
        for step in self.spec.steps:
            writers.update({f"{w}-{step.name}": seq for w, seq in list(writers.items())
                            if "-" not in w})
        self.store.truncate(self.run, {**writers, INGEST_WRITER: latest.deadletter_seq})
        self.duplicates.restore(self.checkpoints.read_state(latest.epoch, "dedup"))
        self.counts = RunCounts(**latest.counts, reasons=dict(latest.reasons))
        self.seqs = [latest.partition_seqs[p] for p in range(len(self.seqs))]
        for name, seqs in latest.stage_seqs.items():
            self.stage_seqs[name] = [seqs[p] for p in range(len(self.stage_seqs[name]))]
        if self.labels is not None:
            self.labels.restore(self.checkpoints.read_state(latest.epoch, "labels"))
        self.offsets, self.epoch = dict(latest.source_offsets), latest.epoch
        return True

    def process(self, raw: Any, executor: PartitionExecutor) -> None:
        out = self.normaliser.normalise(raw, self.duplicates)
        self.store.write("deadletter", out.deadletters, writer=f"{self.run}-{INGEST_WRITER}",
                         seq=self.counts.batches)
        _count(self.counts, out)
        events = out.events
        if self.labels is not None:
            events, released = self.labels.merge(events)
            self.counts.derived += released
        for released_events in self.pacer.release(events) if self.pacer else [events]:
            self.enrich(released_events)
            self.acknowledge(executor.completed())  # frees room in flight for what is queued
            self.dispatch(executor)
            while self._over_queued():
                executor.wait()
                self.acknowledge(executor.completed())
                self.advance_enrichment()
                self.dispatch(executor)
        self.offsets[raw.part] = raw.next_offset
        self.advance_enrichment()
        self.acknowledge(executor.completed())
        self.dispatch(executor)

    def route(self, events: pa.Table, hops: int = 0) -> None:
        """Route a batch and its derived events (hop by hop) into the lanes."""
        # Without max_hops, routes are acyclic (checked at start-up): derivation ends by itself.
        limit = self.spec.routing.max_hops or len(self.spec.routing.routes) + 2
        while events.num_rows:
            events = self._with_transit(events)
            routed = self.router.route(events)
            self.counts.filtered += routed.filtered
            for lane, high in ((routed.high, True), (routed.normal, False)):
                for partition, rows in split_by_partition(lane, self.spec.runtime.partitions):
                    self.queues.offer(partition, rows, high)
            events, hops = routed.derived, hops + 1
            self.counts.derived += events.num_rows
            if events.num_rows and hops > limit:
                self.counts.filtered += events.num_rows  # past the hop limit: counted, dropped
                self.counts.hop_limited += events.num_rows
                break

    def enrich(self, events: pa.Table) -> None:
        """Send a released slice into the enrichment stages; it is routed once they answer.

        Slices are pipelined: the driver goes on reading and routing while the stages work,
        and slices leave the stages (and are routed) in the order they entered, each whole,
        with the stages' columns joined back by row position.
        """
        if not self.stage_executors:
            self.route(events)
            return
        frame = pl.from_arrow(events)
        assert isinstance(frame, pl.DataFrame)
        item = _Enriching(frame.with_row_index(POSITION).with_columns(pl.col(POSITION).cast(pl.Int64)))
        self.enriching.append(item)
        self._submit_to_stage(item, 0)
        self.advance_enrichment()
        while len(self.enriching) > self.spec.runtime.max_in_flight:
            self._wait_enrichment()

    def _submit_to_stage(self, item: _Enriching, index: int) -> None:
        """Hand a slice's rows of stage ``index``'s event types to its partitions."""
        stage, executor = self.stage_executors[index]
        reads = stage_class(stage).reads
        rows = item.frame.filter(pl.col("event_type").is_in(stage.event_types))
        key = pl.col("data").struct.field(stage.key)
        if reads is not None:  # only what the stage reads crosses to its actors
            fields = dict.fromkeys([stage.key, *reads])
            rows = rows.select(POSITION, "event_type", "timestamp",
                               data=pl.struct(pl.col("data").struct.field(*fields)))
        rows = rows.with_columns(key=key.cast(pl.String))
        item.stage, item.waiting = index, []
        seqs = self.stage_seqs[stage.name]
        for partition, piece in split_by_partition(rows.to_arrow(), stage.partitions):
            executor.submit(partition, seqs[partition], piece)
            item.waiting.append((partition, seqs[partition]))
            seqs[partition] += 1

    def advance_enrichment(self) -> None:
        """Join the stages' answers that came back; route finished slices, oldest first."""
        for index, (_, executor) in enumerate(self.stage_executors):
            for receipt in executor.completed():
                self.stage_answers[index][(receipt.partition, receipt.seq)] = receipt.derived
        last = len(self.stage_executors)
        behind = last  # the lowest stage of the slices ahead: none may be overtaken in a stage
        for item in self.enriching:
            while item.stage < last and item.stage < behind and self._answered(item):
                answers = self.stage_answers[item.stage]
                parts = [answers.pop(piece) for piece in item.waiting]
                parts = [p for p in parts if p is not None and p.num_rows]
                if parts:
                    added = pl.from_arrow(pa.concat_tables(parts))
                    assert isinstance(added, pl.DataFrame)
                    item.frame = item.frame.join(added, on=POSITION, how="left",
                                                 maintain_order="left")
                if item.stage + 1 < last:
                    self._submit_to_stage(item, item.stage + 1)
                else:
                    item.stage, item.waiting = last, []
            behind = min(behind, item.stage)
        while self.enriching and self.enriching[0].stage == last:
            self.route(self.enriching.popleft().frame.drop(POSITION).to_arrow())

    def _answered(self, item: _Enriching) -> bool:
        answers = self.stage_answers[item.stage]
        return all(piece in answers for piece in item.waiting)

    def _wait_enrichment(self) -> None:
        """Block until the oldest slice's current stage has answered more, then advance."""
        _, executor = self.stage_executors[self.enriching[0].stage]
        executor.wait()
        self.advance_enrichment()

    def finish_enrichment(self) -> None:
        """Route every slice still in the stages (before a checkpoint, at the end)."""
        self.advance_enrichment()
        while self.enriching:
            self._wait_enrichment()

    def _idle(self, seconds: float) -> None:
        """The pacer's sleep: route what the stages answered and feed the partitions meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self.advance_enrichment()
            if self.executor is not None:
                self.acknowledge(self.executor.completed())
                self.dispatch(self.executor)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, IDLE_POLL_S))

    def _with_transit(self, events: pa.Table) -> pa.Table:
        """The batch in the routed schema: the envelope, then every enrichment column (nulls
        where a stage added none), so that any two pieces of a partition concatenate."""
        if not self.transit:
            return events
        columns = [events.column(field.name) if field.name in events.column_names
                   else pa.nulls(events.num_rows, field.type) for field in self.routed_schema]
        return pa.table(columns, names=self.routed_schema.names).cast(self.routed_schema)

    def dispatch(self, executor: PartitionExecutor) -> None:
        """Hand queued batches to partitions with room in flight, high lane first."""
        for partition in range(self.spec.runtime.partitions):
            while executor.capacity(partition) > 0:
                limit = self.sizer.max_rows(partition) if self.sizer else None
                rows = self.queues.take(partition, limit)
                if rows is None:
                    break
                executor.submit(partition, self.seqs[partition], rows)
                self.seqs[partition] += 1
                self.counts.sent += rows.num_rows

    def _over_queued(self) -> bool:
        bound = self.spec.runtime.max_queued_batches
        return any(self.queues.pieces(p) > bound for p in range(self.spec.runtime.partitions))

    def flush(self, executor: PartitionExecutor) -> None:
        """Dispatch everything queued (waiting for room as needed)."""
        self.dispatch(executor)
        while not self.queues.empty():
            executor.wait()
            self.acknowledge(executor.completed())
            self.dispatch(executor)

    def acknowledge(self, receipts: list[BatchReceipt]) -> None:
        self.counts.stored += sum(r.rows for r in receipts)
        self.receipts += receipts
        for receipt in receipts:  # events the partitions' steps emitted (alerts)
            if receipt.derived is not None and receipt.derived.num_rows:
                self.counts.derived += receipt.derived.num_rows
                self.counts.alerts += receipt.derived.num_rows
                self.route(receipt.derived, hops=1)
        if self.sizer is not None:
            for receipt in receipts:
                self.sizer.observe(receipt.partition, receipt.rows, receipt.apply_s)

    def checkpoint(self, executor: PartitionExecutor) -> None:
        """An aligned checkpoint at this source-batch boundary (drains in-flight batches)."""
        self.epoch += 1
        self.finish_enrichment()
        while True:  # until no acknowledged batch brings derived events to dispatch
            self.flush(executor)
            self.acknowledge(executor.drain())
            if not self.queues.empty():
                continue
            seqs = executor.checkpoint(self.epoch)
            self.acknowledge(executor.completed())
            if self.queues.empty():
                break
        if seqs != dict(enumerate(self.seqs)):
            raise AccountingError({"checkpoint_epoch": self.epoch, **{
                f"partition_{p}_at": s for p, s in seqs.items()}})
        stage_seqs = {}
        for stage, stage_executor in self.stage_executors:
            stage_seqs[stage.name] = stage_executor.checkpoint(self.epoch)
            if stage_seqs[stage.name] != dict(enumerate(self.stage_seqs[stage.name])):
                raise AccountingError({"checkpoint_epoch": self.epoch, "stage": stage.name})
        self.checkpoints.write_state(self.epoch, "dedup", self.duplicates.snapshot())
        if self.labels is not None:
            self.checkpoints.write_state(self.epoch, "labels", self.labels.snapshot())
        counts = {k: v for k, v in asdict(self.counts).items() if k != "reasons"}
        self.checkpoints.commit(Checkpoint(
            self.epoch, dict(self.offsets), seqs, self.counts.batches, counts,
            dict(self.counts.reasons), stage_seqs))
        executor.committed()
        for _, stage_executor in self.stage_executors:
            stage_executor.committed()
        self.counts.checkpoints += 1

    def execute(self, resume: bool, progress: bool | None) -> dict[str, Any]:
        resumed = self.restore_or_reset(resume)
        starting = time.perf_counter()
        executor = self.executor = self.executor_factory(self.run)
        executor.start_at(dict(enumerate(self.seqs)))
        for stage in self.spec.enrich:
            assert self.stage_factory is not None
            stage_executor = self.stage_factory(self.run, stage)
            stage_executor.start_at(dict(enumerate(self.stage_seqs[stage.name])))
            self.stage_executors.append((stage, stage_executor))
        for ready in [executor, *(e for _, e in self.stage_executors)]:
            ready.ready()  # actors up (imports, models, restored state) before the clock
        bar = Progress(estimate_rows(self.source), progress, initial=self.counts.read)
        every = self.spec.runtime.checkpoint_every
        started = time.perf_counter()
        try:
            for raw in iter_batches(self.source, self.offsets):
                self.process(raw, executor)
                if self.counts.batches % every == 0:
                    self.checkpoint(executor)
                bar.update(raw.num_rows, self.counts, executor.in_flight())
            if self.labels is not None:  # the source has ended: the rest of the label feed
                rest = self.labels.flush()
                self.counts.derived += rest.num_rows
                self.enrich(rest)
            self.checkpoint(executor)
            self.counts.restarts = executor.restarts + sum(e.restarts for _, e in self.stage_executors)
        finally:
            bar.close()
            executor.close()
            for _, stage_executor in self.stage_executors:
                stage_executor.close()
        self.counts.check()
        elapsed = time.perf_counter() - started
        return {**_summary(self.spec, self.counts, self.receipts, elapsed, self.store),
                "startup_s": round(started - starting, 3), "run": self.run, "resumed": resumed}


def run_pipeline(
    spec: PipelineSpec,
    executor_factory: Callable[[str], PartitionExecutor],
    store_root: str | Path,
    inputs: list[str] | None = None,
    progress: bool | None = None,
    clock: Clock = utc_now,
    resume: bool = False,
    stage_factory: StageFactory | None = None,
) -> dict[str, Any]:
    """Run a pipeline to the end of its source; returns the summary (see the CLI).

    Args:
        spec: the validated pipeline.
        executor_factory: builds the partition executor, given the run's file prefix.
        store_root: the event store's directory.
        inputs: paths to read instead of ``spec.source.path``.
        progress: show a progress bar (default: when stderr is a terminal).
        clock: stamps ``ingested_at`` (inject a fixed clock for byte-identical stores).
        resume: continue from the run's last checkpoint instead of starting over.
        stage_factory: builds an enrichment stage's executor, given the run's prefix and
            the stage (needed when the pipeline has ``enrich`` stages).
    """
    run = PipelineRun(spec, executor_factory, store_root, inputs, clock, stage_factory)
    return run.execute(resume, progress)


def _count(counts: RunCounts, out: Any) -> None:
    counts.read += out.read
    counts.batches += 1
    dead = out.deadletters.num_rows
    counts.dead_lettered += dead
    if dead:
        reasons, n = np.unique(out.deadletters.column("reason").to_numpy(zero_copy_only=False),
                               return_counts=True)
        for reason, k in zip(reasons.tolist(), n.tolist(), strict=True):
            counts.reasons[reason] = counts.reasons.get(reason, 0) + k
        counts.duplicates = counts.reasons.get("duplicate_event_id", 0)


def _summary(spec: PipelineSpec, counts: RunCounts, receipts: list[BatchReceipt],
             elapsed: float, store: EventStore) -> dict[str, Any]:
    latencies = np.array([r.latency_s for r in receipts], dtype=float)
    weights = np.array([r.rows for r in receipts], dtype=float)
    p50, p99 = weighted_percentiles(latencies, weights, [50, 99])
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
    }
