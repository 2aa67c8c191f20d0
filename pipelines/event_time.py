"""Event time for one source: a robust watermark and a reorder buffer behind it.

Events arrive out of order (files given in any order, producers that retry, a network that
delays). Keyed operators must still see each key's events in event-time order, so every
source has a *watermark*: an event time ``W`` such that the source promises no more events
older than ``W``. Events older than ``W`` are released sorted; the others wait in a buffer.

The watermark rule (:class:`RobustWatermark`), with ``L = lateness``:

* The *window* is the set of events that arrived since the watermark last moved (or since
  the start). Let ``m`` be its size and ``k = max(min_support, ceil(outlier_share * m))``.
* The candidate ``C`` is the k-th largest event time in the window: the latest time that at
  least ``k`` of the recent events have reached.
* ``W = max(W, C - L)``; whenever ``W`` moves, the window starts afresh, and every buffered
  event older than ``W`` is released, sorted by (time, optional tiebreak, arrival).

Guarantee: the watermark never passes a time that fewer than ``min_support`` events, or
fewer than ``outlier_share`` of the events since its last move, have reached. One row dated
2025 in a 2018 replay (or a handful of them, scattered over the stream) never moves it: the
watermark is driven by the stream's bulk. And for a source whose out-of-orderness is bounded
by ``L`` (every event arriving after an event at ``t`` has a time ``>= t - L``), no event is
ever late, whatever the batch sizes, and the released sequence is exactly the input sorted
by (time, tiebreak, arrival): released events are all older than ``W``, and every later
arrival is at least ``W``.

An event is *late* when its time is strictly older than the watermark in force when it
arrives (``t < W``, i.e. older than the bulk's time minus ``lateness``). Before the first
watermark, an event more than ``lateness`` plus ten interquartile ranges below its
batch's first quartile is late as well (a far-past outlier at the head of a stream). Late events are
handed back apart, never reordered into the stream and never an exception; the driver
applies the source's late policy to them.

Idle sources: with ``idle_timeout`` set, a source that yields nothing for that long (by an
injected clock, never the wall clock) has its watermark advanced with the clock:
``W = W_last + (now - last_arrival - idle_timeout)`` (it starts to move once the timeout has
passed, one second of event time per second). With ``idle_timeout=None`` (the default) an
idle source holds its watermark. A bounded input ends with :meth:`EventTimeOrderer.flush`.

The orderer is vectorised: per push one filter, one sort of the released rows (numpy
``lexsort`` on ``(time, tiebreak, arrival)``) and one gather. The buffer only holds events
at or after the watermark. :meth:`EventTimeOrderer.snapshot` / :meth:`~EventTimeOrderer.restore`
carry buffer and watermark through checkpoints as Arrow IPC. This module never imports Ray.

Example:
    >>> import datetime as dt
    >>> orderer = EventTimeOrderer(WatermarkPolicy(lateness=dt.timedelta(minutes=20)))
    >>> out = orderer.push(batch)          # doctest: +SKIP
    >>> out.released, out.late             # doctest: +SKIP
    >>> rest = orderer.flush()             # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.tables import from_ipc, take_rows, to_ipc

__all__ = [
    "EventTimeOrderer",
    "Ordered",
    "RobustWatermark",
    "WatermarkPolicy",
]

Clock = Callable[[], dt.datetime]
_ARRIVAL = "__eventray_arrival"
_STATE_KEY = b"eventray.event_time"
_US = dt.timedelta(microseconds=1)
_MAX_CHUNKS = 32


def _micros(delta: dt.timedelta) -> int:
    return delta // _US


@dataclass(frozen=True)
class WatermarkPolicy:
    """How one source's watermark moves.

    Attributes:
        lateness: bounded out-of-orderness: how far behind the bulk an event may arrive
            and still be ordered into the stream.
        min_support: events that must have reached a time before the watermark follows.
        outlier_share: share of the window's events that must have reached it (0..1).
        idle_timeout: silence after which the watermark advances with the clock; None
            holds it while the source is idle.

    Example:
        >>> WatermarkPolicy(lateness=dt.timedelta(minutes=20)).min_support
        10
    """

    lateness: dt.timedelta = dt.timedelta(0)
    min_support: int = 10
    outlier_share: float = 0.01
    idle_timeout: dt.timedelta | None = None

    def __post_init__(self) -> None:
        if self.lateness < dt.timedelta(0):
            raise ValueError(f"lateness must be >= 0, got {self.lateness}")
        if self.min_support < 1:
            raise ValueError(f"min_support must be >= 1, got {self.min_support}")
        if not 0.0 <= self.outlier_share < 1.0:
            raise ValueError(f"outlier_share must be in [0, 1), got {self.outlier_share}")
        if self.idle_timeout is not None and self.idle_timeout < dt.timedelta(0):
            raise ValueError(f"idle_timeout must be >= 0, got {self.idle_timeout}")


class RobustWatermark:
    """The watermark rule of the module docstring, over int64 epoch microseconds.

    Only the window's times above the current bulk (``W + lateness``) are kept: lower ones
    can never make the watermark move, they only count towards ``m``.

    Args:
        policy: the source's watermark settings.

    Example:
        >>> mark = RobustWatermark(WatermarkPolicy(min_support=2))
        >>> mark.observe(np.array([10, 20, 30, 10**15]))
        30
    """

    def __init__(self, policy: WatermarkPolicy) -> None:
        self.policy = policy
        self.lateness_us = _micros(policy.lateness)
        self.value: int | None = None
        self._window = np.empty(0, dtype=np.int64)
        self._seen = 0

    def observe(self, times: np.ndarray) -> int | None:
        """Take in the (non-late) event times of one arrival; returns the watermark."""
        self._seen += len(times)
        if self.value is not None:
            times = times[times > self.value + self.lateness_us]
        if len(times):
            self._window = np.concatenate([self._window, times])
        k = max(self.policy.min_support, math.ceil(self.policy.outlier_share * self._seen))
        if len(self._window) >= k:
            candidate = int(np.partition(self._window, len(self._window) - k)[-k])
            self.advance_to(candidate - self.lateness_us)
        return self.value

    def advance_to(self, time_us: int) -> None:
        """Move the watermark to ``time_us`` if that is later; a move restarts the window."""
        if self.value is None or time_us > self.value:
            self.value = time_us
            self._window = np.empty(0, dtype=np.int64)
            self._seen = 0

    def state(self) -> dict[str, object]:
        """Plain data for a snapshot."""
        return {"value": self.value, "seen": self._seen,
                "window": base64.b64encode(self._window.astype("<i8").tobytes()).decode()}

    def load(self, state: dict[str, object]) -> None:
        """Replace the watermark's state with :meth:`state`'s output."""
        value = state["value"]
        self.value = None if value is None else int(value)  # type: ignore[call-overload]
        self._seen = int(state["seen"])  # type: ignore[call-overload]
        raw = base64.b64decode(str(state["window"]))
        self._window = np.frombuffer(raw, dtype="<i8").astype(np.int64)


@dataclass(frozen=True)
class Ordered:
    """What one push releases: ``released`` in event-time order, ``late`` in arrival order."""

    released: pa.Table
    late: pa.Table


class EventTimeOrderer:
    """Reorder buffer of one source: releases envelope rows sorted by (time, arrival).

    Batches are pyarrow Tables with at least a ``timestamp`` column (``timestamp[us, UTC]``);
    every batch must have the same schema. Released rows keep that schema. Across all
    pushes and the final :meth:`flush`, the released rows are exactly the non-late rows,
    stably sorted by event time (ties keep arrival order), so every key's events come out
    in event-time order and an in-order input comes out unchanged.

    Args:
        policy: lateness, outlier robustness and idleness of the source.
        clock: processing-time clock (``FakeClock.now`` in tests); needed only for
            ``policy.idle_timeout``.
        schema: the batches' schema, for the empty tables returned before the first push
            (without it they hold only ``timestamp``).
        tiebreak: column (``data.TRANSACTION_ID`` names a payload field) that orders events
            of equal time before arrival order does. Without it, equal times keep arrival
            order, so an input that arrives shuffled can order its ties differently from
            the same input in order; with it, ties are ordered the same whatever the
            arrival order.

    Example:
        >>> orderer = EventTimeOrderer(WatermarkPolicy(lateness=dt.timedelta(minutes=5)))
        >>> ordered = orderer.push(table)  # doctest: +SKIP
    """

    def __init__(self, policy: WatermarkPolicy, clock: Clock | None = None,
                 schema: pa.Schema | None = None, tiebreak: str | None = None) -> None:
        if policy.idle_timeout is not None and clock is None:
            raise ValueError("a clock is needed when policy.idle_timeout is set")
        self.policy, self.clock, self.tiebreak = policy, clock, tiebreak
        self.watermark = RobustWatermark(policy)
        self._buffer: pa.Table | None = None if schema is None else schema.empty_table()
        self._times = np.empty(0, dtype=np.int64)
        self._arrivals = np.empty(0, dtype=np.int64)
        self._next_arrival = 0
        self._last_arrival: dt.datetime | None = None
        self._idle_base: int | None = None

    @property
    def watermark_us(self) -> int | None:
        """The watermark in epoch microseconds (None until the source's bulk sets one)."""
        return self.watermark.value

    @property
    def buffered(self) -> int:
        """Rows waiting for the watermark."""
        return len(self._times)

    def push(self, batch: pa.Table) -> Ordered:
        """Buffer ``batch``, then release what the (possibly moved) watermark allows."""
        if self.clock is not None:
            self._last_arrival, self._idle_base = self.clock(), None
        times = _column_micros(batch)
        late = _late_mask(times, self.watermark.value, _micros(self.policy.lateness))
        if late.any():
            late_rows, batch = batch.filter(pa.array(late)), batch.filter(pa.array(~late))
            times = times[~late]
        else:
            late_rows = batch.slice(0, 0)
        self._append(batch, times)
        self.watermark.observe(times)
        return Ordered(self._release_due(), late_rows)

    def poll(self) -> Ordered:
        """Call when the source yielded nothing: advances an idle source's watermark."""
        timeout, empty = self.policy.idle_timeout, self._empty()
        if timeout is None or self._last_arrival is None or self.clock is None:
            return Ordered(empty, empty)
        silent = self.clock() - self._last_arrival - timeout
        if silent <= dt.timedelta(0):
            return Ordered(empty, empty)
        if self._idle_base is None:  # the watermark when idleness began
            self._idle_base = self._idle_start()
        self.watermark.advance_to(self._idle_base + _micros(silent))
        return Ordered(self._release_due(), empty)

    def flush(self) -> pa.Table:
        """The input has ended: every buffered row, sorted; the watermark moves past them."""
        if len(self._times):
            self.watermark.advance_to(int(self._times.max()) + 1)
        return self._release(np.ones(len(self._times), bool))

    def _idle_start(self) -> int:
        if self.watermark.value is not None:
            return self.watermark.value
        # no bulk yet: start just before the oldest buffered event
        return (int(self._times.min()) if len(self._times) else 0) - 1

    def _append(self, batch: pa.Table, times: np.ndarray) -> None:
        arrivals = np.arange(self._next_arrival, self._next_arrival + len(times), dtype=np.int64)
        self._next_arrival += len(times)
        if self._buffer is None:
            self._buffer = batch
        else:
            if batch.schema != self._buffer.schema:
                batch = batch.cast(self._buffer.schema)
            self._buffer = pa.concat_tables([self._buffer, batch])
        self._times = np.concatenate([self._times, times])
        self._arrivals = np.concatenate([self._arrivals, arrivals])

    def _release_due(self) -> pa.Table:
        """Remove and return the buffered rows older than the watermark, sorted."""
        if self.watermark.value is None:
            return self._empty()
        return self._release(self._times < self.watermark.value)

    def _release(self, due: np.ndarray) -> pa.Table:
        """Remove and return the buffered rows where ``due``, sorted by (time, arrival)."""
        if self._buffer is None:
            return self._empty()
        if not due.any():
            return self._buffer.slice(0, 0)
        due_idx = np.flatnonzero(due)
        order = due_idx[np.lexsort(self._sort_keys(due_idx))]
        n_due = len(order)
        if order[-1] == n_due - 1 and bool((np.diff(order) == 1).all()):
            # in order already (the usual case): slices, no gather, no copy
            released, rest = self._buffer.slice(0, n_due), self._buffer.slice(n_due)
        else:
            released = take_rows(self._buffer, order)
            rest = self._buffer.filter(pa.array(~due))
        if rest.column(0).num_chunks > _MAX_CHUNKS:  # keep the buffer's pieces few
            rest = rest.combine_chunks()
        self._buffer = rest
        self._times, self._arrivals = self._times[~due], self._arrivals[~due]
        return released

    def _sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """``np.lexsort`` keys (last is primary) of buffered ``rows``: time, tiebreak, arrival."""
        if self.tiebreak is None:
            return self._arrivals[rows], self._times[rows]
        assert self._buffer is not None
        column = _column_at(self._buffer, self.tiebreak).take(pa.array(rows, pa.int64()))
        ranks = pc.rank(column.combine_chunks(), sort_keys="ascending", tiebreaker="dense")
        return self._arrivals[rows], ranks.to_numpy(), self._times[rows]

    def _empty(self) -> pa.Table:
        if self._buffer is None:
            return pa.table({"timestamp": pa.array([], pa.timestamp("us", tz="UTC"))})
        return self._buffer.slice(0, 0)

    def snapshot(self) -> bytes:
        """Buffer, arrival numbers and watermark as Arrow IPC bytes."""
        table = self._buffer if self._buffer is not None else self._empty()
        table = table.append_column(_ARRIVAL, pa.array(self._arrivals, pa.int64()))
        state = {"watermark": self.watermark.state(), "next_arrival": self._next_arrival,
                 "has_schema": self._buffer is not None}
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _STATE_KEY: json.dumps(state).encode()})
        return to_ipc(table).to_pybytes()

    def restore(self, snapshot: bytes) -> None:
        """Replace the orderer's state with a snapshot's (processing-time state restarts)."""
        table = from_ipc(snapshot)
        metadata = dict(table.schema.metadata or {})
        state = json.loads(metadata.pop(_STATE_KEY))
        self._arrivals = table.column(_ARRIVAL).to_numpy().astype(np.int64)
        table = table.drop_columns([_ARRIVAL]).replace_schema_metadata(metadata or None)
        self._buffer = table if state["has_schema"] else None
        self._times = _column_micros(table)
        self._next_arrival = int(state["next_arrival"])
        self.watermark.load(state["watermark"])
        self._last_arrival, self._idle_base = None, None


