"""Rounds of event time: how several readers share a bounded source and keep per-key order.

With ``runtime.readers`` set, a bounded file source is cut into *splits* (whole files, and
Parquet files into row ranges) dealt round-robin to reader actors, so every reader holds
some of every stretch of time. The run then advances in *rounds* of event time: in round
``n`` every reader contributes its events older than the round's end ``T_n`` (reading on
until its own watermark has passed ``T_n``; what it released beyond ``T_n`` waits in its
carry for a later round), and every keyed operator applies a round once every reader has
handed it its piece of it (an empty piece says "nothing from me"), sorted by time, ties
as the driver path orders them, then by event id (:class:`RoundOrder`). So each operator
sees one total order of the events, whatever the number of readers and wherever the
splits fall: per-key order holds across readers and results are identical for 1, 2 or 4
readers. A round is also an aligned barrier: once all
readers have finished round ``n`` nothing of it is in flight, and a checkpoint is every
reader's split offsets and carry plus every operator's state.

Rounds follow the data: ``T_{n+1} = max(T_n, L) + length``, where ``L`` is the earliest
time any reader may still contribute (its carry's oldest event, or its watermark), so a
gap in the data costs one round, not thousands. :func:`round_length` sizes rounds to about
one source batch of the whole input, from the readers' first batches.

This module never imports Ray (see :mod:`cluster.readers` for the actors).

Example:
    >>> splits = [Split("a.parquet", 0, 100), Split("a.parquet", 100, 200), Split("b.parquet", 0, None)]
    >>> [[s.name for s in mine] for mine in deal(splits, 2)]
    [['a.parquet@0', 'b.parquet@0'], ['a.parquet@100']]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources import ParquetSource, RawBatch, Source, SourceReader

__all__ = [
    "END_OF_TIME",
    "RoundInputs",
    "RoundOrder",
    "Split",
    "SplitReader",
    "deal",
    "merge_pieces",
    "plan_splits",
    "round_length",
    "split_at",
]

#: The end of the last round: every event is older.
END_OF_TIME = int(np.iinfo(np.int64).max)
#: The column that tells pieces of one round apart while an operator sorts them.
ORIGIN = "__eventray_origin"


@dataclass(frozen=True)
class Split:
    """Rows ``start`` up to ``end`` (exclusive; ``None``: to its end) of one part."""

    part: str
    start: int
    end: int | None

    @property
    def name(self) -> str:
        """The split's id in checkpoints: ``<part>@<start>``."""
        return f"{self.part}@{self.start}"


def plan_splits(source: Source, rows_per_split: int) -> list[Split]:
    """The source's splits in read order: Parquet files in row ranges of ``rows_per_split``
    (from their footers, nothing read), other files whole."""
    splits = []
    for part in source.list_parts():
        if not isinstance(source, ParquetSource):
            splits.append(Split(part, 0, None))
            continue
        rows = pq.ParquetFile(source.path_of(part)).metadata.num_rows
        splits += [Split(part, start, min(start + rows_per_split, rows))
                   for start in range(0, max(rows, 1), rows_per_split)]
    return splits


def deal(splits: Sequence[Split], readers: int) -> list[list[Split]]:
    """Splits dealt round-robin: reader ``i`` gets splits ``i, i + readers, ...``, so each
    reader holds a share of every stretch of the input."""
    return [list(splits[i::readers]) for i in range(readers)]


