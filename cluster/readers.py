"""Reader actors: ingestion and routing off the driver (``runtime.readers``, ``--readers``).

With ``runtime.readers: N`` a bounded source is cut into splits dealt to ``N`` reader
actors (``<run>-reader-<i>``, namespace ``eventray``). Each reader does for its splits what
the driver loop does on the driver path, with the same objects: :class:`~cluster.ingest.Ingest`
(read, normalise, validate, dead-letter under its own writer, ids, duplicates, watermark,
its share of the label feed), :class:`~cluster.enrichment.EnrichmentChain` (hand-off to the
enrichment stages, answers joined back) and :class:`~cluster.dispatch.Dispatcher` (routing,
split by key), and sends straight to the stage and partition actors
(:mod:`cluster.round_operators`). The run advances in rounds of event time
(:mod:`pipelines.rounds`): per-key order holds across readers, and results are the same for
any number of readers.

The driver only coordinates (:class:`ReaderRun`): it plans and deals the splits, starts the
actors, tells the readers where each round ends, takes a checkpoint every
``runtime.checkpoint_every`` rounds (every reader's split offsets, ingest state and carry;
every operator's state and counters; all at a round boundary, where nothing is in flight),
and sums the counters. No event passes through it.

A reader, stage or partition actor that dies (killed, its node lost) fails the round: the
driver stops every actor of the run, truncates the store to the last checkpoint and starts
them again from it (store files are named by writer and sequence, so what is written again
replaces what was there). The summary counts these in ``restarts`` and reports each kind of
process's CPU-seconds per million events (``cpu_s_per_million``).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from cluster.accounting import RunCounts
from cluster.arrow_wire import send_tables_as_ipc
from cluster.dispatch import Dispatcher
from cluster.driver import routed_schema
from cluster.enrichment import EnrichmentChain
from cluster.ingest import Ingest
from cluster.operators import ImmediateExecutor
from cluster.round_operators import (
    counts_of,
    counts_state,
    cpu_of_process,
)
from pipelines.checkpoint import CheckpointStore
from pipelines.envelope import envelope_schema
from pipelines.errors import PipelineError
from pipelines.keyed import BatchReceipt
from pipelines.normalise import Clock, utc_now
from pipelines.rounds import (
    Split,
    SplitReader,
    split_at,
)
from pipelines.sources import Source
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId


class ReadersFailed(PipelineError):
    """The run with readers failed again and again from the same checkpoint."""


def _time_bounds(table: pa.Table) -> tuple[int, int] | None:
    """(oldest, newest) event time of ``table`` in microseconds."""
    if table.num_rows == 0:
        return None
    import pyarrow.compute as pc

    times = pc.cast(table.column("timestamp"), pa.int64())
    bounds = pc.min_max(times).as_py()
    return int(bounds["min"]), int(bounds["max"])


class _StageInput(ImmediateExecutor):
    """The :class:`~cluster.operators.KeyedExecutor` a reader's enrichment chain sees for one
    stage: each round, one exchange per stage partition (an empty one where the round has
    no rows for it), answered once every reader's piece is in."""

    def __init__(self, actors: list[Any], source: int) -> None:
        import ray

        self._ray, self.actors, self.source = ray, actors, source
        self.begin(0)

    def begin(self, round_no: int) -> None:
        self.round = round_no
        self.pieces: dict[int, tuple[int, pa.Table]] = {}
        self.refs: dict[int, Any] | None = None

    def send(self) -> dict[int, Any]:
        """Hand in this reader's pieces of the round to every partition (once)."""
        if self.refs is None:
            self.refs = {p: actor.exchange.remote(self.round, self.source,
                                                  self.pieces[p][1] if p in self.pieces else None)
                         for p, actor in enumerate(self.actors)}
        return self.refs

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self.pieces[partition] = (seq, rows)  # one slice per round: one piece per partition

    def poll(self, block: bool = False) -> list[BatchReceipt]:
        if not self.pieces:
            return []
        refs = self.send()
        waiting = {refs[p]: p for p in self.pieces if p in refs}
        if not waiting:
            return []
        ready, _ = self._ray.wait(list(waiting), num_returns=1 if block else len(waiting),
                                  timeout=None if block else 0)
        receipts = []
        for ref in ready:
            partition = waiting[ref]
            receipt = self._ray.get(ref)
            del refs[partition]
            receipts.append(_as_piece(receipt, partition, self.pieces[partition][0]))
        return receipts

    def end_round(self) -> None:
        """Hand in this reader's piece to every partition that has none yet, and wait for
        those (empty) exchanges: the stage applies the round once all readers' are in."""
        refs = self.send()
        self._ray.get([ref for p, ref in refs.items() if p not in self.pieces])


