"""File sources that yield Arrow record batches and can resume from an offset.

A :class:`Source` is a small, picklable builder that only holds configuration (name, paths,
pattern, batch size) plus the resolved map ``part id -> absolute path``. Each file is one
*part*; :meth:`Source.open_part` opens a :class:`SourceReader` over one part, optionally
starting at an offset, and the reader hands out :class:`RawBatch` objects whose ``offsets``
give every row's position inside its part. ``reader.snapshot()`` (or ``batch.next_offset``)
is the value to pass back to ``open_part`` to resume right after the last batch.

All work is done per Arrow batch or per chunk of bytes, never per row in Python. This module
never imports Ray.

Example:
    >>> import pathlib, tempfile
    >>> import pyarrow.parquet as pq
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> pq.write_table(pa.table({"amount": [1.5, 2.0, 3.25]}), folder / "transactions-04.parquet")
    >>> src = ParquetSource("tx", [str(folder)], pattern="transactions-*.parquet")
    >>> for batch in iter_batches(src, resume={"transactions-04.parquet": 1}):
    ...     print(batch.part, batch.offsets.tolist(), batch.records.column("amount").to_pylist())
    transactions-04.parquet [1, 2] [2.0, 3.25]
"""

from __future__ import annotations

import csv
import glob
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.errors import PipelineError

__all__ = [
    "MALFORMED_MESSAGE",
    "MALFORMED_RAW",
    "MALFORMED_REASON",
    "CsvSource",
    "JsonLinesSource",
    "ParquetSource",
    "RawBatch",
    "Source",
    "SourceError",
    "SourceReader",
    "iter_batches",
]

_GLOB_CHARS = frozenset("*?[")
_CSV_BLOCK_SIZE = 4 << 20
_JSONL_CHUNK_SIZE = 8 << 20
_LF = 0x0A
_CR = 0x0D
# bytes.isspace(): space, \t, \n, \v, \f, \r
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D]] = True
_OFFSET_COLUMN = "__eventray_offset"
_JSONL_SCHEMA = pa.schema([pa.field("line", pa.binary())])
#: Columns a CSV batch carries beside its data: for a row the source could not parse, its
#: reason code (``malformed_row``, ``bad_encoding``), what was wrong, and its raw line; null
#: for every other row, whose data columns hold the values (null for a malformed row).
MALFORMED_REASON = "__eventray_reason"
MALFORMED_MESSAGE = "__eventray_message"
MALFORMED_RAW = "__eventray_raw"
#: The longest line a JSON Lines reader buffers by default: beyond it only the first
#: ``max_line_bytes + 1`` bytes are kept, so the line still reads as too large.
DEFAULT_MAX_LINE_BYTES = 64 << 20

_Chunk = tuple[pa.RecordBatch, np.ndarray]


class SourceError(PipelineError):
    """Unusable source configuration: missing path, no match, bad batch size, unknown part."""


@dataclass(frozen=True)
class RawBatch:
    """One batch of raw records read from one part of a source.

    Attributes:
        source: Name of the source that produced the batch.
        part: Part id (see :meth:`Source.list_parts`).
        offsets: int64 array, one per row: the row's position inside its part (row index for
            Parquet/CSV, 0-based line number for JSON Lines). Strictly increasing.
        records: The rows. CSV rows also carry :data:`MALFORMED_REASON`,
            :data:`MALFORMED_MESSAGE` and :data:`MALFORMED_RAW` (null but for rows that could
            not be parsed, which take their place and offset among the others).

    Example:
        >>> batch = RawBatch("tx", "a.parquet", np.arange(3), pa.record_batch({"x": [1, 2, 3]}))
        >>> batch.num_rows, batch.next_offset
        (3, 3)
    """

    source: str
    part: str
    offsets: np.ndarray
    records: pa.RecordBatch

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size != self.records.num_rows:
            raise ValueError(
                f"offsets must be 1-D with one entry per row: got shape {offsets.shape} "
                f"for {self.records.num_rows} rows"
            )
        object.__setattr__(self, "offsets", offsets)

    @property
    def num_rows(self) -> int:
        """Number of rows in the batch."""
        return self.records.num_rows

    @property
    def next_offset(self) -> int:
        """Offset to resume from right after this batch (last offset + 1)."""
        if self.offsets.size == 0:
            raise ValueError("an empty batch has no next offset")
        return int(self.offsets[-1]) + 1