def _column_micros(table: pa.Table) -> np.ndarray:
    """The ``timestamp`` column as int64 epoch microseconds (null as int64 min: late)."""
    column = table.column("timestamp")
    if column.type != pa.timestamp("us", tz="UTC"):
        column = column.cast(pa.timestamp("us", tz="UTC"))
    micros = pc.fill_null(column.cast(pa.int64()), np.iinfo(np.int64).min)
    return np.asarray(micros.to_numpy(), dtype=np.int64)


def _column_at(table: pa.Table, path: str) -> pa.ChunkedArray:
    """A top-level column, or a struct field of one (``data.TRANSACTION_ID``)."""
    name, *fields = path.split(".")
    column = table.column(name)
    for field in fields:
        column = pc.struct_field(column, field)
    return column


def _late_mask(times: np.ndarray, watermark: int | None, lateness_us: int = 0) -> np.ndarray:
    """Rows older than the watermark; a null time (int64 min) is always late.

    Before the source has a watermark (its first events), a row far below the bulk of the
    batch is late too: older than the batch's first quartile by more than ``lateness`` plus
    ten interquartile ranges (an in-order batch's earliest row is within one). One row
    dated 1970 at the head of a 2018 stream is then a late event like the same row further
    on, instead of an event that sets the stream's start.
    """
    if watermark is None:
        null = times == np.iinfo(np.int64).min
        known = times[~null]
        if len(known) < 2:
            return null
        q1, q3 = np.percentile(known, [25, 75])
        floor = q1 - lateness_us - 10 * (q3 - q1)
        return null | (times < floor)
    return times < watermark
