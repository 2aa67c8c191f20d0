"""Keyed processing: splitting batches by partition and applying them strictly in order.

:func:`split_by_partition` sends each event to the partition that owns its key (the one
routing function, :func:`pipelines.hashing.partition_of`), with a stable sort so every
key's events keep their source order. A :class:`PartitionWorker` owns one partition: it
applies batches by sequence number, exactly once. A replay of a batch it already applied is
acknowledged without effect; a batch that skips ahead raises :class:`SequenceGapError` so
the caller resends what is missing. The Ray actor in ``cluster`` is a thin shell around
it; the in-process runner uses it directly.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.actions.outbox import ACTIONS_STEP, ActionRules
from pipelines.errors import PipelineError
from pipelines.hashing import partition_of
from pipelines.poison import (
    PROCESSOR_ERROR,
    Outputs,
    StateLog,
    StepFailure,
    dead_letters,
    isolate,
    run_steps,
    step_states,
)
from pipelines.processing import ROW_POSITION, Step, without_copies
from pipelines.tables import conform, take_rows
from pipelines.writers import WriterId

Clock = Callable[[], dt.datetime]
#: The "step" of a partition's dead letters in its writers' names: never a step's name
#: (those start with a letter or a digit).
DEADLETTER_STEP = "_deadletter"


class SequenceGapError(PipelineError):
    """A partition got batch ``got`` while it expects ``expected``: resend from there."""

    def __init__(self, partition: int, expected: int, got: int) -> None:
        self.partition, self.expected, self.got = partition, expected, got
        super().__init__(f"partition {partition} expects batch {expected}, got {got}")

    def __reduce__(self) -> tuple[type, tuple[int, int, int]]:
        # raised inside an actor, unpickled by the driver: rebuild it from its fields
        return SequenceGapError, (self.partition, self.expected, self.got)


class Sink(Protocol):
    """Where a partition writes: the event store, or a :class:`pipelines.testing.ListSink`."""

    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> object: ...


def merge_counters(total: dict[str, int], *more: dict[str, int]) -> dict[str, int]:
    """Add counters into ``total`` (``max_``-prefixed ones keep the largest); returns it.

    Example:
        >>> merge_counters({"n": 1, "max_k": 5}, {"n": 2, "max_k": 3})
        {'n': 3, 'max_k': 5}
    """
    for counters in more:
        for name, value in counters.items():
            total[name] = max(total.get(name, value), value) if name.startswith("max_") \
                else total.get(name, 0) + value
    return total


#: From how many rows :func:`split_by_partition` gathers through Polars (faster on many).
_POLARS_GATHER_ROWS = 1024


def split_by_partition(events: pa.Table, partitions: int) -> list[tuple[int, pa.Table]]:
    """``(partition, rows)`` for every partition that has rows, source order kept per key.

    Example:
        >>> t = pa.table({"key": ["a", "d", "a", "c"], "n": [1, 2, 3, 4]})
        >>> [(p, rows["n"].to_pylist()) for p, rows in split_by_partition(t, 2)]
        [(0, [2]), (1, [1, 3, 4])]
    """
    if events.num_rows == 0:
        return []
    if partitions == 1:  # no key to hash (a chained run's operators each have one)
        return [(0, events)]
    owner = partition_of(events.column("key"), partitions)
    counts = np.bincount(owner, minlength=partitions)
    if (np.diff(owner) >= 0).all():  # already in partition order (a batch of one key): no gather
        ordered = events
    else:
        order = np.argsort(owner, kind="stable")
        # Arrow's take costs microseconds on a few rows, Polars' gather a fixed ~1 ms
        ordered = events.take(pa.array(order)) if events.num_rows < _POLARS_GATHER_ROWS \
            else take_rows(events, order)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [
        (p, ordered.slice(int(bounds[p]), int(counts[p])))
        for p in range(partitions)
        if counts[p]
    ]


@dataclass(frozen=True)
class BatchReceipt:
    """What applying one batch did; ``latency_s`` is ingestion to stored, per batch.

    ``rows`` counts the events applied (and stored); ``dead_lettered`` the poison events
    a step raised on, dead-lettered instead, by reason code in ``reasons``; ``poisoned``
    their row positions (:data:`~pipelines.processing.ROW_POSITION`) when the batch
    carries them, so an enrichment stage's caller drops them from its slice.
    """

    partition: int
    seq: int
    rows: int
    applied: bool
    latency_s: float
    apply_s: float = 0.0
    derived: pa.Table | None = None  # events the steps emitted (alerts...), to route again
    alerts: int = 0  # rows the steps wrote to the ``alerts`` table
    dead_lettered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    poisoned: pa.Array | None = None
    counters: dict[str, int] = field(default_factory=dict)  # the steps' (StepOutput.counters)
    #: with :attr:`PartitionWorker.decisions` on: what the batch decided, per applied event
    #: (:func:`decisions_of`), handed back as soon as the batch is scored
    decisions: pa.Table | None = None


#: One row per applied event and step that scored it (``step`` null for an event no step
#: scored); ``alert`` is the alert's type where the score raised one.
DECISIONS_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()), pa.field("step", pa.string()),
    pa.field("model", pa.string()), pa.field("score", pa.float64()),
    pa.field("alert", pa.string()), pa.field("threshold", pa.float64()),
])


def decisions_of(kept: pa.Table, outputs: Outputs) -> pa.Table:
    """The decisions of a batch: its applied events' ids joined with the ``scores`` and
    ``alerts`` rows its steps wrote (a synchronous caller's answer).

    Example:
        >>> decisions_of(pa.table({"event_id": ["a"]}), []).to_pylist()[0]["step"] is None
        True
    """
    looked_up = _decisions_by_lookup(kept, outputs)
    if looked_up is not None:
        return looked_up
    ids = _frame(kept, {"event_id": pl.String})
    scores = [_frame(output.tables["scores"], {"event_id": pl.String, "model": pl.String,
                                               "score": pl.Float64}).with_columns(step=pl.lit(name))
              for name, output in outputs if "scores" in output.tables]
    alerts = [_frame(output.tables["alerts"].rename_columns({"event_type": "alert"}),
                     {"event_id": pl.String, "alert": pl.String, "threshold": pl.Float64})
              .with_columns(step=pl.lit(name))
              for name, output in outputs if "alerts" in output.tables]
    frame = ids.join(pl.concat(scores), on="event_id", how="left") if scores else \
        ids.with_columns(step=pl.lit(None, pl.String), model=pl.lit(None, pl.String),
                         score=pl.lit(None, pl.Float64))
    if alerts:
        frame = frame.join(pl.concat(alerts), on=["event_id", "step"], how="left")
    else:
        frame = frame.with_columns(alert=pl.lit(None, pl.String), threshold=pl.lit(None, pl.Float64))
    return frame.to_arrow().select(DECISIONS_SCHEMA.names).cast(DECISIONS_SCHEMA)


def _decisions_by_lookup(kept: pa.Table, outputs: Outputs) -> pa.Table | None:
    """:func:`decisions_of` with Arrow lookups instead of Polars joins, for the usual batch:
    at most one step wrote ``scores`` (and ``alerts``), each event id at most once, so a
    join is a lookup of each applied event's row (a live batch is often one event, and the
    joins' queries cost a millisecond whatever the rows). ``None`` for any other batch."""
    scores = [(name, output.tables["scores"]) for name, output in outputs if "scores" in output.tables]
    alerts = [(name, output.tables["alerts"]) for name, output in outputs if "alerts" in output.tables]
    if "event_id" not in kept.column_names or len(scores) > 1 or len(alerts) > 1 \
            or (alerts and (not scores or alerts[0][0] != scores[0][0])):
        return None
    ids = kept.column("event_id").cast(pa.string())
    columns = {field.name: pa.nulls(kept.num_rows, field.type) for field in DECISIONS_SCHEMA}
    columns["event_id"] = ids
    if scores:
        name, rows = scores[0]
        at = _row_of(ids, rows)
        if at is None:
            return None
        columns["step"] = pc.if_else(pc.is_null(at), pa.scalar(None, pa.string()), name)
        columns["model"], columns["score"] = rows.column("model").take(at), rows.column("score").take(at)
        raised = alerts[0][1] if alerts else None
        if raised is not None and raised.num_rows:
            alert_at = _row_of(ids, raised)
            if alert_at is None:
                return None
            alert_at = pc.if_else(pc.is_null(at), pa.scalar(None, alert_at.type), alert_at)  # scored only
            columns["alert"] = raised.column("event_type").take(alert_at)
            columns["threshold"] = raised.column("threshold").take(alert_at)
    names = DECISIONS_SCHEMA.names
    arrays = [pa.chunked_array(columns[name]) if isinstance(columns[name], pa.Array) else columns[name]
              for name in names]
    return conform(pa.Table.from_arrays(arrays, names=names), DECISIONS_SCHEMA)


def _row_of(ids: pa.ChunkedArray, rows: pa.Table) -> pa.Array | None:
    """Each id's row in ``rows`` (null: none); ``None`` when ``rows`` repeats an id."""
    keys = rows.column("event_id").cast(pa.string())
    if len(pc.unique(keys)) != len(keys):
        return None
    return pc.index_in(ids, value_set=keys.combine_chunks(), skip_nulls=True)


def _frame(rows: pa.Table, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """``columns`` of ``rows`` as a Polars frame of those types (nulls where absent)."""
    frame = pl.from_arrow(rows.select([c for c in columns if c in rows.column_names]))
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col(c).cast(t) if c in frame.columns else pl.lit(None, t).alias(c)
                              for c, t in columns.items()).select(list(columns))


class PartitionWorker:
    """Applies one partition's batches in sequence and writes them to the store.

    A step that raises on some events of a batch does not fail it: those events are found
    (:mod:`pipelines.poison`), written to ``deadletter`` as ``processor_error`` under
    ``deadletter_writer`` and the rest of the batch is applied without them.

    Example:
        >>> from pipelines.testing import FakeClock, ListSink
        >>> worker = PartitionWorker(0, ListSink(), clock=FakeClock())
        >>> worker.apply(0, pa.table({"key": ["a"]})).applied
        True
        >>> worker.apply(0, pa.table({"key": ["a"]})).applied  # a replay: no effect
        False
    """

    def __init__(self, partition: int, sink: Sink, clock: Clock | None = None,
                 steps: Sequence[Step] = (), store_events: bool = True,
                 writer: WriterId | None = None,
                 deadletter_writer: WriterId | None = None,
                 actions: ActionRules | None = None) -> None:
        self.partition = partition
        self.actions = actions  # the outbox: written in the apply that decides
        self.writer = writer or WriterId.partition("local", partition)
        self.deadletter_writer = deadletter_writer or self.writer.for_step(DEADLETTER_STEP)
        self.sink = sink
        self.store_events = store_events
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.steps = list(steps)
        self.log = StateLog(self.steps)
        self.next_seq = 0
        #: hand each batch's decisions back in its receipt (``eventray serve``'s ``/score``)
        self.decisions = False

    def apply(self, seq: int, events: pa.Table) -> BatchReceipt:
        if seq < self.next_seq:
            return BatchReceipt(self.partition, seq, events.num_rows, False, 0.0)
        if seq > self.next_seq:
            raise SequenceGapError(self.partition, self.next_seq, seq)
        started = time.perf_counter()
        outputs, kept, poison = self._process(events)
        counters = merge_counters({}, *(output.counters for _, output in outputs))
        try:
            derived, alerts = self._write(seq, outputs, kept)
            if poison:
                owner = WriterId(self.deadletter_writer.run, self.deadletter_writer.owner)
                self.sink.write("deadletter", dead_letters(events, poison, owner.name, self.clock()),
                                writer=self.deadletter_writer.name, seq=seq)
        except BaseException:
            self.log.rewind()  # the steps went past a batch that was not applied: go back
            raise
        self.log.applied(kept)
        self.next_seq += 1
        stored = without_copies(kept).num_rows  # a pattern's copies are never stored
        return BatchReceipt(self.partition, seq, stored, True, self._latency(events),
                            time.perf_counter() - started, derived, alerts,
                            len(poison), {PROCESSOR_ERROR: len(poison)} if poison else {},
                            self._positions(events, poison), counters,
                            decisions_of(without_copies(kept), outputs) if self.decisions else None)

    def _process(self, events: pa.Table) -> tuple[Outputs, pa.Table, dict[int, StepFailure]]:
        """The steps' outputs, the events applied and the poison events by row."""
        try:
            return run_steps(self.steps, events), events, {}
        except StepFailure as failure:
            if failure.environmental:
                self.log.rewind()
                raise failure.error from None
            before = self.log.rewind()
            try:
                return isolate(self.steps, events, before, failure)
            except BaseException:
                self.log.rewind()  # no event explained it: the batch fails, the state stays
                raise

    def _write(self, seq: int, outputs: Outputs, kept: pa.Table) -> tuple[pa.Table | None, int]:
        """Write the steps' tables, then the events (decisions first); returns the derived
        events and the number of alerts."""
        derived, alerts = [], 0
        for name, output in outputs:
            for table, rows in output.tables.items():
                self.sink.write(table, rows, writer=self.writer.for_step(name).name, seq=seq)
                alerts += rows.num_rows if table == "alerts" else 0
            if output.derived is not None and output.derived.num_rows:
                derived.append(output.derived)
        if self.actions is not None:
            derived += self._write_actions(seq, derived, kept)
        if self.store_events:  # transit columns (``_``-prefixed) are never stored
            stored = [c for c in kept.column_names if not c.startswith("_")]
            self.sink.write("events", without_copies(kept).select(stored),
                            writer=self.writer.name, seq=seq)
        return (pa.concat_tables(derived) if derived else None), alerts

    def _write_actions(self, seq: int, decided: list[pa.Table], kept: pa.Table) -> list[pa.Table]:
        """Write the batch's outbox rows (and state-table rows) under its sequence number,
        so they are committed with the decisions; returns the command events they derive."""
        assert self.actions is not None
        effects = self.actions.apply(decided, kept, self.clock())
        for table, rows in effects.tables.items():
            self.sink.write(table, rows, writer=self.writer.for_step(ACTIONS_STEP).name, seq=seq)
        return [effects.derived] if effects.derived is not None else []

    @staticmethod
    def _positions(events: pa.Table, poison: dict[int, StepFailure]) -> pa.Array | None:
        if not poison or ROW_POSITION not in events.column_names:
            return None
        return events.column(ROW_POSITION).take(pa.array(sorted(poison), pa.int64())).combine_chunks()

    def _latency(self, events: pa.Table) -> float:
        if events.num_rows == 0 or "metadata" not in events.column_names:
            return 0.0
        ingested = pc.min(pc.struct_field(events.column("metadata"), "ingested_at")).as_py()
        return max(0.0, (self.clock() - ingested).total_seconds())

    def snapshot(self) -> bytes:
        """The partition's state as immutable bytes (for checkpoints): its position and
        every step's state."""
        steps = json.dumps({s.name: s.snapshot() for s in self.steps})  # once: states are large
        self.log.rebase(steps.encode())  # a failure later replays from here
        # the text json.dumps gives the whole dict, without serialising the states twice
        return (f'{{"partition": {json.dumps(self.partition)}, "next_seq": '
                f'{json.dumps(self.next_seq)}, "steps": {steps}}}').encode()

    def restore(self, state: bytes) -> None:
        data = json.loads(state)
        if data.get("partition") != self.partition:
            raise PipelineError(f"state of partition {data.get('partition')} given to "
                                f"partition {self.partition}")
        self.next_seq = int(data["next_seq"])
        for step in self.steps:
            step.restore(data.get("steps", {}).get(step.name))
        self.log.rebase(step_states(self.steps))