class SourceReader(ABC):
    """Sequential reader over one part of a source.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.jsonl").write_text('{"n": 1}\\n{"n": 2}\\n{"n": 3}\\n')
        >>> source, snapshot = JsonLinesSource("events", [str(folder)], batch_size=2), 1
        >>> with source.open_part("a.jsonl", start=snapshot) as reader:
        ...     while (batch := reader.next_batch()) is not None:
        ...         print(batch.offsets.tolist())
        ...     snapshot = reader.snapshot()
        [1, 2]
        >>> snapshot
        3
    """

    @abstractmethod
    def next_batch(self) -> RawBatch | None:
        """Return the next non-empty batch, or None when the part is exhausted."""

    @abstractmethod
    def snapshot(self) -> int:
        """Offset to pass to ``open_part`` to resume right after the last returned batch."""

    @abstractmethod
    def close(self) -> None:
        """Release the underlying file handles. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Source(ABC):
    """Serialisable builder of readers over the parts (files) of one source.

    Subclasses hold only configuration, so they pickle cheaply and can be shipped to workers.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.csv").write_text("timestamp,value\\n2024-01-01,1\\n2024-01-02,2\\n")
        >>> src = CsvSource("nab", [str(folder)], pattern="*.csv", batch_size=1_000)
        >>> parts = src.list_parts()
        >>> with src.open_part(parts[0], start=1) as reader:
        ...     first = reader.next_batch()
        >>> parts, first.offsets.tolist(), first.records.column("value").to_pylist()
        (['a.csv'], [1], ['2'])
    """

    name: str

    @abstractmethod
    def list_parts(self) -> list[str]:
        """Part ids in read order."""

    @abstractmethod
    def open_part(self, part: str, start: int = 0) -> SourceReader:
        """Open a reader over ``part`` starting at offset ``start``."""


def iter_batches(source: Source, resume: Mapping[str, int] | None = None) -> Iterator[RawBatch]:
    """Yield every batch of every part of ``source``, parts in read order.

    Args:
        source: The source to read.
        resume: Optional map part id -> offset to start that part from (default 0). A part
            whose offset is at or after its end yields nothing; ids not in the source are
            ignored.

    Yields:
        The batches, in order.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.jsonl").write_text("".join(f'{{"n": {i}}}\\n' for i in range(200)))
        >>> src = JsonLinesSource("events", [str(folder)])
        >>> sum(b.num_rows for b in iter_batches(src, {"a.jsonl": 120, "elsewhere.jsonl": 5}))
        80
    """
    resume = resume or {}
    for part in source.list_parts():
        with source.open_part(part, resume.get(part, 0)) as reader:
            while (batch := reader.next_batch()) is not None:
                yield batch


# --------------------------------------------------------------------------------------------
# Reader implementation shared by the file sources
# --------------------------------------------------------------------------------------------


class _ChunkReader(SourceReader):
    """SourceReader over an iterator of ``(records, offsets)`` pairs; handles in ``resources``."""

    def __init__(
        self,
        source: str,
        part: str,
        start: int,
        open_chunks: Callable[[ExitStack], Iterator[_Chunk]],
    ) -> None:
        self._source = source
        self._part = part
        self._position = start
        self._closed = False
        self._resources = ExitStack()
        try:
            self._chunks: Iterator[_Chunk] | None = open_chunks(self._resources)
        except BaseException:
            self._resources.close()
            raise

    def next_batch(self) -> RawBatch | None:
        if self._closed:
            raise ValueError(f"reader of part {self._part!r} is closed")
        if self._chunks is None:
            return None
        item = next(self._chunks, None)
        if item is None:
            self._release()
            return None
        batch = RawBatch(self._source, self._part, item[1], item[0])
        self._position = batch.next_offset
        return batch

    def snapshot(self) -> int:
        return self._position

    def close(self) -> None:
        self._release()
        self._closed = True

    def _release(self) -> None:
        """Close the batch iterator and the file handles (reached end or closed)."""
        chunks, self._chunks = self._chunks, None
        close_chunks = getattr(chunks, "close", None)
        if close_chunks is not None:
            close_chunks()
        self._resources.close()


def _skip_rows(batches: Iterable[pa.RecordBatch], count: int) -> Iterator[pa.RecordBatch]:
    """Drop the first ``count`` rows of a stream of batches (slicing, no copy)."""
    for batch in batches:
        if count:
            dropped = min(count, batch.num_rows)
            count -= dropped
            batch = batch.slice(dropped)
        if batch.num_rows:
            yield batch


def _rechunk(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of batches into batches of exactly ``size`` rows (last may be short)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield _concat(pending)
                pending, count = [], 0
    if count:
        yield _concat(pending)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def _with_row_offsets(batches: Iterable[pa.RecordBatch], start: int) -> Iterator[_Chunk]:
    """Attach consecutive row offsets, starting at ``start``, to each batch."""
    position = start
    for batch in batches:
        offsets = np.arange(position, position + batch.num_rows, dtype=np.int64)
        offsets.flags.writeable = False
        position += batch.num_rows
        yield batch, offsets


# --------------------------------------------------------------------------------------------
# Path resolution and the shared builder
# --------------------------------------------------------------------------------------------


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _resolve_entry(entry: str | Path, pattern: str) -> list[tuple[str, Path]]:
    """Resolve one ``paths`` entry to sorted ``(part id, absolute path)`` pairs."""
    path = Path(entry).expanduser()
    if path.is_dir():
        found = [
            (p.relative_to(path).as_posix(), _absolute(p))
            for p in path.rglob(pattern)
            if p.is_file()
        ]
        if not found:
            raise SourceError(f"paths: directory {str(entry)!r} has no file matching {pattern!r}")
    elif path.is_file():
        found = [(path.name, _absolute(path))]
    elif _GLOB_CHARS.intersection(str(entry)):
        matches = (Path(m) for m in glob.glob(str(path), recursive=True))
        found = [(p.name, _absolute(p)) for p in matches if p.is_file()]
        if not found:
            raise SourceError(f"paths: glob {str(entry)!r} matches no file")
    else:
        raise SourceError(f"paths: {str(entry)!r} does not exist")
    return sorted(found)


def _resolve_paths(paths: Sequence[str | Path], pattern: str) -> dict[str, Path]:
    """Map part id -> absolute path, in read order (entries in the given order)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if len(paths) == 0:
        raise SourceError("paths: at least one path is required")
    parts: dict[str, Path] = {}
    owners: dict[Path, str] = {}
    for entry in paths:
        for part, path in _resolve_entry(entry, pattern):
            if part in parts:
                raise SourceError(f"paths: part id {part!r} names both {parts[part]} and {path}")
            if path in owners:
                raise SourceError(f"paths: file {path} is matched twice ({owners[path]!r})")
            parts[part] = path
            owners[path] = part
    return parts


