"""A bounded driver for the live sources' tests: the run's own operators, in this process.

It polls a :class:`~pipelines.live.LiveSource` until the source has been idle for a while
(or a number of batches has been read), feeds each batch through the same ingest,
enrichment, routing and keyed partitions as ``eventray run`` (:class:`cluster.driver.
PipelineRun` with in-process partitions), takes a checkpoint every
``runtime.checkpoint_every`` batches and tells the source once it is committed. A "crash"
stops it anywhere without the final checkpoint and without acknowledging anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.driver import PartitionFactory, PipelineRun
from cluster.partitions import LocalPartitions
from pipelines.live import LiveSource
from pipelines.normalise import utc_now
from pipelines.spec import PipelineSpec


@dataclass
class Session:
    """What one driving session did."""

    batches: int
    checkpoints: int
    counts: Any


class BoundedLiveRun:
    """One run of a pipeline with a live source, driven in sessions (restart = new object)."""

    def __init__(self, spec: PipelineSpec, store: Path,
                 partitions: PartitionFactory | None = None) -> None:
        """``partitions``: the keyed partitions' executor (default: in this process; a
        test passes Ray partitions, or ones that kill their own actors)."""
        self.spec = spec
        self.run = PipelineRun(
            spec, partitions or (lambda run: LocalPartitions(spec.runtime.partitions, store, run,
                                                             spec)),
            store, None, utc_now,
            stages=lambda run, stage: LocalPartitions(stage.partitions, store, run, spec, stage))
        self.source = self.run.source
        assert isinstance(self.source, LiveSource)

    def checkpoint(self, acknowledge: bool = True) -> None:
        positions = self.source.positions()
        self.run.checkpoint(positions)
        if acknowledge:
            self.source.committed(positions)

    def drive(self, *, resume: bool, idle_s: float = 1.0, max_batches: int | None = None,
              crash: bool = False, max_rows: int = 1_000) -> Session:
        """Read until idle (then drain, checkpoint, acknowledge) or, with ``crash``, stop
        after ``max_batches`` batches as a killed process would: nothing acknowledged,
        no final checkpoint."""
        run, source = self.run, self.source
        _, offsets = run._start(resume)
        source.open(offsets or None)
        every, batches, checkpoints = self.spec.runtime.checkpoint_every, 0, 0
        idle_since = time.monotonic()
        try:
            while time.monotonic() - idle_since < idle_s:
                if max_batches is not None and batches >= max_batches:
                    break
                for raw in source.poll(max_rows, timeout=0.05):
                    run.release(run.ingest.read(raw, run.counts))
                    run.pump()
                    batches += 1
                    if run.counts.batches % every == 0:
                        self.checkpoint(acknowledge=not crash)
                        checkpoints += 1
                    idle_since = time.monotonic()  # idle counts from the end of the work
            if not crash:
                rest = run.ingest.rest(run.counts)
                if rest is not None:
                    run.enter(rest)
                self.checkpoint()
                checkpoints += 1
                run.counts.check()
        finally:
            run.dispatcher.executor.close()
            run.chain.close()
            source.close()
        return Session(batches, checkpoints, run.counts)

