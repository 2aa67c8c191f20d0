"""Paced replay: release events by their event time, ``speedup`` times faster than real.

For latency tests and demos: a recorded day replays in minutes with its real rhythm. The
pacer works per batch: it computes every row's due time at once (event time relative to
the first event, divided by the speed-up, monotone so one key's order is kept) and
releases the longest due prefix, sleeping only until the next row is due. Released rows
get ``metadata.ingested_at`` = the release time, so latency is measured from release.
The clock and the sleep are injected: tests drive them without waiting.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.envelope import TIMESTAMP


def restamp_ingested(events: pa.Table, when: dt.datetime) -> pa.Table:
    """A copy of ``events`` whose ``metadata.ingested_at`` is ``when``."""
    metadata = events.column("metadata").combine_chunks()
    fields = {f.name: metadata.field(f.name) for f in metadata.type}
    fields["ingested_at"] = pa.array(np.full(len(metadata), pa.scalar(when, TIMESTAMP).value,
                                             dtype=np.int64), TIMESTAMP)
    new = pa.StructArray.from_arrays(list(fields.values()), fields=list(metadata.type))
    return events.set_column(events.schema.get_field_index("metadata"), "metadata", new)


class Pacer:
    """Releases envelope batches at ``speedup`` x their event-time rate.

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
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.speedup = speedup
        self.monotonic, self.sleep, self.wall = monotonic, sleep, wall
        self._origin: tuple[int, float] | None = None  # (first event time in us, its release)
        self._high_water = np.iinfo(np.int64).min

    def release(self, events: pa.Table) -> Iterator[pa.Table]:
        """Yield ``events`` in due slices, in order, sleeping between them as needed."""
        if events.num_rows == 0:
            return
        micros = pc.cast(events.column("timestamp"), pa.int64()).to_numpy()
        if self._origin is None:
            self._origin = (int(micros[0]), self.monotonic())
        # Due times follow the running maximum, so a late event never waits behind itself.
        running = np.maximum.accumulate(np.maximum(micros, self._high_water))
        self._high_water = int(running[-1])
        first_us, first_wall = self._origin
        due = first_wall + (running - first_us) / 1e6 / self.speedup
        start = 0
        while start < len(due):
            now = self.monotonic()
            stop = int(np.searchsorted(due, now, side="right"))
            if stop <= start:
                self.sleep(max(0.0, float(due[start] - now)))
                continue
            yield restamp_ingested(events.slice(start, stop - start), self.wall())
            start = stop
