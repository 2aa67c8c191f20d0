"""Enrichment stages: keyed operators that run before routing, each by its own key.

A released slice enters the first stage: its rows of the stage's event types are split by
the stage's key over the stage's partitions (only the columns the stage reads cross to its
actors). When every piece has answered, the added columns are joined back onto the slice
by row position (:data:`~pipelines.processing.ROW_POSITION`) and the slice goes on to the
next stage. Slices are pipelined (up to ``max_in_flight`` in the stages at once) and leave
the last stage in the order they entered, each whole, so every key keeps its order. Events
a stage's logic raised on (poison events) were dead-lettered by its actor: they leave the
slice there, counted in the run's ``dead_lettered``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from cluster.accounting import RunCounts
from cluster.operators import KeyedExecutor
from pipelines.keyed import BatchReceipt, split_by_partition
from pipelines.kinds import stage_class
from pipelines.processing import ROW_POSITION
from pipelines.spec import EnrichSpec, PipelineSpec
from pipelines.tables import conform


@dataclass
class _Slice:
    """A released slice in the stages: the stage it waits on and its pieces there."""

    table: pa.Table  # the slice, with its row positions
    stage: int = 0
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (partition, seq) sent


class EnrichmentChain:
    """The pipeline's enrichment stages, in config order, and the slices inside them.

    Args:
        spec: the pipeline.
        executors: one executor per stage of ``spec.enrich``.
        seqs: each stage's partitions' next sequence numbers (from a checkpoint).
        counts: the run's counters (poison events dead-lettered in a stage are added).
        carried: payload fields every stage receives besides those it reads.
    """

    def __init__(self, spec: PipelineSpec, executors: list[KeyedExecutor],
                 seqs: dict[str, list[int]], counts: RunCounts | None = None,
                 carried: tuple[str, ...] = ()) -> None:
        self.counts = counts if counts is not None else RunCounts()
        self.stages: list[tuple[EnrichSpec, KeyedExecutor]] = list(zip(spec.enrich, executors, strict=True))
        self.reads = [stage_class(s, tuple(spec.search_path)).reads for s in spec.enrich]
        self.seqs = seqs
        #: payload fields every stage receives besides what it reads (a run with readers:
        #: the stages order a round's events by ``source.order_ties_by``)
        self.carried = carried
        self.max_in_flight = spec.runtime.max_in_flight
        self.answers: list[dict[tuple[int, int], BatchReceipt]] = [{} for _ in self.stages]
        self.slices: deque[_Slice] = deque()
        #: each stage's input schema, by the slice's schema (that of the Polars plan)
        self._schemas: dict[tuple[int, pa.Schema], pa.Schema] = {}

    def __len__(self) -> int:
        return len(self.slices)

    def submit(self, events: pa.Table) -> list[pa.Table]:
        """Send a slice into the first stage; returns the slices that finished meanwhile,
        oldest first (waiting while ``max_in_flight`` slices are in the stages)."""
        if not self.stages:
            return [events]
        positions = pa.array(np.arange(events.num_rows), pa.int64())
        item = _Slice(events.add_column(0, ROW_POSITION, positions))
        self.slices.append(item)
        self._send(item, 0)
        finished = self.advance()
        while len(self.slices) > self.max_in_flight:
            finished += self.wait()
        return finished

    def _send(self, item: _Slice, index: int) -> None:
        """Hand a slice's rows of stage ``index``'s event types to its partitions."""
        stage, executor = self.stages[index]
        rows = self._stage_rows(item.table, index)
        item.stage, item.waiting = index, []
        seqs = self.seqs[stage.name]
        for partition, piece in split_by_partition(rows, stage.partitions):
            executor.submit(partition, seqs[partition], piece)
            item.waiting.append((partition, seqs[partition]))
            seqs[partition] += 1

    def _stage_rows(self, table: pa.Table, index: int) -> pa.Table:
        """The rows of stage ``index``'s event types, with only what it reads (and the id,
        which names an event the stage raises on in its dead letter) and the stage's key as
        text. Made in Arrow (a slice of a few events paid some 5 ms for a Polars plan), in
        the types the Polars plan of :meth:`_planned_rows` gives, which decides where the
        key is neither an integer nor text (its text form is Polars')."""
        stage = self.stages[index][0]
        data_type = table.schema.field("data").type
        key_type = data_type.field(stage.key).type if data_type.get_field_index(stage.key) >= 0 else None
        if key_type is None or not (pa.types.is_integer(key_type) or pa.types.is_string(key_type)
                                    or pa.types.is_large_string(key_type)):
            return self._planned_rows(table, index)
        schema = self._schemas.get((index, table.schema))
        if schema is None:
            if len(self._schemas) >= 64:  # slices whose schema keeps changing
                self._schemas.clear()
            schema = self._planned_rows(table.slice(0, 0), index).schema
            self._schemas[(index, table.schema)] = schema
        kept = pc.is_in(table.column("event_type"), value_set=pa.array(stage.event_types, pa.string()))
        if not pc.all(kept).as_py():
            table = table.filter(kept)
        data = table.column("data").combine_chunks()
        key = data.field(stage.key).cast(pa.string())
        if self.reads[index] is not None:
            fields = list(dict.fromkeys([stage.key, *self.reads[index], *self.carried]))
            table = pa.table({
                ROW_POSITION: table.column(ROW_POSITION), "event_id": table.column("event_id"),
                "event_type": table.column("event_type"), "timestamp": table.column("timestamp"),
                "data": pa.StructArray.from_arrays([data.field(f) for f in fields], names=fields)})
        if "key" in table.column_names:
            table = table.set_column(table.schema.get_field_index("key"), "key", key)
        else:
            table = table.append_column("key", key)
        return conform(table, schema)

    def _planned_rows(self, table: pa.Table, index: int) -> pa.Table:
        """:meth:`_stage_rows` by one Polars plan."""
        stage = self.stages[index][0]
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        rows = frame.lazy().filter(pl.col("event_type").is_in(stage.event_types))
        key = pl.col("data").struct.field(stage.key)
        if self.reads[index] is not None:  # only what the stage reads crosses to its actors
            fields = dict.fromkeys([stage.key, *self.reads[index], *self.carried])
            rows = rows.select(ROW_POSITION, "event_id", "event_type", "timestamp",
                               data=pl.struct(pl.col("data").struct.field(*fields)))
        return rows.with_columns(key=key.cast(pl.String)).collect().to_arrow()

    def advance(self) -> list[pa.Table]:
        """Join the answers that came back; returns the slices that left the last stage."""
        for index, (_, executor) in enumerate(self.stages):
            for receipt in executor.poll():
                self.answers[index][(receipt.partition, receipt.seq)] = receipt
        last = len(self.stages)
        behind = last  # the lowest stage of the slices ahead: none may be overtaken in a stage
        for item in self.slices:
            while item.stage < last and item.stage < behind and self._answered(item):
                self._join(item)
                if item.stage + 1 < last:
                    self._send(item, item.stage + 1)
                else:
                    item.stage, item.waiting = last, []
            behind = min(behind, item.stage)
        finished = []
        while self.slices and self.slices[0].stage == last:
            finished.append(self.slices.popleft().table.drop_columns([ROW_POSITION]))
        return finished

    def _answered(self, item: _Slice) -> bool:
        answers = self.answers[item.stage]
        return all(piece in answers for piece in item.waiting)

    def _join(self, item: _Slice) -> None:
        answers = self.answers[item.stage]
        receipts = [answers.pop(piece) for piece in item.waiting]
        poisoned = [r.poisoned for r in receipts if r.poisoned is not None and len(r.poisoned)]
        if poisoned:
            dropped = pa.concat_arrays(poisoned).cast(pa.int64())
            item.table = item.table.filter(pc.invert(pc.is_in(item.table.column(ROW_POSITION),
                                                              value_set=dropped)))
        for receipt in receipts:
            self.counts.count_reasons(receipt.reasons)
        parts = [r.derived for r in receipts if r.derived is not None and r.derived.num_rows]
        if parts:  # a left join on the row position, in the slice's order
            added = pa.concat_tables(parts, promote_options="permissive")
            at = pc.index_in(item.table.column(ROW_POSITION),
                             value_set=added.column(ROW_POSITION).combine_chunks().cast(pa.int64()))
            added = added.drop_columns([ROW_POSITION]).take(at)  # one gather of every column
            table = item.table
            # a name taken already: suffixed, as Polars joins do
            fields = [field.with_name(f"{field.name}_right") if field.name in table.column_names
                      else field for field in added.schema]
            item.table = pa.Table.from_arrays(
                [*table.columns, *added.columns],
                schema=pa.schema([*table.schema, *fields], metadata=table.schema.metadata))

    def wait(self) -> list[pa.Table]:
        """Block until the oldest slice's current stage has answered more, then advance."""
        _, executor = self.stages[self.slices[0].stage]
        for receipt in executor.poll(block=True):
            self.answers[self.slices[0].stage][(receipt.partition, receipt.seq)] = receipt
        return self.advance()

    def finish(self) -> list[pa.Table]:
        """Every slice still in the stages, once answered (before a checkpoint, at the end)."""
        finished = self.advance()
        while self.slices:
            finished += self.wait()
        return finished

    def ask_checkpoint(self, epoch: int) -> Callable[[], dict[str, dict[int, int]]]:
        """Start every stage's checkpoint for ``epoch`` (call :meth:`finish` first); returns
        the call that waits for them (their actors write while the driver does other work)."""
        asked = [(stage.name, executor.ask_checkpoint(epoch)) for stage, executor in self.stages]
        return lambda: {name: collect() for name, collect in asked}

    def committed(self) -> None:
        for _, executor in self.stages:
            executor.committed()

    @property
    def restarts(self) -> int:
        return sum(executor.restarts for _, executor in self.stages)

    def close(self) -> None:
        for _, executor in self.stages:
            executor.close()
