"""Keyed operators of a run with reader actors: they apply rounds of event time.

Each reader hands every partition and every enrichment stage's partition its piece of each
round (:mod:`pipelines.rounds`); an operator applies a round once all readers have handed
theirs in, merged and sorted by :class:`~pipelines.rounds.RoundOrder`, so per-key order
and results do not depend on how many readers there are. The logic objects wrap the same
:class:`~cluster.partitions._RunWorker` the driver path uses (steps, group-committed store
writes, poison isolation, checkpoints); the actors are thin shells around them.

- :class:`RoundPartition`: stores and scores. The events its steps derive (alerts...) are
  routed here by the same :class:`~cluster.dispatch.Dispatcher` the driver uses, and
  applied in this partition; an event derived for another partition is refused (its key
  would have to cross to an actor that may have applied the round already).
- :class:`RoundStage`: an enrichment stage's partition. Its readers wait for their
  answers (the columns it adds, by row position), so its actor is asynchronous: a reader's
  call returns once the round it belongs to has been applied.

Both keep their counters (stored, alerts, dead letters...) and the next round in their
checkpoint state, beside the worker's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.accounting import RunCounts
from cluster.arrow_wire import send_tables_as_ipc
from cluster.dispatch import Dispatcher
from cluster.driver import routed_schema
from cluster.operators import ImmediateExecutor
from cluster.partitions import _RunWorker
from pipelines.errors import PipelineError
from pipelines.keyed import BatchReceipt
from pipelines.kinds import wants_watermarks
from pipelines.poison import PROCESSOR_ERROR
from pipelines.processing import ROW_POSITION, watermark_batch
from pipelines.rounds import END_OF_TIME, RoundInputs, RoundOrder, merge_pieces
from pipelines.spec import EnrichSpec, PipelineSpec

#: CPUs each actor of a run with readers holds: 4 readers, 2 stage and 2 customer
#: partitions fit on a 2-CPU machine.
ACTOR_CPUS = 0.25


class ForeignDerivedEvents(PipelineError):
    """A step derived events keyed to another partition, which a run with readers cannot
    route (run it with ``runtime.readers: 0``)."""


def counts_state(counts: RunCounts) -> dict[str, Any]:
    return {"counts": counts.numbers(), "reasons": dict(counts.reasons)}


def counts_of(state: dict[str, Any]) -> RunCounts:
    return RunCounts(**state["counts"], reasons=dict(state["reasons"]))


class _SelfExecutor(ImmediateExecutor):
    """The :class:`~cluster.operators.KeyedExecutor` of one partition, inside its actor."""

    def __init__(self, worker: _RunWorker) -> None:
        self.worker, self.done = worker, []  # type: ignore[var-annotated]

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        if partition != self.worker.partition:
            raise ForeignDerivedEvents(
                f"partition-{self.worker.partition}: a step derived events for partition-"
                f"{partition}; with runtime.readers derived events must keep their parent's key")
        self.done.append(self.worker.apply(seq, rows))

    def poll(self, block: bool = False) -> list[BatchReceipt]:
        done, self.done = self.done, []
        return done

    def checkpoint(self, epoch: int) -> dict[int, int]:
        return {self.worker.partition: self.worker.checkpoint(epoch)}


def _rounds_state(worker: _RunWorker) -> dict[str, Any] | None:
    """This operator's round state in the run's last checkpoint, if it has one."""
    latest = worker.checkpoints.latest()
    path = worker.checkpoints.directory / f"{worker.owner}-rounds-{latest.epoch:012d}.state" \
        if latest is not None else None
    return json.loads(path.read_bytes()) if path is not None and path.exists() else None


class RoundPartition:
    """One customer partition fed by ``inputs`` readers, round by round."""

    def __init__(self, partition: int, store_root: str | Path, run: str, spec: PipelineSpec,
                 inputs: int, objects: dict[str, Any] | None = None) -> None:
        self.worker = _RunWorker(partition, store_root, run, spec, objects=objects)
        state = _rounds_state(self.worker)
        self.counts = counts_of(state) if state else RunCounts()
        self.rounds = RoundInputs(inputs, state["next_round"] if state else 0)
        self.executor = _SelfExecutor(self.worker)
        seqs = [0] * spec.runtime.partitions
        seqs[partition] = self.worker.next_seq
        self.schema = routed_schema(spec)
        self.dispatcher = Dispatcher(spec, self.executor, seqs, self.counts, self.schema)
        self.watermarks = wants_watermarks(spec)
        self.order = round_order(spec)

    def offer(self, round_no: int, source: int, rows: pa.Table | None, end_us: int,
              final: bool) -> int:
        """One reader's piece of a round; applies the rounds now complete. Returns the next
        round this partition waits for."""
        self.rounds.add(round_no, source, rows, end_us)
        for _, pieces, end in self.rounds.complete():
            merged, _ = merge_pieces(pieces, self.order)
            if merged is not None:
                self._apply(merged)
            if self.watermarks:  # patterns' timeouts: where event time stands
                self._apply(watermark_batch(self.schema, end if end < END_OF_TIME else None,
                                            final))
        return self.rounds.next_round

    def _apply(self, rows: pa.Table) -> None:
        """Apply a batch, then what its steps derived (routed back here), hop by hop."""
        partition, seqs = self.worker.partition, self.dispatcher.seqs
        self.executor.submit(partition, seqs[partition], rows)
        seqs[partition] += 1
        while True:
            receipts = self.executor.poll()
            if not receipts and self.dispatcher.queues.empty():
                return
            self.dispatcher.acknowledge(receipts)
            self.dispatcher.dispatch()

    def checkpoint(self, epoch: int) -> int:
        """Write the worker's state and this partition's rounds and counters for ``epoch``."""
        seq = self.worker.checkpoint(epoch)
        state = {**counts_state(self.counts), "next_round": self.rounds.next_round}
        self.worker.checkpoints.write_state(epoch, f"{self.worker.owner}-rounds",
                                            json.dumps(state).encode())
        return seq


class RoundStage:
    """One partition of an enrichment stage fed by ``inputs`` readers, round by round."""

    def __init__(self, partition: int, store_root: str | Path, run: str, spec: PipelineSpec,
                 stage: EnrichSpec, inputs: int) -> None:
        self.worker = _RunWorker(partition, store_root, run, spec, stage)
        state = _rounds_state(self.worker)
        self.inputs, self.order = inputs, round_order(spec)
        self.rounds = RoundInputs(inputs, state["next_round"] if state else 0)
        self.answers: dict[int, dict[int, BatchReceipt | None]] = {}

    def add(self, round_no: int, source: int, rows: pa.Table | None) -> None:
        """One reader's piece of a round; applies the rounds now complete."""
        self.rounds.add(round_no, source, rows, 0)
        for number, pieces, _ in self.rounds.complete():
            self.answers[number] = self._apply(number, pieces)

    def _apply(self, round_no: int, pieces: list[pa.Table | None]) -> dict[int, BatchReceipt | None]:
        merged, origin = merge_pieces(pieces, self.order)
        answers: dict[int, BatchReceipt | None] = dict.fromkeys(range(self.inputs))
        if merged is None:
            return answers
        # row positions are each reader's own: number the merged rows, map the answers back
        index = merged.schema.get_field_index(ROW_POSITION)
        positions = merged.column(ROW_POSITION).to_numpy()
        merged = merged.set_column(index, ROW_POSITION, pa.array(np.arange(merged.num_rows), pa.int64()))
        receipt = self.worker.apply(self.worker.next_seq, merged)
        for source, piece in enumerate(pieces):
            if piece is not None:
                answers[source] = _answer_of(receipt, origin, positions, source, round_no)
        return answers

    def ready(self, round_no: int) -> bool:
        return round_no in self.answers

    def take(self, round_no: int, source: int) -> BatchReceipt | None:
        answers = self.answers[round_no]
        answer = answers.pop(source)
        if not answers:
            del self.answers[round_no]
        return answer

    def checkpoint(self, epoch: int) -> int:
        seq = self.worker.checkpoint(epoch)
        self.worker.checkpoints.write_state(epoch, f"{self.worker.owner}-rounds", json.dumps(
            {"next_round": self.rounds.next_round}).encode())
        return seq


