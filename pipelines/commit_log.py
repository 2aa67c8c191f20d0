"""The store's commit log: which data files each commit made visible, and when.

Every checkpoint commit of a run appends one record, and so does every compaction and
every rewrite of a compacted file. A record is a small JSON file, written atomically and
durably, under ``STORE/_commits/``::

    <committed_at>-<run>-<kind>-<epoch>-<digest>.json
        {"committed_at", "run", "kind", "epoch",
         "files": {path: [size, mtime_ns]}, "replaces": [path]}

Paths are relative to the store root. One file per record (never an appended file) means a
crash leaves whole records or none, and concurrent writers (two runs, a compaction) never
contend for one file. ``committed_at`` comes from the committer's injected clock.

What a record says about a file is checked against the file on disk (its size and mtime):
a file rewritten since its last record (a rerun that crashed before its first checkpoint)
is not committed, and a time-travel view does not show it.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> log = CommitLog(root)
    >>> _ = log.record("r1", {}, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), epoch=1)
    >>> [r.run for r in log.records()]
    ['r1']
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.durable import write_durably
from pipelines.errors import StoreError

COMMIT_DIR = "_commits"
#: The record kinds: a run's checkpoint, a compaction, a rewrite of compacted files that
#: dropped a run's rows (a rerun or resume truncating its old output).
KINDS = ("checkpoint", "compaction", "truncate")

Stat = tuple[int, int]


def file_stat(path: Path) -> Stat:
    """What a record remembers of a file: its size and modification time (ns)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def modified_at(stat: Stat) -> dt.datetime:
    """The modification time of a :func:`file_stat`, to the microsecond (floored)."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=stat[1] // 1000)


@dataclass(frozen=True)
class CommitRecord:
    """One commit: when, by whom, the files it made visible and the files it replaced."""

    committed_at: dt.datetime
    run: str
    kind: str
    epoch: int
    files: dict[str, Stat] = field(default_factory=dict)
    replaces: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"committed_at": self.committed_at.isoformat(), "run": self.run,
                           "kind": self.kind, "epoch": self.epoch,
                           "files": {p: list(s) for p, s in sorted(self.files.items())},
                           "replaces": list(self.replaces)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CommitRecord:
        data = json.loads(text)
        return cls(dt.datetime.fromisoformat(data["committed_at"]), data["run"], data["kind"],
                   int(data["epoch"]), {p: (int(s[0]), int(s[1])) for p, s in data["files"].items()},
                   tuple(data.get("replaces", ())))


class CommitLog:
    """The commit records of one store."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.directory = self.root / COMMIT_DIR

    def record(self, run: str, files: Mapping[str, Stat], committed_at: dt.datetime,
               epoch: int = 0, kind: str = "checkpoint",
               replaces: Iterable[str] = ()) -> CommitRecord:
        """Append a record (durably) and return it.

        Raises:
            StoreError: a naive ``committed_at`` or an unknown ``kind``.
        """
        if committed_at.tzinfo is None:
            raise StoreError("commit times must be timezone-aware (UTC)")
        if kind not in KINDS:
            raise StoreError(f"commit kind {kind!r} is not one of {KINDS}")
        record = CommitRecord(committed_at.astimezone(dt.UTC), run, kind, epoch, dict(files),
                              tuple(replaces))
        stamp = record.committed_at.strftime("%Y%m%dT%H%M%S%fZ")
        text = record.to_json()
        # the digest keeps two records of one instant apart (a fixed clock, two folders)
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        write_durably(self.directory / f"{stamp}-{run}-{kind}-{epoch:012d}-{digest}.json",
                       text.encode())
        return record

    def records(self, run: str | None = None) -> list[CommitRecord]:
        """The records (of one run), oldest first (ties by name: run, then epoch)."""
        if not self.directory.is_dir():
            return []
        pattern = f"*-{run}-*.json" if run is not None else "*.json"
        found = []
        for path in sorted(self.directory.glob(pattern)):
            if path.name.startswith("."):
                continue
            try:
                record = CommitRecord.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"commit record {path} unreadable: {exc}") from exc
            if run is None or record.run == run:
                found.append(record)
        return sorted(found, key=lambda r: r.committed_at)  # stable: names break ties

    def committed_times(self) -> dict[str, tuple[dt.datetime, Stat]]:
        """Each recorded file's latest commit time and the size and mtime it had then."""
        latest: dict[str, tuple[dt.datetime, Stat]] = {}
        for record in self.records():
            for path, stat in record.files.items():
                latest[path] = (record.committed_at, stat)
        return latest

    def last_commit(self, run: str) -> dt.datetime:
        """When ``run`` last committed.

        Raises:
            StoreError: the run never committed in this store.
        """
        records = [r for r in self.records(run) if r.kind == "checkpoint"]
        if not records:
            raise StoreError(f"run {run!r} has no commit in {self.root}")
        return records[-1].committed_at


class RunCommitter:
    """Records a run's checkpoint commits: each names the run's data files that are new or
    rewritten since the run's previous record.

    The run's files are found by name (``part-<run>-*``) when the checkpoint commits, not
    as partitions write them: however files are written (one per batch, or grouped), the
    commit covers what is on disk and durable at that point.
    """

    def __init__(self, root: str | Path, run: str) -> None:
        self.log = CommitLog(root)
        self.run = run
        self._recorded: dict[str, Stat] | None = None

    def _known(self) -> dict[str, Stat]:
        if self._recorded is None:
            self._recorded = {}
            for record in self.log.records(self.run):
                self._recorded.update(record.files)
        return self._recorded

    def commit(self, epoch: int, committed_at: dt.datetime) -> CommitRecord:
        """Record what the checkpoint of ``epoch`` made visible."""
        known = self._known()
        changed = {}
        for path in self.log.root.glob(f"*/event_type=*/date=*/part-{self.run}-*.parquet"):
            relative = path.relative_to(self.log.root).as_posix()
            try:
                stat = file_stat(path)
            except FileNotFoundError:  # removed meanwhile (a compaction): not ours to record
                continue
            if known.get(relative) != stat:
                changed[relative] = stat
        record = self.log.record(self.run, changed, committed_at, epoch)
        known.update(changed)
        return record


def relative_posix(root: Path, path: Path) -> str:
    """``path`` relative to the store root, with ``/`` separators (the log's keys)."""
    return os.path.relpath(path, root).replace(os.sep, "/")
