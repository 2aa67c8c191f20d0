"""Partition executors: where a partition's batches are applied, and how many are in flight.

:class:`RayPartitions` owns one :class:`PartitionActor` per partition, named
``partition-<i>`` in namespace ``eventray`` and spread over the cluster's nodes. A plain
synchronous actor runs one caller's calls in submission order, so a partition's batches
apply in sequence; at most ``max_in_flight`` are outstanding per partition, which bounds
the driver's and the object store's memory whatever the source's speed.
:class:`LocalPartitions` runs the same :class:`~pipelines.keyed.PartitionWorker` in
process: the in-process runner for tests and debugging.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.keyed import BatchReceipt, PartitionWorker
from pipelines.store import EventStore

NAMESPACE = "eventray"


class LocalPartitions:
    """All partitions in this process; a batch is applied when submitted."""

    def __init__(self, partitions: int, store_root: str | Path, writer_prefix: str) -> None:
        store = EventStore(store_root)
        self.workers = [_PrefixedWorker(p, store, writer_prefix) for p in range(partitions)]
        self._done: list[BatchReceipt] = []

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self._done.append(self.workers[partition].apply(seq, rows))

    def completed(self) -> list[BatchReceipt]:
        done, self._done = self._done, []
        return done

    def drain(self) -> list[BatchReceipt]:
        return self.completed()

    def in_flight(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _PrefixedWorker(PartitionWorker):
    """A worker whose files carry the run's id, so different runs never share a name."""

    def __init__(self, partition: int, sink: Any, prefix: str) -> None:
        super().__init__(partition, sink)
        self.prefix = prefix

    @property
    def writer(self) -> str:
        return f"{self.prefix}-p{self.partition:04d}"


def _actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class PartitionActor:
        """Owns one partition: a thin shell around :class:`PartitionWorker`."""

        def __init__(self, partition: int, store_root: str, writer_prefix: str) -> None:
            self.worker = _PrefixedWorker(partition, EventStore(store_root), writer_prefix)

        def apply(self, seq: int, rows: pa.Table) -> BatchReceipt:
            return self.worker.apply(seq, rows)

        def snapshot(self) -> dict[str, int]:
            return self.worker.snapshot()

    return PartitionActor


class RayPartitions:
    """One named actor per partition, at most ``max_in_flight`` batches outstanding each."""

    def __init__(self, partitions: int, store_root: str | Path, writer_prefix: str,
                 max_in_flight: int, cpus_per_actor: float) -> None:
        import ray

        self._ray = ray
        actor = _actor_class()
        self.actors = [
            actor.options(
                name=f"partition-{p}", namespace=NAMESPACE, num_cpus=cpus_per_actor,
                scheduling_strategy="SPREAD",
            ).remote(p, str(Path(store_root).resolve()), writer_prefix)
            for p in range(partitions)
        ]
        self.max_in_flight = max_in_flight
        self.pending: list[deque[Any]] = [deque() for _ in range(partitions)]
        self._done: list[BatchReceipt] = []

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        queue = self.pending[partition]
        while len(queue) >= self.max_in_flight:
            # Calls of one partition finish in order: waiting on the oldest is enough.
            self._done.append(self._ray.get(queue.popleft()))
        queue.append(self.actors[partition].apply.remote(seq, rows))

    def completed(self) -> list[BatchReceipt]:
        for queue in self.pending:
            while queue:
                ready, _ = self._ray.wait([queue[0]], timeout=0)
                if not ready:
                    break
                self._done.append(self._ray.get(queue.popleft()))
        done, self._done = self._done, []
        return done

    def drain(self) -> list[BatchReceipt]:
        for queue in self.pending:
            while queue:
                self._done.append(self._ray.get(queue.popleft()))
        return self.completed()

    def in_flight(self) -> int:
        return sum(len(q) for q in self.pending)

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