def _answer_of(receipt: BatchReceipt, origin: np.ndarray, positions: np.ndarray, source: int,
               round_no: int) -> BatchReceipt:
    """The part of a merged round's receipt that answers one reader, in its row positions."""
    derived = receipt.derived
    if derived is not None and derived.num_rows:
        rows = derived.column(ROW_POSITION).to_numpy()
        mine = origin[rows] == source
        derived = derived.filter(pa.array(mine))
        derived = derived.set_column(derived.schema.get_field_index(ROW_POSITION), ROW_POSITION,
                                     pa.array(positions[rows[mine]], pa.int64()))
    poisoned, dead = None, 0
    if receipt.poisoned is not None and len(receipt.poisoned):
        rows = receipt.poisoned.to_numpy(zero_copy_only=False)
        rows = rows[origin[rows] == source]
        poisoned, dead = pa.array(positions[rows], pa.int64()), len(rows)
    return replace(receipt, seq=round_no, rows=int((origin == source).sum()), derived=derived,
                   poisoned=poisoned, dead_lettered=dead,
                   reasons={PROCESSOR_ERROR: dead} if dead else {}, decisions=None)


def round_order(spec: PipelineSpec) -> RoundOrder:
    """The order of a round's events: as the driver path orders ties (labels ahead of the
    events of their second, then ``source.order_ties_by``), then by event id."""
    return RoundOrder(spec.labels.event_type if spec.labels else None, spec.source.order_ties_by)


