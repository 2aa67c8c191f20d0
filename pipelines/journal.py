"""The ingest journal: what an HTTP endpoint accepted, on disk before it is acknowledged.

An HTTP client is told 2xx only once its events are durable. The ingress appends each
accepted record as one JSON line to the journal (:class:`JournalWriter`), fsyncs, and only
then answers; the run reads the journal as a live source (:class:`JournalSource`, see
:mod:`pipelines.live`) exactly once: its read position is part of every checkpoint, and
segments wholly before a committed position are removed.

Layout: one folder per part (``events`` for ``POST /events``, ``score`` for
``POST /score``), each a sequence of segments ``seg-<first offset>.ndjson``; a record's
offset is its line number within its part, counted across segments. The writer only ever
appends to the last segment and starts a new one past ``segment_bytes``; the reader only
removes segments it has read past and a later one exists, so the two never touch the
same file in conflicting ways. A torn last line (a crash mid-write, never acknowledged) is
cut off when a writer opens the journal.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> writer = JournalWriter(folder, "events")
    >>> writer.append([b'{"n": 1}', b'{"n": 2}'])
    0
    >>> source = JournalSource("http", folder, parts=("events",))
    >>> source.open(None)
    >>> [b.records.column("line").to_pylist() for b in source.poll(100, 0.0)]
    [[b'{"n": 1}', b'{"n": 2}']]
    >>> source.positions()
    {'events': 2}
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipelines.sources import RawBatch, SourceError

#: The parts of an HTTP source's journal: bulk ingestion, and the synchronous decisions.
EVENTS_PART = "events"
SCORE_PART = "score"
PARTS = (EVENTS_PART, SCORE_PART)
_SEGMENT = re.compile(r"^seg-(\d{15})\.ndjson$")
#: The most a reader takes from a segment per poll (a line is at most a request body).
READ_BYTES = 8 << 20
#: How often an idle reader looks for new records while it waits in :meth:`JournalSource.poll`,
#: where the kernel cannot wake it when they come (no inotify).
IDLE_WAIT_S = 0.0005


class HttpSourceOptions(BaseModel):
    """The ``http`` source kind's own fields (``source.path`` is the journal's folder,
    relative to the store).

    ``max_body_bytes``: a larger request body gets 413. ``max_pending_events``: events
    accepted but not yet read by the run; beyond it requests get 429 with Retry-After.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token_env: str = Field(default="EVENTRAY_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    max_pending_events: int = Field(default=200_000, gt=0)
    score_timeout_s: float = Field(default=10.0, gt=0)
    #: How long a ``/score`` group commit waits for more requests to share its fsync. The
    #: answer waits for the decision too, which takes longer, so this costs no latency
    #: while the run decides in more than this; it saves the disk's and the kernel's work
    #: of one fsync per request under load.
    score_sync_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    segment_bytes: int = Field(default=64 << 20, gt=0)


def segment_name(first: int) -> str:
    return f"seg-{first:015d}.ndjson"


def _segments(folder: Path) -> list[tuple[int, Path]]:
    """(first offset, path) of a part's segments, in order."""
    found = []
    for path in folder.glob("seg-*.ndjson"):
        match = _SEGMENT.match(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline: it was never acknowledged."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(max(0, size - (1 << 20)))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        handle.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
        handle.flush()
        os.fsync(handle.fileno())


class JournalWriter:
    """Appends records to one part of the journal, durably (one fsync per append).

    :meth:`append` writes and fsyncs. :meth:`write` and :meth:`sync` are its two halves, for
    a caller that lets the run read records while their fsync runs (the ingress's ``score``
    part: a decision need not wait for the disk, its answer does). One thread writes;
    :meth:`sync` may run in another meanwhile (a lock keeps it off a segment being closed).
    """

    def __init__(self, folder: str | Path, part: str, segment_bytes: int = 64 << 20) -> None:
        self.folder = Path(folder) / part
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        segments = _segments(self.folder)
        if segments:
            first, path = segments[-1]
            _cut_torn_tail(path)
            self.next_offset = first + _count_lines(path)
            self._path = path
        else:
            self.next_offset = 0
            self._path = self.folder / segment_name(0)
        self._handle = open(self._path, "ab")  # noqa: SIM115 (held open between appends)
        self._sync_folder()
        self._lock = threading.Lock()

    def append(self, lines: Sequence[bytes]) -> int:
        """Append ``lines`` (each one JSON text without a newline) and fsync; returns the
        offset of the first."""
        first = self.write(lines)
        if lines:
            self.sync()
        return first

    def write(self, lines: Sequence[bytes]) -> int:
        """Append ``lines`` to the file, readable at once but not yet durable (see
        :meth:`sync`); returns the offset of the first."""
        first = self.next_offset
        if not lines:
            return first
        if self._handle.tell() >= self.segment_bytes:
            self._roll()
        self._handle.write(b"\n".join(lines) + b"\n")
        self._handle.flush()
        self.next_offset += len(lines)
        return first

    def sync(self) -> None:
        """Make everything written so far durable (earlier segments were, when rolled)."""
        with self._lock:
            os.fsync(self._handle.fileno())

    def _roll(self) -> None:
        with self._lock:  # a sync in flight finishes on the old segment first
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._path = self.folder / segment_name(self.next_offset)
            self._handle = open(self._path, "ab")  # noqa: SIM115
            self._sync_folder()

    def _sync_folder(self) -> None:
        descriptor = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        self._handle.close()


class _PartReader:
    """Reads one part's complete lines from its position on, across segments."""

    def __init__(self, folder: Path, part: str, start: int) -> None:
        self.folder, self.part, self.next_offset = folder / part, part, start
        self._handle: Any = None
        self._tail = b""
        self._segment_first = -1
        self._drained = False  # the last read found nothing more in the segment

    def _open_segment(self) -> bool:
        """Open the segment holding ``next_offset`` (skipping the lines before it)."""
        holding = [(f, p) for f, p in _segments(self.folder) if f <= self.next_offset]
        if not holding:
            return False
        first, path = holding[-1]
        self._handle = open(path, "rb")  # noqa: SIM115 (read as the writer appends)
        self._segment_first, self._tail = first, b""
        for _ in range(self.next_offset - first):
            if not self._handle.readline().endswith(b"\n"):
                raise SourceError(f"journal {self.folder}: offset {self.next_offset} is past "
                                  f"the end of {path.name}")
        return True

    def read(self, max_rows: int) -> list[bytes]:
        """Up to ``max_rows`` complete lines (without their newlines)."""
        if self._handle is None and not self._open_segment():
            return []
        # a later segment seen before the read: the writer had finished this one by then
        finished = self._next_segment_exists()
        lines = self._complete_lines(max_rows)
        if not lines and self._drained and finished:
            self._handle.close()  # the writer has moved on: this segment is complete
            self._handle = None
            return self.read(max_rows)
        self.next_offset += len(lines)
        return lines

    def _complete_lines(self, max_rows: int) -> list[bytes]:
        # a bounded read: a backlog is taken a piece at a time, never all in memory
        fresh = self._handle.read(READ_BYTES)
        self._drained = not fresh and not self._tail
        chunk = self._tail + fresh
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._tail = chunk
            return []
        lines = chunk[:cut].split(b"\n")
        rest = chunk[cut + 1:]
        if len(lines) > max_rows:
            rest = b"\n".join(lines[max_rows:]) + b"\n" + rest
            lines = lines[:max_rows]
        self._tail = rest
        return lines

    def _next_segment_exists(self) -> bool:
        """Whether the writer has moved on from the segment read to its end: its next one
        is named by the offset after this one's last line, which is where the reader stands
        then (one stat, not a listing of the folder on every poll of an idle run). A writer
        rolls a segment only once it holds something, so the next one starts after it."""
        return self.next_offset > self._segment_first and \
            (self.folder / segment_name(self.next_offset)).exists()

    def sync(self) -> None:
        """Make what was read durable (a checkpoint is about to cover it)."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def remove_before(self, offset: int) -> int:
        """Remove the segments wholly before ``offset`` (never the one being read)."""
        segments = _segments(self.folder)
        removed = 0
        for (first, path), (following, _) in zip(segments, segments[1:], strict=False):
            if following <= offset and first != self._segment_first:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class JournalSource:
    """The journal as a :class:`~pipelines.live.LiveSource`: each part's lines as JSON
    Lines records (one binary column ``line``), offsets by line number.

    Args:
        name: the source's name (event ids derived from it, the ``source`` field).
        folder: the journal's folder.
        parts: the parts to read.
    """

    def __init__(self, name: str, folder: str | Path, parts: Sequence[str] = PARTS) -> None:
        self.name, self.folder, self.parts = name, Path(folder), tuple(parts)
        self._readers: dict[str, _PartReader] = {}
        self._changes: _Changes | None = None

    def open(self, resume: dict[str, Any] | None) -> None:
        resume = resume or {}
        for part in self.parts:
            (self.folder / part).mkdir(parents=True, exist_ok=True)
            self._readers[part] = _PartReader(self.folder, part, int(resume.get(part, 0)))
        self._changes = _Changes.watch([self.folder / part for part in self.parts])

    def poll(self, max_rows: int, timeout: float) -> list[RawBatch]:
        """What the writers have appended since, waiting up to ``timeout`` for something:
        asleep until the kernel reports a write to the journal (inotify), or, where it
        cannot, looking again every ``IDLE_WAIT_S``."""
        deadline = time.monotonic() + timeout
        while True:
            batches = []
            for part, reader in self._readers.items():
                start = reader.next_offset
                lines = reader.read(max_rows)
                if lines:
                    offsets = np.arange(start, start + len(lines), dtype=np.int64)
                    records = pa.record_batch([pa.array(lines, pa.binary())], names=["line"])
                    batches.append(RawBatch(self.name, part, offsets, records))
            left = deadline - time.monotonic()
            if batches or left <= 0:
                return batches
            if self._changes is not None:
                self._changes.wait(left)  # a write after the read above wakes it at once
            else:
                time.sleep(IDLE_WAIT_S)

    def read_offsets(self) -> dict[str, int]:
        """Each part's next offset to read (what :meth:`positions` says, without its fsync)."""
        return {part: reader.next_offset for part, reader in self._readers.items()}

    def positions(self) -> dict[str, Any]:
        for reader in self._readers.values():
            reader.sync()
        return {part: reader.next_offset for part, reader in self._readers.items()}

    def committed(self, positions: dict[str, Any]) -> None:
        for part, offset in positions.items():
            if part in self._readers:
                self._readers[part].remove_before(int(offset))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        if self._changes is not None:
            self._changes.close()
            self._changes = None


class _Changes:
    """The kernel's word that a journal folder changed (Linux inotify): a write to a
    segment, a new segment. The watch is set before the first read, so a write that lands
    between a read and the wait after it is already queued and the wait returns at once."""

    def __init__(self, notify: Any) -> None:
        self._notify = notify

    @classmethod
    def watch(cls, folders: Sequence[Path]) -> _Changes | None:
        """Watches on ``folders``, or ``None`` where inotify is not available (another OS,
        or the user's watch limit reached): the reader then looks every ``IDLE_WAIT_S``."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:
            return None
        mask = flags.MODIFY | flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE
        notify = None
        try:
            notify = INotify()
            for folder in folders:
                notify.add_watch(str(folder), mask)
        except OSError:
            if notify is not None:
                notify.close()
            return None
        return cls(notify)

    def wait(self, timeout: float) -> None:
        """Until something changed (or ``timeout`` seconds); what it was does not matter."""
        self._notify.read(timeout=max(1, int(timeout * 1000)))

    def close(self) -> None:
        self._notify.close()
