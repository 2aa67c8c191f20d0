"""Aligned checkpoints of a run, and resuming from the last one.

A checkpoint is taken at a source-batch boundary, like an aligned barrier: every slice has
left the enrichment stages, every queued piece has been applied, and every keyed operator
has written its state for the epoch; then the driver's own state (duplicate filter, label
feed) is written and the manifest commits it all (:mod:`pipelines.checkpoint`).

Resuming keeps what each writer wrote before the checkpoint (a partition's events, the
tables its steps wrote under the same sequence numbers, the driver's dead letters) and
removes the rest; a fresh run clears the run's old output and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.accounting import RunCounts
from pipelines.checkpoint import Checkpoint, CheckpointStore
from pipelines.errors import AccountingError
from pipelines.keyed import DEADLETTER_STEP
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId

if TYPE_CHECKING:
    from cluster.dispatch import Dispatcher
    from cluster.enrichment import EnrichmentChain
    from cluster.ingest import Ingest


@dataclass(frozen=True)
class Restored:
    """Where a resumed run stands: counters, sequence numbers and source offsets."""

    counts: RunCounts
    partition_seqs: list[int]
    stage_seqs: dict[str, list[int]]
    source_offsets: dict[str, int]


class Checkpointer:
    """Takes the run's checkpoints and restores the run from its last one."""

    def __init__(self, spec: PipelineSpec, store: EventStore, run: str) -> None:
        self.spec, self.store, self.run = spec, store, run
        self.checkpoints = CheckpointStore(store.root, run)
        self.epoch = 0

    def restore(self, resume: bool, ingest: Ingest) -> Restored | None:
        """Continue from the last checkpoint (``resume``), or clear the run's old output."""
        latest = self.checkpoints.latest() if resume else None
        if latest is None:
            self.checkpoints.clear()
            self.store.truncate(self.run, {})
            return None
        writers = {}
        for partition, seq in latest.partition_seqs.items():
            writer = WriterId.partition(self.run, partition)
            writers[writer.local] = seq
            writers.update({writer.for_step(step.name).local: seq for step in self.spec.steps})
            writers[writer.for_step(DEADLETTER_STEP).local] = seq  # its poison events
        for name, seqs in latest.stage_seqs.items():
            for partition, seq in seqs.items():
                writers[WriterId.stage(self.run, name, partition).for_step(DEADLETTER_STEP).local] = seq
        writers[WriterId.ingest(self.run).local] = latest.deadletter_seq
        self.store.truncate(self.run, writers)
        ingest.duplicates.restore(self.checkpoints.read_state(latest.epoch, "dedup"))
        if ingest.labels is not None:
            ingest.labels.restore(self.checkpoints.read_state(latest.epoch, "labels"))
        self.epoch = latest.epoch
        partitions = self.spec.runtime.partitions
        return Restored(
            RunCounts(**latest.counts, reasons=dict(latest.reasons)),
            [latest.partition_seqs[p] for p in range(partitions)],
            {name: [seqs[p] for p in range(len(seqs))] for name, seqs in latest.stage_seqs.items()},
            dict(latest.source_offsets))

    def take(self, dispatcher: Dispatcher, chain: EnrichmentChain, ingest: Ingest,
             counts: RunCounts, offsets: dict[str, int]) -> None:
        """Checkpoint everything (the stages must have been finished first) and commit."""
        self.epoch += 1
        seqs = dispatcher.checkpoint(self.epoch)
        if seqs != dict(enumerate(dispatcher.seqs)):
            raise AccountingError({"checkpoint_epoch": self.epoch, **{
                f"partition_{p}_at": s for p, s in seqs.items()}})
        stage_seqs = chain.checkpoint(self.epoch)
        for name, stage in stage_seqs.items():
            if stage != dict(enumerate(chain.seqs[name])):
                raise AccountingError({"checkpoint_epoch": self.epoch, f"stage_{name}": 1})
        self.checkpoints.write_state(self.epoch, "dedup", ingest.duplicates.snapshot())
        if ingest.labels is not None:
            self.checkpoints.write_state(self.epoch, "labels", ingest.labels.snapshot())
        self.checkpoints.commit(Checkpoint(
            self.epoch, dict(offsets), seqs, counts.batches, counts.numbers(),
            dict(counts.reasons), stage_seqs))
        counts.checkpoints += 1
