"""Compaction and retention of an event store.

:func:`compact_store` merges the files of each ``<table>/event_type=<type>/date=<day>/``
folder into one, and drops rows older than their table's or event type's ``max_age``:

1. read the folder's files (a compacted file stands for its segments), apply retention;
2. write the merged file atomically (temporary name, fsync, rename) as
   ``compact-<digest>.parquet``, its metadata naming the batches it holds and the files
   it replaces (:mod:`pipelines.segments`);
3. record it in the commit log, with the files it replaces;
4. remove the originals.

A reader listing the folder between 2 and 4 sees the originals and the merged file, and
:meth:`pipelines.store.EventStore.files` ignores the originals the merged file replaces: every
row once. (A LazyFrame built before the compaction and collected after it fails on the
removed files instead of returning other rows.) A rerun or resume drops its batches from
compacted files (:meth:`pipelines.store.EventStore.truncate`) before it writes them again.

Retention works on the rows' time (event time; ``ingested_at`` for dead letters) against
an injected "now". Rules are ``<table>`` or ``<table>/<event type>``; the more specific
wins.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.commit_log import CommitLog, file_stat, modified_at, relative_posix
from pipelines.durable import fsync_directory
from pipelines.errors import StoreError
from pipelines.segments import (
    Segment,
    compacted_name,
    hide_replaced,
    is_compacted,
    read_segments,
    with_segments,
)
from pipelines.store import TIME_COLUMN, EventStore, write_parquet_atomic
from pipelines.timestamps import parse_duration

_RULE = re.compile(r"^(?P<table>[A-Za-z0-9_][A-Za-z0-9_.-]*)(/(?P<type>[a-z0-9_][a-z0-9_.-]*))?$")


@dataclass(frozen=True)
class Retention:
    """``max_age`` per table or per (table, event type).

    Example:
        >>> rules = Retention.parse(["events=30d", "events/fraud.reported=7d"])
        >>> rules.max_age("events", "fraud.reported"), rules.max_age("scores", "x")
        (datetime.timedelta(days=7), None)
    """

    rules: Mapping[str, dt.timedelta] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: list[str] | Mapping[str, object]) -> Retention:
        """Rules from ``RULE=AGE`` strings (a flag) or a mapping (a config section).

        Raises:
            StoreError: a rule that names no table, or an age that is not a duration.
        """
        pairs = items.items() if isinstance(items, Mapping) else (
            item.partition("=")[::2] for item in items)
        rules = {}
        for rule, age in pairs:
            if not _RULE.match(str(rule)):
                raise StoreError(f"retention rule {rule!r}: give TABLE or TABLE/EVENT_TYPE")
            try:
                rules[str(rule)] = parse_duration(age, f"max_age of {rule}")  # type: ignore[arg-type]
            except ValueError as exc:
                raise StoreError(str(exc)) from None
        return cls(rules)

    def max_age(self, table: str, event_type: str) -> dt.timedelta | None:
        return self.rules.get(f"{table}/{event_type}", self.rules.get(table))


@dataclass
class CompactionReport:
    """What a compaction did, for the command's JSON line."""

    folders: int = 0
    merged_folders: int = 0
    files_before: int = 0
    files_after: int = 0
    rows_expired: int = 0
    folders_expired: int = 0

    def summary(self) -> dict[str, object]:
        return {**self.__dict__, "files_per_folder": round(self.files_after / self.folders, 3)
                if self.folders else None}


def compact_store(store: EventStore, now: dt.datetime, retention: Retention | None = None,
                  tables: list[str] | None = None) -> CompactionReport:
    """Compact every folder of the store's tables (default: every table) and apply
    ``retention`` relative to ``now``.

    Example:
        >>> compact_store(EventStore("store"), dt.datetime.now(dt.UTC)).summary()  # doctest: +SKIP
    """
    retention = retention or Retention()
    report = CompactionReport()
    log = CommitLog(store.root)
    committed = log.committed_times()
    names = tables or sorted(p.name for p in store.root.iterdir()
                             if p.is_dir() and not p.name.startswith((".", "_")))
    for table in names:
        for folder in sorted(store.table_dir(table).glob("event_type=*/date=*")):
            event_type = folder.parent.name.removeprefix("event_type=")
            age = retention.max_age(table, event_type)
            cutoff = now - age if age is not None else None
            _compact_folder(store, log, committed, table, folder, cutoff, now, report)
    return report


