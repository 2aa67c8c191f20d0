"""Group commit of a partition's store writes: fewer, larger files, off the decision path.

A partition used to write every batch's rows as their own files (with an fsync each)
before it answered: on a live source that is most of a decision's time, and a replay
wrote ~4,200 files for the handbook's five months. :class:`GroupCommitSink` holds the
writes instead and commits them together, one file per (table, writer, event type, date),
when ``max_rows`` are held, when the oldest is ``interval_s`` old (checked as batches
arrive, and with ``on_time`` by a timer too, so that a pause in the traffic does not hold
the last writes until the next batch or checkpoint), and always before a checkpoint. A
commit that falls due runs in a thread (:meth:`GroupCommitSink.flush_in_background`:
Parquet encoding and fsync release the GIL), so the partition goes on deciding meanwhile.

Exactly once is kept by the names: a group is written under the sequence number of its
first batch (``part-<writer>-<first seq>``). Every group starts after the last flush, and a
checkpoint flushes, so a group never straddles a checkpoint: a partition restored from
checkpoint ``c`` removes its own files from ``c`` on (:meth:`EventStore.truncate_writers`)
and its replay writes them again, whatever their grouping was.

Example:
    >>> from pipelines.testing import ListSink
    >>> sink = ListSink()
    >>> grouped = GroupCommitSink(sink, max_rows=10, interval_s=60)
    >>> for seq in range(3):
    ...     _ = grouped.write("events", pa.table({"n": [seq]}), writer="p0", seq=seq)
    >>> grouped.flush()
    1
    >>> [(key, rows.num_rows) for key, rows in sink.batches["events"].items()]
    [(('p0', 0), 3)]
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

import pyarrow as pa

#: How soon a timer that found the last commit still running looks again (seconds).
RECHECK_S = 0.05


class Sink(Protocol):
    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> object: ...


class GroupCommitSink:
    """Holds writes and commits them per (table, writer) under the first batch's number.

    Args:
        sink: where the groups go (the event store).
        max_rows: commit once this many rows are held.
        interval_s: commit once the oldest held write is this old.
        clock: monotonic seconds (injected in tests).
        on_time: also commit from a timer once the oldest held write is ``interval_s`` old
            (a live run: its store lags its input by about ``interval_s`` whether or not
            another batch comes).
    """

    def __init__(self, sink: Sink, max_rows: int, interval_s: float,
                 clock: Callable[[], float] = time.monotonic, on_time: bool = False) -> None:
        self.sink, self.max_rows, self.interval_s, self.clock = sink, max_rows, interval_s, clock
        self.on_time = on_time and math.isfinite(interval_s)
        self.held: dict[tuple[str, str], list[tuple[int, pa.Table]]] = {}
        self.rows = 0
        self.since: float | None = None
        self.files_written = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # the timer's thread and the caller's take turns at what is held and at starting a
        # commit; a timer armed for writes that have been taken since does nothing
        self._lock = threading.Lock()
        self._taken = 0

    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> None:
        if rows.num_rows == 0:
            return
        with self._lock:
            self.held.setdefault((table, writer), []).append((seq, rows))
            self.rows += rows.num_rows
            if self.since is None:
                self.since = self.clock()
                if self.on_time:
                    self._arm(self.interval_s)

    def due(self) -> bool:
        """Whether the held writes should be committed now: never while the last commit
        still runs in the background (a slow disk's fsyncs), which the caller would wait
        for: the writes are held a little longer instead, and the partition goes on
        deciding."""
        if self._thread is not None and self._thread.is_alive():
            return False
        return self.rows >= self.max_rows or (
            self.since is not None and self.clock() - self.since >= self.interval_s)

    def flush(self) -> int:
        """Commit everything held (after any commit in the background); returns the number
        of groups written now.

        Raises:
            Exception: what a commit in the background raised (the store failed).
        """
        with self._lock:
            self._wait()
            return self._commit(self._take())

    def flush_in_background(self) -> None:
        """Start committing what is held in a thread (the caller goes on deciding), after
        the previous one has finished: what a group holds never depends on how long a
        commit took. Nothing to do if the timer has just taken what was held."""
        with self._lock:
            if not self.held:
                return
            self._wait()
            self._start_commit()

    def _start_commit(self) -> None:
        self._thread = threading.Thread(target=self._commit_noting_error, args=(self._take(),),
                                        name="group-commit", daemon=True)
        self._thread.start()

    def _arm(self, delay: float) -> None:
        timer = threading.Timer(delay, self._on_time, args=(self._taken,))
        timer.daemon = True
        timer.start()

    def _on_time(self, taken: int) -> None:
        """The timer: commit in the background if the writes it was armed for are still
        held and due; while the last commit still runs, look again shortly."""
        with self._lock:
            if taken != self._taken or self.since is None:
                return  # committed meanwhile: the next write arms a timer of its own
            left = self.since + self.interval_s - self.clock()
            if left > 0 or (self._thread is not None and self._thread.is_alive()):
                self._arm(max(left, RECHECK_S))
                return
            if self._thread is not None:  # finished: its error waits for the caller's wait
                self._thread.join()
            self._start_commit()

    def wait(self) -> None:
        """Wait for a commit in the background; re-raise its error."""
        with self._lock:
            self._wait()

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _take(self) -> dict[tuple[str, str], list[tuple[int, pa.Table]]]:
        held, self.held, self.rows, self.since = self.held, {}, 0, None
        self._taken += 1
        return held

    def _commit(self, held: dict[tuple[str, str], list[tuple[int, pa.Table]]]) -> int:
        for (table, writer), pieces in held.items():
            written = self.sink.write(table, _concat(pieces), writer=writer, seq=pieces[0][0])
            self.files_written += len(written) if isinstance(written, list) else 1
        return len(held)

    def _commit_noting_error(self, held: dict[tuple[str, str], list[tuple[int, pa.Table]]]) -> None:
        try:
            self._commit(held)
        except BaseException as exc:  # handed to the next wait(): the store failed
            self._error = exc


class ImmediateSink:
    """:class:`GroupCommitSink`'s interface without the holding: each write goes to the sink
    at once, and nothing is ever due (a bounded run's driver writes its dead letters as they
    come, as its input's batches decide).

    Example:
        >>> from pipelines.testing import ListSink
        >>> sink = ListSink()
        >>> immediate = ImmediateSink(sink)
        >>> immediate.write("events", pa.table({"n": [1]}), writer="p0", seq=4)
        >>> list(sink.batches["events"]), immediate.due(), immediate.flush()
        ([('p0', 4)], False, 0)
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> None:
        if rows.num_rows:
            self.sink.write(table, rows, writer=writer, seq=seq)

    def due(self) -> bool:
        return False

    def flush_in_background(self) -> None:
        """Nothing is held: nothing to commit."""

    def flush(self) -> int:
        return 0


def _concat(pieces: list[tuple[int, pa.Table]]) -> pa.Table:
    tables = [table for _, table in pieces]
    first = tables[0].schema
    if all(table.schema.equals(first) for table in tables):  # the usual case, and 15x faster
        return pa.concat_tables(tables)
    return pa.concat_tables(tables, promote_options="permissive")