class SplitReader:
    """Reads one reader's splits one after another; ``offsets`` say where each stands.

    Args:
        source: the source (built with the batch size the reader reads in).
        splits: this reader's splits, in read order.
        offsets: split name -> next row, from a checkpoint (default: each split's start).
    """

    def __init__(self, source: Source, splits: Sequence[Split],
                 offsets: Mapping[str, int] | None = None) -> None:
        self.source, self.splits = source, list(splits)
        self.offsets = {s.name: s.start for s in self.splits} | dict(offsets or {})
        self.index = 0
        self.reader: SourceReader | None = None

    def _done(self, split: Split) -> bool:
        return split.end is not None and self.offsets[split.name] >= split.end

    def next_batch(self) -> RawBatch | None:
        """The next batch of the current split (cut at its end), or ``None`` at the end."""
        while self.index < len(self.splits):
            split = self.splits[self.index]
            raw = None
            if not self._done(split):
                if self.reader is None:
                    self.reader = self.source.open_part(split.part, self.offsets[split.name])
                raw = self.reader.next_batch()
            if raw is not None and split.end is not None:
                raw = _cut(raw, split.end)
            if raw is None:
                self._next_split()
                continue
            self.offsets[split.name] = raw.next_offset
            return raw
        return None

    def _next_split(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.reader, self.index = None, self.index + 1

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


def _cut(raw: RawBatch, end: int) -> RawBatch | None:
    """``raw`` less its rows at or after offset ``end`` (``None`` when none is left)."""
    keep = int(np.searchsorted(raw.offsets, end, side="left"))
    if keep == raw.num_rows:
        return raw
    if keep == 0:
        return None
    return RawBatch(raw.source, raw.part, raw.offsets[:keep], raw.records.slice(0, keep))


def _micros(events: pa.Table) -> np.ndarray:
    return pc.cast(events.column("timestamp"), pa.int64()).to_numpy(zero_copy_only=False)


def split_at(events: pa.Table, end_us: int) -> tuple[pa.Table, pa.Table]:
    """(events older than ``end_us``, the others), each in its original order."""
    if end_us >= END_OF_TIME or events.num_rows == 0:
        return events, events.slice(0, 0)
    due = _micros(events) < end_us
    return events.filter(pa.array(due)), events.filter(pa.array(~due))


@dataclass(frozen=True)
class RoundOrder:
    """How an operator orders a round's events: by time; at equal times label events
    first (``labels_first``: the label feed's type; the driver path merges a label ahead of
    the events of its second), then by ``ties`` (``source.order_ties_by``: a column or
    ``data.<field>``, where the table has it), then by event id, which makes it total.

    Example:
        >>> RoundOrder("fraud.reported", "data.TRANSACTION_ID").ties
        'data.TRANSACTION_ID'
    """

    labels_first: str | None = None
    ties: str | None = None

    def keys(self, table: pa.Table) -> pa.Table:
        """The sort keys of ``table``'s rows, in order."""
        keys = {"t": pc.cast(table.column("timestamp"), pa.int64())}
        if self.labels_first is not None:
            keys["kind"] = pc.not_equal(table.column("event_type"), self.labels_first)
        tie = _path(table, self.ties) if self.ties else None
        if tie is not None:
            keys["tie"] = tie
        keys["id"] = table.column("event_id")
        return pa.table(keys)


def _path(table: pa.Table, path: str) -> pa.ChunkedArray | None:
    """A top-level column or a struct field of one (``data.X``), if the table has it."""
    name, *fields = path.split(".")
    if name not in table.column_names:
        return None
    column = table.column(name)
    for field in fields:
        if not pa.types.is_struct(column.type) or column.type.get_field_index(field) < 0:
            return None
        column = pc.struct_field(column, field)
    return column


def merge_pieces(pieces: Sequence[pa.Table | None],
                 order: RoundOrder = RoundOrder()) -> tuple[pa.Table | None, np.ndarray]:
    """One round's pieces (one per input, ``None`` for none) as one table sorted by
    ``order`` (by default ``(timestamp, event_id)``), and for each of its rows the input
    it came from.

    Example:
        >>> import datetime as dt
        >>> t = lambda s, i: pa.table({"timestamp": pa.array([dt.datetime(2018, 4, 1, 0, 0, s)],
        ...                            pa.timestamp("us", "UTC")), "event_id": [i]})
        >>> merged, origin = merge_pieces([t(5, "b"), None, t(5, "a")])
        >>> merged.column("event_id").to_pylist(), origin.tolist()
        (['a', 'b'], [2, 0])
    """
    given = [(i, piece) for i, piece in enumerate(pieces) if piece is not None and piece.num_rows]
    if not given:
        return None, np.zeros(0, np.int64)
    schema = given[0][1].schema
    table = pa.concat_tables([piece.cast(schema) for _, piece in given])
    origin = np.concatenate([np.full(piece.num_rows, i, np.int64) for i, piece in given])
    keys = order.keys(table)
    indices = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names])
    return table.take(indices), origin[indices.to_numpy()]


def round_length(first_batches: Sequence[tuple[int, int, int]], target_rows: int) -> int:
    """The event time of one round, in microseconds: about ``target_rows`` events of the
    whole input, from each reader's first batch (rows, oldest and newest event time). The
    readers' first splits lie side by side in time (dealt round-robin), so the rate is
    their rows over the time they span together.

    Example:
        >>> round_length([(100, 0, 1_000_000), (100, 1_000_000, 2_000_000)], 100)
        1000000
    """
    given = [batch for batch in first_batches if batch[0]]
    if not given:
        return 1
    span = max(newest for _, _, newest in given) - min(oldest for _, oldest, _ in given)
    rate = sum(rows for rows, _, _ in given) / max(span, 1)
    return max(1, int(target_rows / rate))


class RoundInputs:
    """The pieces of rounds an operator has been handed, by input; rounds come out whole,
    in order, once every input has handed in its piece.

    Example:
        >>> inputs = RoundInputs(2)
        >>> inputs.add(0, 1, None, 10); inputs.complete()
        []
        >>> inputs.add(0, 0, None, 10); [(n, end) for n, _, end in inputs.complete()]
        [(0, 10)]
    """

    def __init__(self, inputs: int, next_round: int = 0) -> None:
        self.inputs, self.next_round = inputs, next_round
        self.pieces: dict[int, dict[int, pa.Table | None]] = {}
        self.ends: dict[int, int] = {}

    def add(self, round_no: int, source: int, rows: pa.Table | None, end_us: int) -> None:
        if round_no < self.next_round:
            return  # a round applied before (a replay): nothing to do
        self.pieces.setdefault(round_no, {})[source] = rows
        self.ends[round_no] = end_us

    def complete(self) -> list[tuple[int, list[pa.Table | None], int]]:
        """The rounds every input has handed in, oldest first: (round, pieces by input, end)."""
        done = []
        while len(self.pieces.get(self.next_round, {})) == self.inputs:
            pieces = self.pieces.pop(self.next_round)
            end = self.ends.pop(self.next_round)
            done.append((self.next_round, [pieces[i] for i in range(self.inputs)], end))
            self.next_round += 1
        return done
