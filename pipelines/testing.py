"""Testing helpers, shipped as product code: users test their pipelines with them too.

- :class:`ListSource`: a source over in-memory record batches (one part per list).
- :class:`ListSink`: collects what a pipeline writes, per table.
- :class:`FakeClock`: an injectable clock that only moves when told (or when slept on).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipelines.sources import RawBatch, Source, SourceError, SourceReader


class FakeClock:
    """A clock for tests: ``now()`` for wall time (UTC), ``monotonic()``, ``sleep()``.

    Example:
        >>> clock = FakeClock(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        >>> clock.sleep(1.5); clock.monotonic()
        1.5
        >>> clock.now().isoformat()
        '2024-01-01T00:00:01.500000+00:00'
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.start = start or dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        self.elapsed = 0.0

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.elapsed += seconds

    __call__ = now


class _ListReader(SourceReader):
    def __init__(self, name: str, part: str, batches: Sequence[pa.RecordBatch], start: int) -> None:
        self.name, self.part, self.position = name, part, start
        self.table = pa.Table.from_batches(list(batches)) if batches else None
        self.sizes = [b.num_rows for b in batches]

    def next_batch(self) -> RawBatch | None:
        if self.table is None or self.position >= self.table.num_rows:
            return None
        # Keep the given batch boundaries: find the batch holding `position`.
        ends = np.cumsum(self.sizes)
        end = int(ends[np.searchsorted(ends, self.position, side="right")])
        rows = self.table.slice(self.position, end - self.position).combine_chunks()
        batch = RawBatch(self.name, self.part, np.arange(self.position, end),
                         rows.to_batches()[0] if rows.num_rows else rows.to_batches())
        self.position = end
        return batch

    def snapshot(self) -> int:
        return self.position

    def close(self) -> None:
        self.table = None


class ListSource(Source):
    """A source over in-memory batches: ``parts`` maps part id -> list of record batches.

    Example:
        >>> src = ListSource("mem", {"p0": [pa.record_batch({"x": [1, 2]})]})
        >>> src.open_part("p0").next_batch().num_rows
        2
    """

    def __init__(self, name: str, parts: dict[str, list[pa.RecordBatch]]) -> None:
        self.name = name
        self.parts = dict(parts)

    def list_parts(self) -> list[str]:
        return list(self.parts)

    def open_part(self, part: str, start: int = 0) -> SourceReader:
        if part not in self.parts:
            raise SourceError(f"unknown part {part!r}; parts: {', '.join(self.parts)}")
        return _ListReader(self.name, part, self.parts[part], start)


class ListSink:
    """Collects written batches per table (an in-memory stand-in for the event store).

    Example:
        >>> sink = ListSink()
        >>> sink.write("events", pa.table({"x": [1]}), writer="p0", seq=0)
        >>> sink.table("events").num_rows
        1
    """

    def __init__(self) -> None:
        self.batches: dict[str, dict[tuple[str, int], pa.Table]] = defaultdict(dict)

    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> None:
        # Keyed like store files: a rewrite of (writer, seq) replaces, never duplicates.
        self.batches[table][(writer, seq)] = rows

    def table(self, table: str) -> pa.Table:
        parts = [self.batches[table][k] for k in sorted(self.batches[table])]
        return pa.concat_tables(parts) if parts else pa.table({})
