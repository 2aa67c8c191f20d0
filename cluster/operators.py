"""The one interface every keyed operator's executor answers: partitions and enrichment
stages alike, on Ray (:class:`~cluster.partitions.RayPartitions`) or in process
(:class:`~cluster.partitions.LocalPartitions`).

The driver hands an executor batches and collects their receipts, nothing else:

- ``submit(partition, seq, rows)``: apply ``rows`` as the partition's batch ``seq`` (blocks
  while the partition has ``max_in_flight`` batches outstanding);
- ``poll(block=False)``: receipts of the batches finished since the last poll, each
  partition's in sequence order (``block``: wait for at least one first);
- ``checkpoint(epoch)``: finish everything in flight, have every partition write its state
  for ``epoch``, return each partition's next sequence number (the driver may ask for one
  epoch again when acknowledged batches brought derived events to apply first);
- ``ask_checkpoint(epoch)``: the same in two steps: start it, and return the call that
  waits for the answers (actors write meanwhile, while the driver checkpoints the rest; an
  executor in process checkpoints at once and the call returns its answer);
- ``committed()``: the checkpoint is committed, the batches it covers are never resent;
- ``close()``.

Besides those, three questions: ``ready()`` (wait until the actors have started, so the
run's clock starts after), ``capacity(partition)`` and ``in_flight()`` (for dispatch and
progress), and the ``restarts`` counter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pyarrow as pa

from pipelines.keyed import BatchReceipt


class KeyedExecutor(Protocol):
    """Where a keyed operator's partitions apply their batches."""

    restarts: int

    def ready(self) -> None: ...
    def submit(self, partition: int, seq: int, rows: pa.Table) -> None: ...
    def poll(self, block: bool = False) -> list[BatchReceipt]: ...
    def checkpoint(self, epoch: int) -> dict[int, int]: ...
    def ask_checkpoint(self, epoch: int) -> Callable[[], dict[int, int]]: ...
    def committed(self) -> None: ...
    def capacity(self, partition: int) -> int: ...
    def in_flight(self) -> int: ...
    def close(self) -> None: ...


class ImmediateExecutor:
    """The defaults of an executor that applies what it is given at once: nothing in flight,
    no queue bound, nothing of its own to checkpoint, commit or close."""

    restarts = 0

    def ready(self) -> None:
        pass

    def checkpoint(self, epoch: int) -> dict[int, int]:
        return {}

    def ask_checkpoint(self, epoch: int) -> Callable[[], dict[int, int]]:
        """Checkpoints at once (in process, nothing runs meanwhile); the call answers."""
        seqs = self.checkpoint(epoch)
        return lambda: seqs

    def committed(self) -> None:
        pass

    def capacity(self, partition: int) -> int:
        return 1 << 30

    def in_flight(self) -> int:
        return 0

    def close(self) -> None:
        pass