def cpu_of_process() -> dict[str, float]:
    """This process's id and CPU-seconds so far (all its threads)."""
    return {"pid": os.getpid(), "cpu_s": time.process_time()}


def partition_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class RoundPartitionActor:
        """Owns one customer partition of a run with readers."""

        def __init__(self, *args: Any) -> None:
            send_tables_as_ipc()
            self.logic = RoundPartition(*args)

        def offer(self, round_no: int, source: int, rows: pa.Table | None, end_us: int,
                  final: bool) -> int:
            return self.logic.offer(round_no, source, rows, end_us, final)

        def checkpoint(self, epoch: int) -> int:
            return self.logic.checkpoint(epoch)

        def counts(self) -> dict[str, Any]:
            return counts_state(self.logic.counts)

        def cpu(self) -> dict[str, float]:
            return cpu_of_process()

    return RoundPartitionActor


def stage_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class RoundStageActor:
        """Owns one partition of an enrichment stage of a run with readers. Asynchronous:
        a reader's call waits for its round while the other readers' calls come in."""

        def __init__(self, *args: Any) -> None:
            send_tables_as_ipc()
            self.logic = RoundStage(*args)
            self.applied: dict[int, asyncio.Event] = {}

        async def exchange(self, round_no: int, source: int,
                           rows: pa.Table | None) -> BatchReceipt | None:
            self.logic.add(round_no, source, rows)
            event = self.applied.setdefault(round_no, asyncio.Event())
            for number in self.logic.answers:
                self.applied.setdefault(number, asyncio.Event()).set()
            await event.wait()
            answer = self.logic.take(round_no, source)
            if not self.logic.ready(round_no):
                self.applied.pop(round_no, None)
            return answer

        async def checkpoint(self, epoch: int) -> int:
            return self.logic.checkpoint(epoch)

        async def cpu(self) -> dict[str, float]:
            return cpu_of_process()

    return RoundStageActor