def _commit_time(store: EventStore, committed: Mapping, path: Path) -> dt.datetime:
    """A plain file's commit time: its record's, else (no record) its modification time."""
    stat = file_stat(path)
    recorded = committed.get(relative_posix(store.root, path))
    if recorded is not None and recorded[1] == stat:
        return recorded[0]
    return modified_at(stat)


def _pieces(store: EventStore, committed: Mapping, files: list[Path]) -> list[tuple[Segment, pa.Table]]:
    """Every batch the folder's files hold, with its rows, ordered by original file name."""
    pieces = []
    for path in files:
        rows = pq.read_table(path, partitioning=None)
        rows = rows.replace_schema_metadata(None)
        if not is_compacted(path):
            pieces.append((Segment(path.name, rows.num_rows, _commit_time(store, committed, path)), rows))
            continue
        start = 0
        for segment in read_segments(path)[0]:
            pieces.append((segment, rows.slice(start, segment.rows)))
            start += segment.rows
    return sorted(pieces, key=lambda piece: piece[0].file)


def _expire(pieces: list[tuple[Segment, pa.Table]], time_column: str,
            cutoff: dt.datetime) -> tuple[list[tuple[Segment, pa.Table]], int]:
    """The pieces less their rows older than ``cutoff``; also how many rows went."""
    kept, dropped = [], 0
    for segment, rows in pieces:
        frame = pl.from_arrow(rows)
        assert isinstance(frame, pl.DataFrame)
        young = frame.filter(pl.col(time_column) >= cutoff)
        dropped += frame.height - young.height
        if young.height:
            kept.append((Segment(segment.file, young.height, segment.committed_at),
                         young.to_arrow().cast(rows.schema)))
    return kept, dropped


def _compact_folder(store: EventStore, log: CommitLog, committed: Mapping, table: str,
                    folder: Path, cutoff: dt.datetime | None, now: dt.datetime,
                    report: CompactionReport) -> None:
    listed = sorted(folder.glob("*.parquet"))
    files = hide_replaced(listed)
    report.folders += 1
    report.files_before += len(listed)
    day = dt.date.fromisoformat(folder.name.removeprefix("date="))
    whole_day_expired = cutoff is not None and day < cutoff.date()
    needs_rows = cutoff is not None and day <= cutoff.date() and not whole_day_expired
    if len(files) <= 1 and len(listed) == len(files) and not (whole_day_expired or needs_rows):
        report.files_after += len(files)
        return
    pieces = [] if whole_day_expired else _pieces(store, committed, files)
    if whole_day_expired:
        report.rows_expired += sum(pq.read_metadata(p).num_rows for p in files)
    elif needs_rows:
        assert cutoff is not None
        pieces, dropped = _expire(pieces, TIME_COLUMN.get(table, "timestamp"), cutoff)
        report.rows_expired += dropped
    replaced = [p.name for p in listed]
    merged = None
    if pieces:
        rows = pa.concat_tables([piece[1] for piece in pieces], promote_options="default")
        merged = folder / compacted_name(replaced)
        write_parquet_atomic(with_segments(rows, [p[0] for p in pieces], replaced), merged)
    new_files = {relative_posix(store.root, merged): file_stat(merged)} if merged else {}
    log.record("compaction", new_files, now, kind="compaction",
               replaces=[relative_posix(store.root, p) for p in listed if p != merged])
    _remove(listed, keep=merged)
    report.merged_folders += 1
    report.files_after += 1 if merged else 0
    report.folders_expired += 0 if merged else 1


def _remove(paths: list[Path], keep: Path | None) -> None:
    """Remove the replaced files (never the one that replaces them), then the folder's
    entry changes durably; an emptied folder goes too."""
    for path in paths:
        if path != keep:
            path.unlink(missing_ok=True)
    folder = paths[0].parent
    if keep is None and not any(folder.iterdir()):
        folder.rmdir()
        fsync_directory(folder.parent)
    elif folder.is_dir():
        fsync_directory(folder)