class _FileSource(Source):
    """Shared configuration, validation and path resolution of the file sources."""

    def __init__(
        self, name: str, paths: Sequence[str | Path], pattern: str, batch_size: int
    ) -> None:
        if not isinstance(name, str) or not name:
            raise SourceError(f"name: must be a non-empty string, got {name!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SourceError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        if not isinstance(pattern, str) or not pattern or Path(pattern).is_absolute():
            raise SourceError(f"pattern: must be a non-empty relative glob, got {pattern!r}")
        self.name = name
        self.paths: tuple[str | Path, ...] = (
            (paths,) if isinstance(paths, str | os.PathLike) else tuple(paths)
        )
        self.pattern = pattern
        self.batch_size = batch_size
        self._parts = _resolve_paths(self.paths, pattern)

    def list_parts(self) -> list[str]:
        return list(self._parts)

    def path_of(self, part: str) -> Path:
        """The file behind a part id."""
        if part not in self._parts:
            raise SourceError(f"part: unknown part {part!r} of source {self.name!r}")
        return self._parts[part]

    def open_part(self, part: str, start: int = 0) -> SourceReader:
        path = self._parts.get(part)
        if path is None:
            raise SourceError(f"part: unknown part {part!r} of source {self.name!r}")
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
            raise SourceError(f"start: must be an integer >= 0, got {start!r}")
        if not path.is_file():
            raise SourceError(f"part {part!r}: file {path} no longer exists")
        start = int(start)
        return _ChunkReader(self.name, part, start, lambda res: self._chunks(path, start, res))

    @abstractmethod
    def _chunks(self, path: Path, start: int, resources: ExitStack) -> Iterator[_Chunk]:
        """Open ``path`` (registering handles on ``resources``) and return its batches."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, paths={list(self.paths)!r}, "
            f"pattern={self.pattern!r}, batch_size={self.batch_size})"
        )


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


class ParquetSource(_FileSource):
    """Parquet files read with pyarrow, ``batch_size`` rows per batch; offsets are row indices.

    Resuming skips whole row groups using the footer metadata (they are never read) and
    slices the first batch.

    Example:
        >>> import pathlib, tempfile
        >>> import pyarrow.parquet as pq
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for month in ("2018-05", "2018-04"):
        ...     pq.write_table(pa.table({"n": [1]}), folder / f"transactions-{month}.parquet")
        >>> ParquetSource("tx", [str(folder)], "transactions-*.parquet").list_parts()
        ['transactions-2018-04.parquet', 'transactions-2018-05.parquet']
    """

    def __init__(
        self,
        name: str,
        paths: Sequence[str | Path],
        pattern: str = "*.parquet",
        batch_size: int = 10_000,
    ) -> None:
        super().__init__(name, paths, pattern, batch_size)

    def _chunks(self, path: Path, start: int, resources: ExitStack) -> Iterator[_Chunk]:
        parquet = pq.ParquetFile(path)
        resources.callback(parquet.close)
        return _with_row_offsets(_parquet_batches(parquet, start, self.batch_size), start)


def _parquet_batches(parquet: pq.ParquetFile, start: int, size: int) -> Iterator[pa.RecordBatch]:
    """Rows ``start``.. of ``parquet`` in batches of ``size``, skipping unread row groups."""
    meta = parquet.metadata
    group_rows = np.array(
        [meta.row_group(i).num_rows for i in range(meta.num_row_groups)], dtype=np.int64
    )
    group_ends = np.cumsum(group_rows)
    first = int(np.searchsorted(group_ends, start, side="right"))
    if first >= group_rows.size:
        return iter(())
    skip = start - int(group_ends[first] - group_rows[first])
    raw = parquet.iter_batches(batch_size=size, row_groups=list(range(first, group_rows.size)))
    return _rechunk(_skip_rows(raw, skip), size)


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


class CsvSource(_FileSource):
    """CSV files with a header line; every column is read as ``pa.string()`` (no inference).

    Files are read in blocks of whole lines, each parsed by ``pyarrow.csv``. Offsets are
    0-based data-row indices; empty lines are not rows. Values are kept verbatim (empty
    fields are ``""``, never null). Quoted values may not contain newlines. Resuming drops
    the first ``start`` rows before parsing.

    A row that cannot be parsed (wrong column count, a quote left open, bytes that are not
    UTF-8) never stops the read: it is a row of its own, at its own offset, with its reason,
    message and raw line in :data:`MALFORMED_REASON`, :data:`MALFORMED_MESSAGE` and
    :data:`MALFORMED_RAW` (see :class:`RawBatch`), for the normaliser to dead-letter.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.csv").write_text('timestamp,value\\n2024-01-01,1.5\\n"open,2\\n')
        >>> batch = next(iter_batches(CsvSource("nab", [str(folder)], batch_size=5_000)))
        >>> batch.records.schema.types[0], batch.num_rows
        (DataType(string), 2)
    """

    def __init__(
        self,
        name: str,
        paths: Sequence[str | Path],
        pattern: str = "*.csv",
        batch_size: int = 10_000,
        *,
        _block_size: int = _CSV_BLOCK_SIZE,
    ) -> None:
        super().__init__(name, paths, pattern, batch_size)
        if _block_size < 1:
            raise SourceError(f"_block_size: must be >= 1, got {_block_size!r}")
        self._block_size = _block_size

    def _chunks(self, path: Path, start: int, resources: ExitStack) -> Iterator[_Chunk]:
        names = _csv_header(path)
        if names is None:  # empty file: no header, no rows
            return iter(())
        handle = resources.enter_context(open(path, "rb"))
        rows = _csv_row_batches(handle, names, start, self._block_size)
        return _split_offsets(_rechunk(rows, self.batch_size))


def _csv_row_batches(
    handle: BinaryIO, names: list[str], start: int, chunk_size: int
) -> Iterator[pa.RecordBatch]:
    """Data rows numbered ``>= start`` (the first line is the header), one batch per chunk."""
    row, header = 0, True
    for buf in _line_buffers(handle, chunk_size):
        newlines = np.flatnonzero(buf == _LF)
        starts, ends, has_cr = _line_bounds(buf, newlines)
        is_row = ends > starts  # as pyarrow reads CSV: only empty lines are not rows
        if header:
            is_row[0], header = False, False
        numbers = row + np.cumsum(is_row) - 1
        row += int(is_row.sum())
        keep = is_row & (numbers >= start)
        if keep.any():
            lines = _binary_lines(buf, starts, ends, keep, newlines, has_cr)
            yield _csv_rows(lines, names, numbers[keep])


def _csv_rows(lines: pa.Array, names: list[str], offsets: np.ndarray) -> pa.RecordBatch:
    """Parse lines (no terminators) into a batch of string columns, malformed ones marked."""
    malformed: dict[int, tuple[str, str]] = {}
    bad_encoding = np.flatnonzero(invalid_utf8_rows(lines))
    for i in bad_encoding:
        malformed[int(i)] = ("bad_encoding", "line is not valid UTF-8")
    readable = np.setdiff1d(np.arange(len(lines)), bad_encoding)
    table, rejected = _parse_csv_lines(lines.take(pa.array(readable)), names)
    malformed |= {int(readable[i]): ("malformed_row", text) for i, text in rejected.items()}
    columns = _spread(table, len(lines), sorted(malformed))
    if malformed:
        at = np.array(sorted(malformed), dtype=np.int64)
        reasons = np.full(len(lines), None, dtype=object)
        messages = np.full(len(lines), None, dtype=object)
        reasons[at] = [malformed[i][0] for i in at]
        messages[at] = [malformed[i][1] for i in at]
        hit = np.zeros(len(lines), dtype=bool)
        hit[at] = True
        columns += [pa.array(reasons, pa.string()), pa.array(messages, pa.string()),
                    pc.if_else(pa.array(hit), lines, pa.nulls(len(lines), pa.binary()))]
    else:
        columns += [pa.nulls(len(lines), pa.string()), pa.nulls(len(lines), pa.string()),
                    pa.nulls(len(lines), pa.binary())]
    return pa.RecordBatch.from_arrays(
        [*columns, pa.array(offsets, pa.int64())],
        names=[*names, MALFORMED_REASON, MALFORMED_MESSAGE, MALFORMED_RAW, _OFFSET_COLUMN])


def _spread(table: pa.Table, size: int, malformed: list[int]) -> list[pa.Array]:
    """The parsed rows' columns at their lines' positions, null at the malformed lines."""
    columns = [column.combine_chunks() for column in table.columns]
    if not malformed:
        return columns
    hit = np.zeros(size, dtype=bool)
    hit[malformed] = True
    positions = np.full(size, 0, dtype=np.int64)
    positions[~hit] = np.arange(size - len(malformed))
    take = pa.array(positions, mask=hit)
    return [column.take(take) for column in columns]


def _parse_csv_lines(lines: pa.Array, names: list[str]) -> tuple[pa.Table, dict[int, str]]:
    """The valid rows of ``lines`` (UTF-8, one record each) and a message per rejected line.

    One ``pyarrow.csv`` parse for the whole block; only a block where a quote left open ran
    a record past its line is bisected to find that line.
    """
    table, rejected = _try_parse(lines, names)
    if table is not None:
        return table, rejected
    if len(lines) == 1:
        empty = pa.table({n: pa.array([], pa.string()) for n in names})
        return empty, {0: "broken quoting: a quoted value is not closed on its line"}
    mid = len(lines) // 2
    head, head_rejected = _parse_csv_lines(lines.slice(0, mid), names)
    tail, tail_rejected = _parse_csv_lines(lines.slice(mid), names)
    return (pa.concat_tables([head, tail]),
            head_rejected | {mid + i: text for i, text in tail_rejected.items()})


def _try_parse(lines: pa.Array, names: list[str]) -> tuple[pa.Table | None, dict[int, str]]:
    """Parse lines as one CSV block; ``None`` when a record spans lines or parsing fails."""
    rejected: dict[int, str] = {}

    def reject(row: pacsv.InvalidRow) -> str:
        if row.number is not None:
            rejected[row.number - 1] = (
                f"expected {row.expected_columns} columns, got {row.actual_columns}")
        return "skip"

    data = _joined_lines(lines)
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False,
                                           block_size=max(len(data), 1)),
            parse_options=pacsv.ParseOptions(invalid_row_handler=reject),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False),
        )
    except pa.ArrowInvalid:
        return None, {}
    spans = table.num_rows + len(rejected) != len(lines) or any(
        pc.any(pc.match_substring(column, "\n")).as_py() for column in table.columns)
    return (None, {}) if spans else (table, rejected)


def _joined_lines(lines: pa.Array) -> pa.Buffer:
    """The lines' bytes, each followed by ``\n`` (one vectorised scatter)."""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[
        lines.offset : lines.offset + len(lines) + 1]
    data = np.frombuffer(lines.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    lengths = np.diff(offsets)
    out = np.full(data.size + len(lines), _LF, dtype=np.uint8)
    out[np.arange(data.size) + np.repeat(np.arange(len(lines)), lengths)] = data
    return pa.py_buffer(out)


def _csv_header(path: Path) -> list[str] | None:
    """Column names from the first record of ``path`` (None for an empty file)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        header = next(csv.reader(handle), None)
    if header is None:
        return None
    if not header:
        raise SourceError(f"{path}: the first line must be a header")
    return header


# --------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------


class JsonLinesSource(_FileSource):
    """JSON Lines files as raw bytes: one ``line: binary`` column, nothing decoded.

    Each row is a line without its trailing ``\\n`` / ``\\r\\n``; blank (whitespace-only)
    lines are skipped but still counted, so offsets are true 0-based line numbers. A final
    line without a newline is a line. Files are read in chunks of bytes and split with numpy.
    A line longer than ``max_line_bytes`` that spans chunks is cut to its first
    ``max_line_bytes + 1`` bytes (enough for the normaliser to see it is too large), the
    rest skipped up to its newline: memory stays bounded whatever the file holds.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "day-1.jsonl").write_text('{"n": 1}\\n\\n{"n": 2}\\n{"n": 3}')
        >>> src = JsonLinesSource("events", [str(folder / "*.jsonl")], batch_size=50_000)
        >>> next(iter_batches(src, {"day-1.jsonl": 1})).offsets.tolist()
        [2, 3]
    """

    def __init__(
        self,
        name: str,
        paths: Sequence[str | Path],
        pattern: str = "*.jsonl",
        batch_size: int = 10_000,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        _chunk_size: int = _JSONL_CHUNK_SIZE,
    ) -> None:
        super().__init__(name, paths, pattern, batch_size)
        if _chunk_size < 1:
            raise SourceError(f"_chunk_size: must be >= 1, got {_chunk_size!r}")
        if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) \
                or max_line_bytes < 1:
            raise SourceError(f"max_line_bytes: must be an integer >= 1, got {max_line_bytes!r}")
        self._chunk_size = _chunk_size
        self.max_line_bytes = max_line_bytes

    def _chunks(self, path: Path, start: int, resources: ExitStack) -> Iterator[_Chunk]:
        handle = resources.enter_context(open(path, "rb"))
        lines = _jsonl_line_batches(handle, start, self._chunk_size, self.max_line_bytes)
        return _split_offsets(_rechunk(lines, self.batch_size))


def _split_offsets(batches: Iterable[pa.RecordBatch]) -> Iterator[_Chunk]:
    """Turn batches carrying an offset column (the last) into ``(records, offsets)`` pairs."""
    for batch in batches:
        last = batch.num_columns - 1
        yield batch.drop_columns([_OFFSET_COLUMN]), batch.column(last).to_numpy()


def _line_buffers(
    handle: BinaryIO, chunk_size: int, max_line_bytes: int | None = None
) -> Iterator[np.ndarray]:
    """Read ``handle`` as uint8 buffers of whole lines, each ending with ``\\n``.

    A line longer than a chunk is accumulated across chunks, up to ``max_line_bytes + 1``
    bytes (all of it when None); past that, its bytes are dropped until its newline. A final
    line without a newline gets one appended.
    """
    keep = None if max_line_bytes is None else max_line_bytes + 1
    pending: list[bytes] = []
    pending_size, skipping = 0, False
    while chunk := handle.read(chunk_size):
        last = chunk.rfind(b"\n")
        if last < 0:
            if not skipping:
                pending.append(chunk)
                pending_size += len(chunk)
        else:
            # An over-long line ends at this chunk's first newline: the rest of it is dropped.
            cut = chunk.find(b"\n") if skipping else 0
            head = memoryview(chunk)[cut : last + 1]
            data = b"".join([*pending, head]) if pending else head
            pending = [chunk[last + 1 :]] if last + 1 < len(chunk) else []
            pending_size, skipping = len(chunk) - last - 1, False
            yield np.frombuffer(data, dtype=np.uint8)
        if keep is not None and pending_size > keep:
            pending, pending_size, skipping = [b"".join(pending)[:keep]], keep, True
    if pending:
        yield np.frombuffer(b"".join([*pending, b"\n"]), dtype=np.uint8)


def _jsonl_line_batches(
    handle: BinaryIO, start: int, chunk_size: int, max_line_bytes: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Non-blank lines numbered ``>= start``, one batch (line, offset) per chunk."""
    line_no = 0
    for buf in _line_buffers(handle, chunk_size, max_line_bytes):
        newlines = np.flatnonzero(buf == _LF)
        if line_no + newlines.size > start:
            batch = _lines_batch(buf, newlines, line_no, start)
            if batch is not None:
                yield batch
        line_no += newlines.size


