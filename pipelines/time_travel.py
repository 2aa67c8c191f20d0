"""A read-only view of an event store as it stood at a commit time.

:meth:`pipelines.store.EventStore.as_of` builds one. A batch file is visible when its
latest commit record (:mod:`pipelines.commit_log`) is at or before the view's time and the
file on disk is still the one recorded (same size and modification time); a file no record
names counts as committed at its modification time. A compacted file is read segment by
segment: the rows of the batches committed by then, and only those.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import polars as pl

from pipelines.commit_log import CommitLog, Stat, file_stat, modified_at, relative_posix
from pipelines.errors import StoreError
from pipelines.segments import Segment, is_compacted, read_segments
from pipelines.store import EventStore

_ROW = "__eventray_row"


class StoreView(EventStore):
    """The store at ``moment``: scans see exactly what was committed by then; writes raise.

    Example:
        >>> view = store.as_of(run="r0123456789")  # doctest: +SKIP
        >>> view.scan("events").collect()  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, moment: dt.datetime) -> None:
        super().__init__(root)
        self.moment = moment
        self._committed: dict[str, tuple[dt.datetime, Stat]] | None = None

    @classmethod
    def of(cls, store: EventStore, moment: dt.datetime | None, run: str | None) -> StoreView:
        """The view of ``store`` at ``moment`` or at ``run``'s last commit."""
        if (moment is None) == (run is None):
            raise StoreError("as_of: give a commit time or a run, not both or neither")
        if run is not None:
            moment = CommitLog(store.root).last_commit(run)
        assert moment is not None
        if moment.tzinfo is None:
            raise StoreError("as_of: the time must be timezone-aware (UTC)")
        return cls(store.root, moment.astimezone(dt.UTC))

    def _times(self) -> dict[str, tuple[dt.datetime, Stat]]:
        if self._committed is None:
            self._committed = CommitLog(self.root).committed_times()
        return self._committed

    def committed_at(self, path: Path) -> dt.datetime | None:
        """When a plain data file was committed (``None``: a rewrite not committed yet)."""
        try:
            stat = file_stat(path)
        except FileNotFoundError:
            return None
        recorded = self._times().get(relative_posix(self.root, path))
        if recorded is None:  # no record: a store older than the commit log
            return modified_at(stat)
        return recorded[0] if recorded[1] == stat else None

    def visible_segments(self, path: Path) -> list[tuple[int, Segment]]:
        """A compacted file's segments committed by the view's time, with their first row."""
        visible, start = [], 0
        for segment in read_segments(path)[0]:
            if segment.committed_at <= self.moment:
                visible.append((start, segment))
            start += segment.rows
        return visible

    def files(self, table: str, event_types: Sequence[str] | None = None) -> list[Path]:
        """The files holding rows committed by the view's time (a compacted file may hold
        later ones too: read the table through :meth:`scan`)."""
        kept = []
        for path in super().files(table, event_types):
            if is_compacted(path):
                if self.visible_segments(path):
                    kept.append(path)
            elif (when := self.committed_at(path)) is not None and when <= self.moment:
                kept.append(path)
        return kept

    def _lazy(self, table: str, event_types: Sequence[str] | None) -> pl.LazyFrame | None:
        whole: list[Path] = []
        partial: list[pl.LazyFrame] = []
        for path in self.files(table, event_types):
            segments = self.visible_segments(path) if is_compacted(path) else None
            if segments is None or len(segments) == len(read_segments(path)[0]):
                whole.append(path)
                continue
            in_view = pl.lit(False)
            for start, segment in segments:
                in_view = in_view | pl.col(_ROW).is_between(start, start + segment.rows - 1)
            partial.append(pl.scan_parquet(path, hive_partitioning=True)
                           .with_row_index(_ROW).filter(in_view).drop(_ROW))
        frames = ([pl.scan_parquet(whole, hive_partitioning=True)] if whole else []) + partial
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")

    def _read_only(self, *_: Any, **__: Any) -> NoReturn:
        raise StoreError(f"a view of {self.root} as of {self.moment.isoformat()} is read-only")

    write = _read_only
    truncate = _read_only
    sync = _read_only
