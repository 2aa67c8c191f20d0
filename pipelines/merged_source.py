"""Bounded file sources read in event-time order: a k-way merge of their parts by timestamp.

Files given in any order (``may.parquet april.parquet``), or many sensors' files whose time
ranges overlap, come out as one stream ordered by event time. :class:`EventTimeMergedSource`
wraps a :class:`~pipelines.sources.ParquetSource` or :class:`~pipelines.sources.CsvSource`
and yields the same :class:`~pipelines.sources.RawBatch` objects as they do: each batch is a
run of consecutive rows of one part, with strictly increasing offsets, so the driver's
per-part offsets still checkpoint and resume the read.

The merge (row by row it would be: always emit the part whose next row has the smallest
``(merge key, part id)``; the offset orders a part's own rows):

* A row's *merge key* is the smallest timestamp at or after it within its block and the
  next block of its part, where blocks are the part's rows cut every ``block_rows`` from
  offset 0. In a sorted part the key is the row's own time. Inside an unsorted part, a row
  dated far ahead takes the time of the rows after it, so it does not hold back the rest of
  its file; it travels with its neighbours and the reorder buffer
  (:mod:`pipelines.event_time`) places it by its real time. A null or unreadable timestamp
  counts as "no time" the same way (the normaliser dead-letters that row).
* The key depends only on the file's content, never on where a read started, so the merge
  is a pure function of the per-part positions: resumed from the checkpointed
  ``{part: next_offset}`` it yields exactly the remaining rows in the uninterrupted order.
* Runs are cut only where another part's next key comes first, so files that do not
  overlap are read in whole blocks whatever order they are given in.
* Parquet row-group statistics (min of the timestamp column) give a lower bound of a
  part's keys before it is opened: a part is opened only when that bound comes first, so
  files given in reverse order are read one after the other, not all at once.

JSON Lines parts keep the timestamp inside the JSON text, so they are not merged here: a
JSON Lines source is read part by part and relies on the reorder buffer's lateness.

Example:
    >>> src = ParquetSource("tx", ["may.parquet", "april.parquet"])   # doctest: +SKIP
    >>> merged = EventTimeMergedSource(src, "TX_DATETIME")            # doctest: +SKIP
    >>> for raw in merged.batches(resume={"may.parquet": 1_000}):     # doctest: +SKIP
    ...     handle(raw)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources import CsvSource, ParquetSource, RawBatch, SourceError, SourceReader
from pipelines.timestamps import TimeUnit, parse_timestamp

__all__ = ["EventTimeMergedSource", "TimestampMicros"]

ToMicros = Callable[[pa.Array | pa.ChunkedArray], "np.ndarray | pa.Array | pa.ChunkedArray"]
_NO_TIME = np.iinfo(np.int64).max
_UNKNOWN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class TimestampMicros:
    """Turns a raw timestamp column into int64 epoch microseconds (null where unreadable).

    The same parsing as the normaliser's (``mapping.timestamp_unit``), so the merge orders
    rows by the times the pipeline will see.

    Example:
        >>> TimestampMicros("s")(pa.array([1, None])).to_pylist()
        [1000000, None]
    """

    unit: TimeUnit = "auto"

    def __call__(self, column: pa.Array | pa.ChunkedArray) -> pa.Array:
        series = pl.Series("t", column)
        frame = pl.DataFrame([series]).select(
            parse_timestamp(pl.col("t"), series.dtype, self.unit).dt.epoch("us"))
        return frame.to_series().to_arrow()


class EventTimeMergedSource:
    """A bounded Parquet or CSV source read as one stream merged by event time.

    Args:
        source: the wrapped source; its part ids, batch size and readers are used as they are.
        timestamp: the raw column holding the event time (the mapping's ``timestamp``).
        to_micros: turns a batch's timestamp column into int64 epoch microseconds (numpy,
            or Arrow with nulls where unreadable); default :class:`TimestampMicros`.
        block_rows: rows per block of the merge key (default the source's batch size).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.csv").write_text("timestamp,value\\n2024-01-01,1\\n2024-01-03,3\\n")
        >>> _ = (folder / "b.csv").write_text("timestamp,value\\n2024-01-02,2\\n")
        >>> merged = EventTimeMergedSource(CsvSource("nab", [str(folder)]), "timestamp")
        >>> [v for raw in merged.batches() for v in raw.records.column("value").to_pylist()]
        ['1', '2', '3']
    """

    def __init__(
        self,
        source: ParquetSource | CsvSource,
        timestamp: str,
        to_micros: ToMicros | None = None,
        block_rows: int | None = None,
    ) -> None:
        if not isinstance(source, ParquetSource | CsvSource):
            raise SourceError(
                f"merge by event time reads Parquet and CSV sources, not {type(source).__name__}"
                " (JSON Lines relies on the reorder buffer's lateness)")
        self.source, self.timestamp = source, timestamp
        self.to_micros = to_micros or TimestampMicros()
        self.block_rows = block_rows or source.batch_size
        if self.block_rows < 1:
            raise SourceError(f"block_rows: must be >= 1, got {block_rows!r}")
        self.name = source.name

    def list_parts(self) -> list[str]:
        """The wrapped source's part ids."""
        return self.source.list_parts()

    def batches(self, resume: Mapping[str, int] | None = None) -> Iterator[RawBatch]:
        """Every remaining row of every part, merged by event time, as runs of one part.

        Args:
            resume: part id -> offset to start from (default 0), as checkpointed from
                ``batch.next_offset``.
        """
        resume = resume or {}
        cursors = [self._cursor(part, int(resume.get(part, 0))) for part in self.list_parts()]
        try:
            yield from _merge(cursors)
        finally:
            for cursor in cursors:
                cursor.close()

    def _cursor(self, part: str, start: int) -> _PartCursor:
        bound = _UNKNOWN
        if isinstance(self.source, ParquetSource):
            bound = _parquet_lower_bound(self.source.path_of(part), self.timestamp, start,
                                         self.to_micros)
        return _PartCursor(self, part, start, bound)


def _merge(cursors: list[_PartCursor]) -> Iterator[RawBatch]:
    """The k-way merge: emit from the first part the longest run that no other part beats."""
    active = [c for c in cursors if not c.exhausted]
    while active:
        first = min(active, key=_PartCursor.rank)
        if not first.opened:  # its bound came first: read it to know its real keys
            first.open()
            active = [c for c in active if not c.exhausted]
            continue
        others = [c.rank() for c in active if c is not first]
        run = first.take_run(min(others) if others else None)
        yield run
        if first.exhausted:
            active.remove(first)


class _PartCursor:
    """One part's position in the merge: its current block, the next one, and their keys."""

    def __init__(self, merged: EventTimeMergedSource, part: str, start: int, bound: int) -> None:
        self.merged, self.part, self.start, self.bound = merged, part, start, bound
        self.opened, self.exhausted = False, False
        self._reader: SourceReader | None = None
        self._blocks: Iterator[tuple[pa.RecordBatch, np.ndarray]] | None = None
        self._block: tuple[pa.RecordBatch, np.ndarray] | None = None
        self._next: tuple[pa.RecordBatch, np.ndarray] | None = None
        self._keys = np.empty(0, dtype=np.int64)
        self._pos = 0

    def rank(self) -> tuple[int, str]:
        """The merge order of this part's next row (a lower bound until the part is opened)."""
        return (int(self._keys[self._pos]) if self.opened else self.bound), self.part

    def open(self) -> None:
        """Open the reader at the start of the block holding ``start``; key the first block."""
        block_rows = self.merged.block_rows
        aligned = self.start // block_rows * block_rows
        self._reader = self.merged.source.open_part(self.part, aligned)
        self._blocks = _aligned_blocks(self._reader, block_rows)
        self._next = next(self._blocks, None)
        self.opened = True
        self._advance_block()
        # rows before ``start`` were already read in an earlier run: drop them
        while self._block is not None and self._block[1][-1] < self.start:
            self._advance_block()
        if self._block is not None:
            self._pos = int(np.searchsorted(self._block[1], self.start))

    def take_run(self, bound: tuple[int, str] | None) -> RawBatch:
        """The longest run from the head whose ``(key, part)`` comes before ``bound``."""
        assert self._block is not None
        records, offsets = self._block
        keys = self._keys[self._pos:]
        if bound is None:
            length = len(keys)
        else:
            beaten = (keys > bound[0]) | ((keys == bound[0]) & (self.part > bound[1]))
            length = int(np.argmax(beaten)) if beaten.any() else len(keys)
        lo, self._pos = self._pos, self._pos + length
        run = RawBatch(self.merged.name, self.part, offsets[lo:self._pos],
                       records.slice(lo, length))
        if self._pos == len(offsets):
            self._advance_block()
        return run

    def _advance_block(self) -> None:
        assert self._blocks is not None
        self._block, self._pos = self._next, 0
        if self._block is None:
            self.exhausted = True
            self.close()
            return
        self._next = next(self._blocks, None)
        raw = self._micros(self._block[0])
        keys = np.minimum.accumulate(raw[::-1])[::-1]
        if self._next is not None:
            keys = np.minimum(keys, self._micros(self._next[0]).min())
        self._keys = keys

    def _micros(self, records: pa.RecordBatch) -> np.ndarray:
        column = records.column(self.merged.timestamp)
        micros = self.merged.to_micros(column)
        if isinstance(micros, pa.Array | pa.ChunkedArray):
            micros = pc.fill_null(micros.cast(pa.int64()), _NO_TIME).to_numpy()
        return np.asarray(micros, dtype=np.int64)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _aligned_blocks(reader: SourceReader,
                    size: int) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """The reader's rows cut into blocks of ``size`` rows (the reader starts at a block edge)."""
    pending: list[RawBatch] = []
    count = 0
    for raw in iter(reader.next_batch, None):
        while raw.num_rows:
            take = min(size - count, raw.num_rows)
            pending.append(_slice(raw, 0, take))
            count += take
            raw = _slice(raw, take, raw.num_rows - take)
            if count == size:
                yield _concat(pending)
                pending, count = [], 0
    if count:
        yield _concat(pending)


def _slice(raw: RawBatch, start: int, length: int) -> RawBatch:
    return RawBatch(raw.source, raw.part, raw.offsets[start:start + length],
                    raw.records.slice(start, length))


def _concat(pieces: list[RawBatch]) -> tuple[pa.RecordBatch, np.ndarray]:
    if len(pieces) == 1:
        return pieces[0].records, pieces[0].offsets
    return (pa.concat_batches([p.records for p in pieces]),
            np.concatenate([p.offsets for p in pieces]))


def _parquet_lower_bound(path: object, column: str, start: int, to_micros: ToMicros) -> int:
    """Smallest time the footer allows in the row groups from ``start`` on (or unknown).

    Only integer, date and timestamp columns are trusted: their statistics order like the
    times they stand for (strings compare as text, not as times).
    """
    meta = pq.ParquetFile(path).metadata  # type: ignore[arg-type]
    schema = meta.schema.to_arrow_schema()
    index = schema.get_field_index(column)
    if index < 0:
        return _UNKNOWN
    kind = schema.field(index).type
    if not (pa.types.is_integer(kind) or pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        return _UNKNOWN
    ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    lows = []
    for group in np.flatnonzero(ends > start):  # groups not wholly read yet
        stats = meta.row_group(int(group)).column(index).statistics
        if stats is None or not stats.has_min_max:
            return _UNKNOWN
        lows.append((stats.min, stats.max))
    if not lows:
        return _NO_TIME
    try:
        values = pa.array([v for pair in lows for v in pair], type=kind)
        micros = to_micros(values)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return _UNKNOWN
    if isinstance(micros, pa.Array | pa.ChunkedArray):
        micros = pc.fill_null(micros.cast(pa.int64()), _UNKNOWN).to_numpy()
    # min and max both: a converter that reads magnitudes ("auto") may not be monotone
    return int(np.min(micros))