def _line_bounds(buf: np.ndarray, newlines: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(starts, ends, has_cr)`` of the lines of ``buf``, ends without ``\\r\\n`` / ``\\n``."""
    starts = np.empty_like(newlines)
    starts[0] = 0
    starts[1:] = newlines[:-1] + 1
    ends = newlines.copy()
    has_cr = ends > starts
    has_cr[has_cr] = buf[ends[has_cr] - 1] == _CR
    ends -= has_cr
    return starts, ends, has_cr


def _binary_lines(
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    keep: np.ndarray,
    newlines: np.ndarray,
    has_cr: np.ndarray,
) -> pa.Array:
    """The kept lines as a ``pa.binary()`` array (one gather, no per-line copies)."""
    data = _compact(buf, starts, ends, keep, newlines, has_cr)
    lengths = ends[keep] - starts[keep]
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of lines in one chunk exceed pa.binary() limits")
    return pa.Array.from_buffers(
        pa.binary(),
        lengths.size,
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)],
    )


def _lines_batch(
    buf: np.ndarray, newlines: np.ndarray, first_line: int, start: int
) -> pa.RecordBatch | None:
    """Split ``buf`` (whole lines, ending with ``\\n``) into a (line, offset) batch."""
    starts, ends, has_cr = _line_bounds(buf, newlines)
    line_numbers = np.arange(first_line, first_line + newlines.size, dtype=np.int64)
    keep = (line_numbers >= start) & _non_blank(buf, starts, ends)
    if not keep.any():
        return None
    lines = _binary_lines(buf, starts, ends, keep, newlines, has_cr)
    return pa.RecordBatch.from_arrays(
        [lines, pa.array(line_numbers[keep])], names=["line", _OFFSET_COLUMN]
    )


def _non_blank(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mask of lines ``buf[starts:ends]`` holding at least one non-whitespace byte."""
    lengths = ends - starts
    first_bytes = buf[np.minimum(starts, buf.size - 1)]
    maybe_blank = (lengths == 0) | _WHITESPACE[first_bytes]
    non_blank = ~maybe_blank
    check = np.flatnonzero(maybe_blank & (lengths > 0))
    if check.size:  # rare: lines starting with whitespace, count non-whitespace bytes
        solid = np.zeros(buf.size + 1, dtype=np.int64)
        np.cumsum(~_WHITESPACE[buf], out=solid[1:])
        non_blank[check] = solid[ends[check]] > solid[starts[check]]
    return non_blank


def _compact(
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    keep: np.ndarray,
    newlines: np.ndarray,
    has_cr: np.ndarray,
) -> np.ndarray:
    """Concatenate the kept lines' bytes (without terminators) with one boolean gather."""
    mask = np.ones(buf.size, dtype=bool)
    mask[newlines] = False
    mask[ends[has_cr]] = False
    kept = np.flatnonzero(keep)
    mask[: starts[kept[0]]] = False
    dropped = np.flatnonzero(~keep[kept[0] :]) + kept[0]  # blank lines among the kept ones
    if dropped.size:
        mask[_ranges(starts[dropped], ends[dropped] - starts[dropped])] = False
    return buf[mask]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), vectorised."""
    total = int(lengths.sum())
    bases = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return bases + np.arange(total, dtype=np.int64)


def invalid_utf8_rows(lines: pa.Array) -> np.ndarray:
    """Mask of rows that are not valid UTF-8, by bisecting a failing vectorised cast.

    Example:
        >>> invalid_utf8_rows(pa.array([b"ok", b"\\xff", b"fine"])).tolist()
        [False, True, False]
    """
    bad = np.zeros(len(lines), dtype=bool)
    pending = [(0, len(lines))] if len(lines) else []
    while pending:
        lo, hi = pending.pop()
        try:
            lines.slice(lo, hi - lo).cast(pa.string())
        except pa.ArrowInvalid:
            if hi - lo == 1:
                bad[lo] = True
            else:
                mid = (lo + hi) // 2
                pending += [(lo, mid), (mid, hi)]
    return bad