def _as_piece(receipt: BatchReceipt, partition: int, seq: int) -> BatchReceipt:
    from dataclasses import replace

    return replace(receipt, partition=partition, seq=seq)


class _PartitionInput(ImmediateExecutor):
    """The executor a reader's dispatcher sees: routed pieces are gathered per partition,
    then handed in as the reader's piece of the round (one call per partition)."""

    def __init__(self, actors: list[Any], source: int) -> None:
        import ray

        self._ray, self.actors, self.source = ray, actors, source
        self.pieces: list[list[pa.Table]] = [[] for _ in actors]
        self.sent: list[list[Any]] = []  # each round's calls, oldest first

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self.pieces[partition].append(rows)

    def poll(self, block: bool = False) -> list[BatchReceipt]:
        return []  # the partitions count what they store themselves

    def end_round(self, round_no: int, end_us: int, final: bool) -> None:
        calls = []
        for partition, actor in enumerate(self.actors):
            pieces, self.pieces[partition] = self.pieces[partition], []
            rows = pa.concat_tables(pieces) if pieces else None
            calls.append(actor.offer.remote(round_no, self.source, rows, end_us, final))
        self.sent.append(calls)

    def wait(self, rounds_in_flight: int) -> None:
        """Wait until at most ``rounds_in_flight`` of this reader's rounds are unapplied
        (a failed call raises: the run restarts from its checkpoint)."""
        while len(self.sent) > rounds_in_flight:
            self._ray.get(self.sent.pop(0))


