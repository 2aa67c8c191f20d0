"""Paced replay: release events by their event time, ``speedup`` times faster than real.

For latency tests and demos: a recorded day replays in minutes with its real rhythm. The
pacer works per batch: it computes every row's due time at once (event time relative to
the first event, divided by the speed-up, monotone so one key's order is kept);
:meth:`Pacer.take` hands out the longest due prefix once the next row is due (or, with a
linger, once the linger since the last release has passed), and :meth:`Pacer.next_wake`
says when that is, so the driver does its other work while it waits. Released rows get
``metadata.ingested_at`` = their due time, when they arrive in the replayed stream, so
latency is measured from arrival, whatever held them. The clock and the sleep are
injected: tests drive them without waiting.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.envelope import TIMESTAMP


def restamp_ingested(events: pa.Table, micros: np.ndarray) -> pa.Table:
    """A copy of ``events`` whose ``metadata.ingested_at`` is ``micros`` (UTC microseconds,
    one per row)."""
    metadata = events.column("metadata").combine_chunks()
    fields = {f.name: metadata.field(f.name) for f in metadata.type}
    fields["ingested_at"] = pa.array(np.asarray(micros, dtype=np.int64), TIMESTAMP)
    new = pa.StructArray.from_arrays(list(fields.values()), fields=list(metadata.type))
    return events.set_column(events.schema.get_field_index("metadata"), "metadata", new)


class Pacer:
    """Releases envelope batches at ``speedup`` x their event-time rate.

    ``linger_s``: release what is due at most this often (0: as soon as it is due). Each
    slice costs the pipeline a fixed amount (a hand-off per stage and partition, a store
    file per table and date), so waiting a little for more rows keeps a lightly loaded
    pipeline from spending its cores on tiny slices and queueing behind them.

    Every row is stamped ``metadata.ingested_at`` = its due time, the moment it arrives in
    the replayed stream, whenever it is released: latency measured from it includes the
    linger and any time the driver fell behind.

    Example:
        >>> from pipelines.testing import FakeClock
        >>> clock = FakeClock()
        >>> pacer = Pacer(60.0, monotonic=clock.monotonic, sleep=clock.sleep, wall=clock.now)
        >>> t = pa.table({"timestamp": pa.array([0, 60_000_000, 120_000_000], TIMESTAMP),
        ...               "metadata": pa.array([{"ingested_at": 0}] * 3,
        ...                   pa.struct([("ingested_at", TIMESTAMP)]))})
        >>> [(s.num_rows, clock.monotonic()) for s in pacer.release(t)]
        [(1, 0.0), (1, 1.0), (1, 2.0)]
    """

    def __init__(
        self,
        speedup: float,
        linger_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        if linger_s < 0:
            raise ValueError("linger_s must be >= 0")
        self.speedup, self.linger_s = speedup, linger_s
        self.monotonic, self.sleep, self.wall = monotonic, sleep, wall
        # (first event time in us, its release on the monotonic clock, and in wall-clock us)
        self._origin: tuple[int, float, int] | None = None
        self._high_water = np.iinfo(np.int64).min
        self._released_at = -np.inf
        # (events, due times on the monotonic clock, arrival in wall-clock us), oldest first
        self._scheduled: deque[tuple[pa.Table, np.ndarray, np.ndarray]] = deque()

    def add(self, events: pa.Table) -> None:
        """Schedule ``events`` for release, after those scheduled before."""
        if events.num_rows == 0:
            return
        micros = pc.cast(events.column("timestamp"), pa.int64()).to_numpy()
        if self._origin is None:
            self._origin = (int(micros[0]), self.monotonic(),
                            pa.scalar(self.wall(), TIMESTAMP).value)
        # Due times follow the running maximum, so a late event never waits behind itself.
        running = np.maximum.accumulate(np.maximum(micros, self._high_water))
        self._high_water = int(running[-1])
        first_us, first_monotonic, first_wall_us = self._origin
        offset_s = (running - first_us) / 1e6 / self.speedup
        arrived_us = first_wall_us + np.round(offset_s * 1e6).astype(np.int64)
        self._scheduled.append((events, first_monotonic + offset_s, arrived_us))

    @property
    def pending(self) -> bool:
        """Whether scheduled events are still to be released."""
        return bool(self._scheduled)

    def next_wake(self) -> float | None:
        """When (monotonic clock) the next slice may be taken; ``None`` when nothing waits."""
        if not self._scheduled:
            return None
        return max(float(self._scheduled[0][1][0]), self._released_at + self.linger_s)

    def take(self) -> pa.Table | None:
        """The slice due now (stamped with its arrival), or ``None`` before :meth:`next_wake`."""
        wake, now = self.next_wake(), self.monotonic()
        if wake is None or now < wake:
            return None
        events, due, arrived_us = self._scheduled[0]
        stop = int(np.searchsorted(due, now, side="right"))
        self._released_at = now
        if stop == len(due):
            self._scheduled.popleft()
        else:
            self._scheduled[0] = (events.slice(stop), due[stop:], arrived_us[stop:])
        return restamp_ingested(events.slice(0, stop), arrived_us[:stop])

    def release(self, events: pa.Table) -> Iterator[pa.Table]:
        """Yield ``events`` in due slices, in order, sleeping between them as needed (for
        callers with nothing else to do; the driver takes slices and works while it waits)."""
        self.add(events)
        while self.pending:
            piece = self.take()
            if piece is None:
                self.sleep(max(0.0, (self.next_wake() or 0.0) - self.monotonic()))
                continue
            yield piece
