"""What a compacted data file holds: the batches (segments) it merged, in order.

A compacted file ``compact-<digest>.parquet`` replaces the files of one
``<table>/event_type=<type>/date=<day>/`` folder. Its Parquet key-value metadata says

- ``eventray.segments``: the original files it holds, in row order, each with its row count
  and commit time (``[{"file": "part-<run>-<writer>-<seq>.parquet", "rows": 120,
  "committed_at": "2026-...+00:00"}, ...]``). The (run, writer, seq) of each batch lives on,
  so a rerun or a resume still supersedes exactly the batches it rewrites, and a
  time-travel view still shows only the batches committed by its time;
- ``eventray.replaces``: the files of the folder it replaced when it was written (plain or
  compacted). A listing that finds it beside any of them ignores those: a reader that
  lists the folder while the compaction removes the originals sees every row once.

Plain files stand for one segment: themselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPACT_PREFIX = "compact-"
SEGMENTS_KEY = b"eventray.segments"
REPLACES_KEY = b"eventray.replaces"

_CACHE: dict[tuple[Path, int], tuple[tuple[Segment, ...], tuple[str, ...]]] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Segment:
    """One original batch file inside a compacted file."""

    file: str
    rows: int
    committed_at: dt.datetime

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "rows": self.rows, "committed_at": self.committed_at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict) -> Segment:
        return cls(str(data["file"]), int(data["rows"]), dt.datetime.fromisoformat(data["committed_at"]))


def is_compacted(path: Path) -> bool:
    return path.name.startswith(COMPACT_PREFIX)


def compacted_name(replaced: Sequence[str]) -> str:
    """The name of the file that replaces ``replaced``: a digest of their names, so a
    compaction run twice over the same files makes the same name."""
    digest = hashlib.sha256("\n".join(sorted(replaced)).encode()).hexdigest()[:20]
    return f"{COMPACT_PREFIX}{digest}.parquet"


def with_segments(rows: pa.Table, segments: Sequence[Segment], replaces: Sequence[str]) -> pa.Table:
    """``rows`` carrying the segment list and the replaced names as schema metadata."""
    metadata = dict(rows.schema.metadata or {})
    metadata[SEGMENTS_KEY] = json.dumps([s.to_dict() for s in segments]).encode()
    metadata[REPLACES_KEY] = json.dumps(sorted(replaces)).encode()
    return rows.replace_schema_metadata(metadata)


def read_segments(path: Path) -> tuple[tuple[Segment, ...], tuple[str, ...]]:
    """A compacted file's segments and the names it replaced (footer only, cached by
    modification time: a compacted file is never changed in place)."""
    key = (path, path.stat().st_mtime_ns)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    metadata = pq.read_schema(path).metadata or {}
    segments = tuple(Segment.from_dict(s) for s in json.loads(metadata.get(SEGMENTS_KEY, b"[]")))
    replaces = tuple(json.loads(metadata.get(REPLACES_KEY, b"[]")))
    with _CACHE_LOCK:
        _CACHE[key] = (segments, replaces)
    return segments, replaces


def hide_replaced(files: list[Path]) -> list[Path]:
    """``files`` less those a compacted file beside them replaces (sorted input, sorted
    output). Folders with one file, or no compacted file, cost no read."""
    by_folder: dict[Path, list[Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    kept: list[Path] = []
    for folder_files in by_folder.values():
        compacted = [p for p in folder_files if is_compacted(p)]
        if len(folder_files) == 1 or not compacted:
            kept += folder_files
            continue
        hidden: set[str] = set()
        for path in compacted:
            try:
                hidden.update(read_segments(path)[1])
            except FileNotFoundError:  # replaced itself meanwhile
                hidden.add(path.name)
        kept += [p for p in folder_files if p.name not in hidden]
    return sorted(kept)
