"""Dispatch queues per partition with two priority lanes, and adaptive batch sizes.

The driver offers each partition's pieces here and takes them out when the partition has
room in flight. The high lane goes first, across keys. One key is never reordered: a key's
rows waiting in the normal lane are always newer than its rows in the high lane, because
offering a high piece first promotes the queued normal rows of the same keys (moved,
in order, to the end of the high lane, before the new piece).

Under load queues grow; :meth:`LaneQueues.take` then coalesces the queued pieces into one
batch of up to ``max_rows`` (the high lane's first, the normal lane's after them), and
:class:`BatchSizer` sets ``max_rows`` from the partition's measured processing rate so
that one batch takes about the target latency: batches grow with load and shrink when it
passes.
"""

from __future__ import annotations

from collections import deque

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.spec import AdaptiveBatching


class LaneQueues:
    """Queued pieces of every partition, high lane first, per-key order kept.

    Example:
        >>> q = LaneQueues(1)
        >>> q.offer(0, pa.table({"key": ["a", "b"], "n": [1, 2]}), high=False)
        >>> q.offer(0, pa.table({"key": ["b"], "n": [3]}), high=True)
        >>> [q.take(0)["n"].to_pylist() for _ in range(3)]
        [[2], [3], [1]]
    """

    def __init__(self, partitions: int) -> None:
        self.high: list[deque[pa.Table]] = [deque() for _ in range(partitions)]
        self.normal: list[deque[pa.Table]] = [deque() for _ in range(partitions)]

    def offer(self, partition: int, rows: pa.Table, high: bool) -> None:
        if rows.num_rows == 0:
            return
        if high:
            self._promote(partition, rows.column("key"))
            self.high[partition].append(rows)
        else:
            self.normal[partition].append(rows)

    def _promote(self, partition: int, keys: pa.ChunkedArray) -> None:
        kept: deque[pa.Table] = deque()
        for piece in self.normal[partition]:
            mask = pc.is_in(piece.column("key"), value_set=keys.combine_chunks())
            promoted = piece.filter(mask)
            if promoted.num_rows:
                self.high[partition].append(promoted)
                rest = piece.filter(pc.invert(mask))
                if rest.num_rows:
                    kept.append(rest)
            else:
                kept.append(piece)
        self.normal[partition] = kept

    def take(self, partition: int, max_rows: int | None = None) -> pa.Table | None:
        """The next batch for a partition, or None: one piece, or with ``max_rows`` the
        queued pieces up to that many rows, the high lane's first, then (once the high lane
        is empty) the normal lane's. A batch is applied in row order, so one batch of both
        lanes is applied as the two batches would be; a slice with a high event is not sent
        as two batches (each costs a partition a fixed few milliseconds)."""
        pieces: list[pa.Table] = []
        rows = 0
        for lane in (self.high[partition], self.normal[partition]):
            while lane and (not pieces or (max_rows is not None
                                           and rows + lane[0].num_rows <= max_rows)):
                rows += lane[0].num_rows
                pieces.append(lane.popleft())
            if lane:  # what is left of the high lane goes before any normal piece
                break
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces).combine_chunks()

    def pieces(self, partition: int) -> int:
        return len(self.high[partition]) + len(self.normal[partition])

    def empty(self) -> bool:
        return not any(self.high) and not any(self.normal)


class BatchSizer:
    """Rows per dispatched batch: what a partition processes in the target latency.

    Example:
        >>> sizer = BatchSizer(AdaptiveBatching(target_latency_ms=100, min_rows=10, max_rows=10**6), 1)
        >>> sizer.observe(0, rows=50_000, seconds=0.5)  # 100k rows/s measured
        >>> sizer.max_rows(0)
        10000
    """

    def __init__(self, settings: AdaptiveBatching, partitions: int, smoothing: float = 0.3) -> None:
        self.settings, self.smoothing = settings, smoothing
        self.rate: list[float | None] = [None] * partitions

    def observe(self, partition: int, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        measured, previous = rows / seconds, self.rate[partition]
        self.rate[partition] = measured if previous is None else (
            self.smoothing * measured + (1 - self.smoothing) * previous)

    def max_rows(self, partition: int) -> int:
        rate = self.rate[partition]
        if rate is None:
            return self.settings.min_rows
        wanted = int(rate * self.settings.target_latency_ms / 1000)
        return max(self.settings.min_rows, min(self.settings.max_rows, wanted))
