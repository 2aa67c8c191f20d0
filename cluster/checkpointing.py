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

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from cluster.accounting import RunCounts
from pipelines.actions.outbox import ACTIONS_STEP
from pipelines.checkpoint import CHECKPOINT_DIR, Checkpoint, CheckpointStore
from pipelines.commit_log import RunCommitter
from pipelines.durable import write_durably
from pipelines.errors import AccountingError, ConfigError
from pipelines.keyed import DEADLETTER_STEP
from pipelines.normalise import Clock, utc_now
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId

if TYPE_CHECKING:
    from cluster.dispatch import Dispatcher
    from cluster.enrichment import EnrichmentChain
    from cluster.ingest import Ingest


IDENTITY_FILE = "run.json"


class ResumeError(ConfigError):
    """``--resume`` cannot continue this run as asked (nothing to resume, or it changed)."""


@dataclass(frozen=True)
class RunIdentity:
    """What a run was started with; a resumed run must match it."""

    pipeline: str
    config: str  # digest of what the pipeline computes
    partitions: int
    stages: dict[str, int]
    parts: list[str]

    @classmethod
    def of(cls, spec: PipelineSpec, config: str, parts: list[str]) -> RunIdentity:
        return cls(spec.name, config, spec.runtime.partitions,
                   {s.name: s.partitions for s in spec.enrich}, list(parts))

    def differences(self, started: RunIdentity) -> list[str]:
        """What differs from the run as it started, in words."""
        found = []
        if self.partitions != started.partitions:
            found.append(f"runtime.partitions is {self.partitions}, the run started with "
                         f"{started.partitions}")
        if self.stages != started.stages:
            found.append(f"enrichment stage partitions are {self.stages}, the run started "
                         f"with {started.stages}")
        if self.parts != started.parts:
            added = sorted(set(self.parts) - set(started.parts))
            gone = sorted(set(started.parts) - set(self.parts))
            found.append(f"the input changed (added {added or 'none'}, missing {gone or 'none'})")
        if self.config != started.config:
            found.append("the pipeline config changed")
        return found


@dataclass(frozen=True)
class Restored:
    """Where a resumed run stands: counters, sequence numbers and source offsets."""

    counts: RunCounts
    partition_seqs: list[int]
    stage_seqs: dict[str, list[int]]
    source_offsets: dict[str, int]


class Checkpointer:
    """Takes the run's checkpoints and restores the run from its last one."""

    def __init__(self, spec: PipelineSpec, store: EventStore, run: str,
                 identity: RunIdentity, clock: Clock = utc_now) -> None:
        self.spec, self.store, self.run, self.identity = spec, store, run, identity
        self.checkpoints = CheckpointStore(store.root, run)
        #: every commit is recorded in the store's commit log, at the injected clock's time
        self.committer, self.clock = RunCommitter(store.root, run), clock
        self.epoch = 0

    def _started_as(self) -> RunIdentity | None:
        path = self.checkpoints.directory / IDENTITY_FILE
        return RunIdentity(**json.loads(path.read_text())) if path.exists() else None

    def _refuse_resume(self) -> None:
        """``--resume`` of a run with no checkpoint: refuse when the store holds other runs
        of this pipeline (its input or config probably changed), naming them."""
        others = []
        for folder in sorted((self.store.root / CHECKPOINT_DIR).glob("*")):
            path = folder / IDENTITY_FILE
            if folder.name != self.run and path.exists():
                started = RunIdentity(**json.loads(path.read_text()))
                if started.pipeline == self.identity.pipeline:
                    others.append(f"{folder.name} ({'; '.join(self.identity.differences(started))})")
        if others:
            raise ResumeError(
                f"--resume: run {self.run} has no checkpoint in {self.store.root}; this store has "
                f"other runs of {self.identity.pipeline!r}: {', '.join(others)}. Resume one with "
                "--run-id ID and its original input, or run without --resume to start afresh")

    def restore(self, resume: bool, ingest: Ingest | None,
                more_writers: Callable[[Checkpoint], dict[str, int]] | None = None,
                ) -> Restored | None:
        """Continue from the last checkpoint (``resume``), or clear the run's old output.

        ``ingest``: the driver's ingest, restored too (a run with reader actors has none:
        each reader restores its own); ``more_writers``: the next sequence numbers of
        writers the checkpoint knows besides the partitions, stages and the driver's ingest
        (reader actors' dead letters), whose files up to there are kept.

        Raises:
            ResumeError: ``resume`` of a run whose partitions, stages, input or config
                changed since it started, or of nothing.
        """
        latest = self.checkpoints.latest() if resume else None
        if resume and latest is None:
            self._refuse_resume()
        if latest is not None:
            started = self._started_as()
            changes = self.identity.differences(started) if started else []
            if changes:
                raise ResumeError(f"--resume: run {self.run} cannot continue: "
                                  f"{'; '.join(changes)}. Run without --resume to start afresh")
        if latest is None:
            self.checkpoints.clear()
            self.store.truncate(self.run, {}, self.clock())
            write_durably(self.checkpoints.directory / IDENTITY_FILE,
                          json.dumps(asdict(self.identity), sort_keys=True).encode())
            return None
        writers = {}
        for partition, seq in latest.partition_seqs.items():
            writer = WriterId.partition(self.run, partition)
            writers[writer.local] = seq
            writers.update({writer.for_step(step.name).local: seq for step in self.spec.steps})
            writers[writer.for_step(DEADLETTER_STEP).local] = seq  # its poison events
            writers[writer.for_step(ACTIONS_STEP).local] = seq  # its outbox rows
        for name, seqs in latest.stage_seqs.items():
            for partition, seq in seqs.items():
                writers[WriterId.stage(self.run, name, partition).for_step(DEADLETTER_STEP).local] = seq
        writers[WriterId.ingest(self.run).local] = latest.deadletter_seq
        if more_writers is not None:
            writers.update(more_writers(latest))
        self.store.truncate(self.run, writers, self.clock())
        if ingest is not None:
            ingest.restore({name: self.checkpoints.read_state(latest.epoch, name)
                            for name in ingest.snapshot()})
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
        epoch = self.epoch
        # the stages, the partitions and the driver's own state are written at once: the
        # stall is the slowest of them, not their sum (nothing moves meanwhile)
        stages = chain.ask_checkpoint(epoch)

        def write_ingest() -> None:
            ingest.flush()
            for name, state in ingest.snapshot().items():
                self.checkpoints.write_state(epoch, name, state)

        seqs = dispatcher.checkpoint(epoch, meanwhile=write_ingest)
        if seqs != dict(enumerate(dispatcher.seqs)):
            raise AccountingError({"checkpoint_epoch": epoch, **{
                f"partition_{p}_at": s for p, s in seqs.items()}})
        stage_seqs = stages()
        for name, stage in stage_seqs.items():
            if stage != dict(enumerate(chain.seqs[name])):
                raise AccountingError({"checkpoint_epoch": epoch, f"stage_{name}": 1})
        self.checkpoints.commit(Checkpoint(
            epoch, dict(offsets), seqs, counts.batches, counts.numbers(),
            dict(counts.reasons), stage_seqs))
        self.committer.commit(epoch, self.clock())  # after the manifest: it is the commit
        dispatcher.executor.committed()
        chain.committed()
        counts.checkpoints += 1