class Reader:
    """One reader's work: its splits through ingest, the stages and routing, by rounds.

    Args:
        index: the reader's number.
        spec: the pipeline.
        store_root: the store.
        run: the run's id.
        source: the source, built with the batch size readers read in.
        splits: this reader's splits, in read order.
        stages: each enrichment stage's partition actors (by stage name).
        partitions: the partition actors.
        epoch: the checkpoint to restore from (``None``: a fresh start).
        clock: stamps ``ingested_at``.
    """

    def __init__(self, index: int, spec: PipelineSpec, store_root: str, run: str, source: Source,
                 splits: list[Split], stages: dict[str, list[Any]], partitions: list[Any],
                 epoch: int | None, clock: Clock = utc_now) -> None:
        self.index, self.run = index, run
        self.writer = WriterId.reader(run, index)
        self.checkpoints = CheckpointStore(store_root, run)
        self.counts = RunCounts()
        self.ingest = Ingest(spec, EventStore(store_root), run, clock, writer=self.writer)
        self.stage_inputs = [_StageInput(stages[s.name], index) for s in spec.enrich]
        self.chain = EnrichmentChain(spec, list(self.stage_inputs),  # type: ignore[arg-type]
                                     {s.name: [0] * s.partitions for s in spec.enrich}, self.counts,
                                     carried=_tie_fields(spec))
        self.partition_input = _PartitionInput(partitions, index)
        self.dispatcher = Dispatcher(spec, self.partition_input,  # type: ignore[arg-type]
                                     [0] * spec.runtime.partitions, self.counts, routed_schema(spec))
        self.schema = envelope_schema(spec.registry())
        self.carry: list[pa.Table] = []
        self.exhausted = False
        #: the round in the stages (number, end, final) and what left the chain at once
        self.pending: tuple[int, int, bool] | None = None
        self.finished: list[pa.Table] = []
        offsets = self._restore(epoch) if epoch is not None else None
        self.splits = SplitReader(source, splits, offsets)

    def _restore(self, epoch: int) -> dict[str, int]:
        owner = self.writer.local
        state = json.loads(self.checkpoints.read_state(epoch, owner))
        self.counts = counts_of(state)
        self.chain.counts = self.dispatcher.counts = self.counts
        self.exhausted = state["exhausted"]
        self.ingest.restore({name: self.checkpoints.read_state(epoch, f"{owner}-{name}")
                             for name in self.ingest.snapshot()})
        carry = pa.ipc.open_stream(self.checkpoints.read_state(epoch, f"{owner}-carry")).read_all()
        self.carry = [carry] if carry.num_rows else []
        return dict(state["offsets"])

    def _read_one(self) -> None:
        raw = self.splits.next_batch()
        if raw is None:
            rest = self.ingest.rest(self.counts)
            if rest is not None:
                self.carry.append(rest)
            self.exhausted = True
            self.splits.close()
            return
        self.carry.append(self.ingest.read(raw, self.counts))

    def first_batch(self) -> tuple[int, int, int]:
        """Read until the watermark stands somewhere (or the splits end); returns (rows read,
        oldest and newest event time) for sizing rounds."""
        while not self.exhausted and self.ingest.watermark_us is None:
            self._read_one()
        carry = self._carry()
        bounds = _time_bounds(carry)
        if bounds is None:
            return 0, 0, 0
        newest = self.ingest.watermark_us if self.ingest.watermark_us is not None else bounds[1]
        return carry.num_rows, bounds[0], max(newest, bounds[1])

    def _carry(self) -> pa.Table:
        if len(self.carry) > 1:
            self.carry = [pa.concat_tables(self.carry)]
        return self.carry[0] if self.carry else self.schema.empty_table()

    def run_round(self, round_no: int, end_us: int, final: bool, drain: bool) -> dict[str, Any]:
        """Contribute this reader's events older than ``end_us`` to round ``round_no``.

        Pipelined: the round's events go into the enrichment stages, and the call returns
        while the stages apply them; the next call reads the next round's events first,
        then joins this round's answers and hands its pieces to the partitions. ``drain``
        (a checkpoint follows) or ``final`` finishes the round before returning.
        """
        self.partition_input.wait(1)  # at most the last round's pieces still unapplied
        while not self.exhausted and (self.ingest.watermark_us is None
                                      or self.ingest.watermark_us < end_us):
            self._read_one()
        due = self._take(end_us)
        self._finish_pending()
        for stage in self.stage_inputs:
            stage.begin(round_no)
        self.finished = self.chain.submit(due) if due is not None else []
        if self.stage_inputs:
            self.stage_inputs[0].send()  # the first stage's pieces, empty ones too
        self.pending = (round_no, end_us, final)
        if drain or final:
            self._finish_pending()
            self.partition_input.wait(0)
        return self.status()

    def _finish_pending(self) -> None:
        """The round in the stages: answers joined, routed, its pieces handed to the
        partitions (every stage has every reader's piece of it: it was sent in the call
        before, and the driver starts a round once all readers have returned)."""
        if self.pending is None:
            return
        round_no, end_us, final = self.pending
        finished = self.finished + self.chain.finish()
        for stage in self.stage_inputs:
            stage.end_round()
        for events in finished:
            self.dispatcher.route(events)
        self.dispatcher.flush()
        self.partition_input.end_round(round_no, end_us, final)
        self.pending, self.finished = None, []

    def _take(self, end_us: int) -> pa.Table | None:
        if not self.carry:
            return None
        due, later = split_at(self._carry(), end_us)
        self.carry = [later] if later.num_rows else []
        return due if due.num_rows else None

    def status(self) -> dict[str, Any]:
        """Where this reader stands: the earliest event time it may still contribute
        (``next_us``, ``None`` once it has nothing left) and its counters."""
        bounds = _time_bounds(self._carry()) if self.carry else None
        marks = [b for b in [bounds[0] if bounds else None,
                             None if self.exhausted else self.ingest.watermark_us] if b is not None]
        done = self.exhausted and not self.carry
        return {"next_us": min(marks) if marks else (None if done else 0), "done": done,
                **counts_state(self.counts)}

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """Write this reader's state for ``epoch``; returns its dead letters' next sequence
        (``seq``) and its splits' offsets (``offsets``, for the manifest)."""
        assert self.pending is None, "a checkpoint follows a drained round"
        owner = self.writer.local
        for name, state in self.ingest.snapshot().items():
            self.checkpoints.write_state(epoch, f"{owner}-{name}", state)
        carry = self._carry() if self.carry else self.schema.empty_table()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, carry.schema) as writer:
            writer.write_table(carry)
        self.checkpoints.write_state(epoch, f"{owner}-carry", sink.getvalue().to_pybytes())
        state = {**counts_state(self.counts), "exhausted": self.exhausted,
                 "offsets": self.splits.offsets}
        self.checkpoints.write_state(epoch, owner, json.dumps(state).encode())
        return {"seq": self.counts.batches, "offsets": dict(self.splits.offsets)}


def _tie_fields(spec: PipelineSpec) -> tuple[str, ...]:
    """The payload field ``source.order_ties_by`` names, which the stages order ties by."""
    ties = spec.source.order_ties_by
    if ties is None or not ties.startswith("data."):
        return ()
    field = ties.removeprefix("data.")
    return (field,) if field in {f.name for f in spec.registry().data_type()} else ()


def reader_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class ReaderActor:
        """One reader: a thin shell around :class:`Reader`."""

        def __init__(self, *args: Any) -> None:
            send_tables_as_ipc()
            self.reader = Reader(*args)

        def first_batch(self) -> tuple[int, int, int]:
            return self.reader.first_batch()

        def run_round(self, round_no: int, end_us: int, final: bool, drain: bool) -> dict[str, Any]:
            return self.reader.run_round(round_no, end_us, final, drain)

        def status(self) -> dict[str, Any]:
            return self.reader.status()

        def checkpoint(self, epoch: int) -> dict[str, Any]:
            return self.reader.checkpoint(epoch)

        def cpu(self) -> dict[str, float]:
            return cpu_of_process()

    return ReaderActor
