"""Per-key sliding-window features: streamed batch by batch, or computed over a whole history.

One concept, two implementations that must agree exactly ("online equals offline"):

- :class:`KeyedWindowOperator` (online): takes one Arrow/Polars batch at a time, keeps per-key
  state between batches, returns the features of the batch's rows. Vectorised with numpy over
  the batch; its windows' bounds and running sums come from compiled kernels
  (:mod:`pipelines.window_kernels`).
- :func:`window_features_batch` (offline): pure Polars over the whole history.

Both are driven by a frozen :class:`KeyedWindowSpec`: a key column, an event-time column and
:class:`Aggregate` s over :class:`Window` s. Applications build on them (the fraud
handbook's 15 model inputs: :mod:`pipelines.fraud.features`).

Window semantics, for an event of key ``k`` at time ``t`` (every input row is an event):

- ``delay == 0``: the rows of ``k`` with time in ``(t - duration, t]`` that arrived up to and
  including this event. A row of ``k`` in the same instant that arrives later is not in it:
  an event sees its past and itself, never its successors.
- ``delay > 0``: the rows of ``k`` with time in ``(t - delay - duration, t - delay]``.

``count``, ``min``, ``max``, ``last`` (the value of the window's latest row) and ``share`` (the
fraction of rows whose column is non-zero) are exact functions of the window's rows. ``sum``
and ``mean`` (sum / count) use the running sum a streaming system keeps, and the handbook's
pandas code kept: a row's value is added when the row enters the window and subtracted when it
leaves, both at the first later event of its key (at one event: leaving rows first, then
entering rows, each in arrival order; a row that would enter and leave at the same event is
skipped). The float result so carries rounding from the key's history; both implementations do
the same additions in the same order and agree bit for bit. When a key's next event comes after
all its rows have left every window (a gap of at least ``horizon``), its sums restart from
zero, unless ``carry_residual`` asks for pandas' behaviour of carrying the rounding residual;
then they restart only after a gap of at least ``residual_horizon`` (default a year; None:
never, as pandas).

Labels, and what is read: a spec may name a ``label`` column (``TX_FRAUD`` in the
handbook), known only ``label_delay`` after its row's time. Validation refuses any aggregate
over it whose window ends less than ``label_delay`` before the event. For an event at ``t`` the
operator reads the key, time and value columns of the key's rows in the event's windows and
of the event itself; a row's label enters a result only through windows ending at or before
``t - label_delay``, so only labels of rows at or before ``t - label_delay`` (known at ``t``)
can change the event's features. Every row's label is stored on arrival (with a running count
of its key's earlier labels), but a window's count is the difference of the running counts of
two rows inside the window: the labels of later rows cancel out of it exactly.

State (per operator), columnar: the retained rows' times and value columns (and, per
``share`` column, each row's count of its key's earlier non-zero rows, so a window's count is
a difference), each key's rows in one slab of consecutive slots of an arena that is compacted
when it fills, so a batch costs time in proportion to its own size, not the state's; and per
key the time of its latest event and its running sums. Only rows newer than ``horizon`` (the
longest ``delay + duration``) before their key's latest event are kept; a key whose latest
event is ``horizon`` or more older than the watermark (the latest event time seen minus
``allowed_lateness``) is dropped (with ``carry_residual``, a key whose residual is not zero
keeps only its sums, until the watermark has passed it by ``residual_horizon``). Keys live in
slots that never move: a new key takes a freed slot or a new one and enters a small sorted
delta of the key index, so a batch bringing new keys is not slowed by the table's size.
Exceptions::

    PipelineError
    └── FeatureError          a batch cannot be processed as the spec says
        ├── EventOrderError    a key's events go back in time
        └── StateRestoreError  a snapshot does not fit this operator

Example:
    >>> spec = KeyedWindowSpec("card", "ts", (Aggregate("n_1h", "count", Window(HOUR)),))
    >>> batch = pl.DataFrame({"card": [1, 1, 2], "ts": [dt.datetime(2024, 1, 1, h) for h in (0, 0, 1)]})
    >>> KeyedWindowOperator(spec).update(batch)["n_1h"].to_list()
    [1, 2, 1]
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.errors import ConfigError, PipelineError
from pipelines.tables import from_ipc, to_ipc

__all__ = [
    "Aggregate",
    "EventOrderError",
    "FeatureError",
    "KeyedWindowOperator",
    "FrameLike",
    "KeyedWindowSpec",
    "StateRestoreError",
    "Window",
    "as_frame",
    "pack_states",
    "unpack_states",
    "window_features_batch",
]

AggregateKind = Literal["count", "sum", "mean", "min", "max", "last", "share"]
FrameLike = pl.DataFrame | pa.Table | pa.RecordBatch
ZERO = dt.timedelta(0)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
#: How long a key idle past its windows keeps a carried running-sum residual (see
#: KeyedWindowSpec.carry_residual): a key back after a year restarts its sums at zero.
RESIDUAL_HORIZON = dt.timedelta(days=365)
_KINDS = ("count", "sum", "mean", "min", "max", "last", "share")
_RUNNING = ("sum", "mean")
_MAGIC = b"ERFEAT1\n"
_ARENA_MIN_SLOTS = 1024  # the smallest arena; tests lower it to move and compact slabs often


class FeatureError(PipelineError):
    """A batch cannot be processed as its feature spec says (missing column, null key...)."""


class EventOrderError(FeatureError):
    """Events of one key arrived out of time order; the operator's state is unchanged."""


class StateRestoreError(FeatureError):
    """A snapshot is corrupt or was taken by an operator with a different spec."""


def _ns(delta: dt.timedelta) -> int:
    """Exact nanoseconds of a timedelta."""
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1_000


@dataclass(frozen=True)
class Window:
    """A sliding event-time window: ``(t - delay - duration, t - delay]`` for an event at ``t``.

    Attributes:
        duration: The window's length (positive).
        delay: How long before the event the window ends (non-negative); 0 means the window
            ends at, and includes, the event itself.

    Example:
        >>> Window(dt.timedelta(days=30), delay=dt.timedelta(days=7)).reach
        datetime.timedelta(days=37)
    """

    duration: dt.timedelta
    delay: dt.timedelta = ZERO

    def __post_init__(self) -> None:
        if not isinstance(self.duration, dt.timedelta) or self.duration <= ZERO:
            raise ConfigError(f"window duration must be a positive timedelta, got {self.duration!r}")
        if not isinstance(self.delay, dt.timedelta) or self.delay < ZERO:
            raise ConfigError(f"window delay must be a non-negative timedelta, got {self.delay!r}")

    @property
    def reach(self) -> dt.timedelta:
        """How far back from the event the window starts (``delay + duration``)."""
        return self.delay + self.duration


@dataclass(frozen=True)
class Aggregate:
    """One output column: an aggregate of a value column over a window.

    Attributes:
        name: The output column's name.
        kind: ``count`` (Int64), or ``sum``, ``mean``, ``min``, ``max``, ``last``, ``share``
            (Float64; ``last`` is the value of the window's latest row, ``share`` the fraction
            of the window's rows whose ``column`` is non-zero).
        window: The window.
        column: The value column (none for ``count``).
        empty: The value of ``mean``/``min``/``max``/``last``/``share`` for an empty window (None gives
            null). ``count`` and ``sum`` of an empty window are always 0.

    Example:
        >>> Aggregate("risk_7d", "share", Window(7 * DAY, delay=7 * DAY), "fraud", empty=0.0).kind
        'share'
    """

    name: str
    kind: AggregateKind
    window: Window
    column: str | None = None
    empty: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"aggregate {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        if (self.kind == "count") != (self.column is None):
            raise ConfigError(f"aggregate {self.name!r}: {self.kind} needs "
                              f"{'no column' if self.kind == 'count' else 'a column'}")
        if self.kind in ("count", "sum") and self.empty is not None:
            raise ConfigError(f"aggregate {self.name!r}: an empty {self.kind} is always 0")


@dataclass(frozen=True)
class KeyedWindowSpec:
    """What a keyed window operator computes: inert, frozen, validated on construction.

    Attributes:
        key: The partition key column (integer keys are fastest; any sortable type works).
        time: The event-time column (Polars ``Datetime`` of any unit and zone).
        aggregates: The output columns, in order.
        label: A column whose value is known only ``label_delay`` after its row's time.
        label_delay: See ``label``; every aggregate over ``label`` needs a window delay at
            least this long.
        carry_residual: Keep a key's running-sum rounding residual across gaps of at least
            ``horizon`` (pandas' rolling sum does; it costs one float per running sum for
            each idle key whose residual is not exactly zero) instead of restarting at zero.
        residual_horizon: With ``carry_residual``, how long an idle key keeps its residual:
            a key whose next event comes this long or more after its previous one restarts
            its sums at zero (online and offline alike), and the watermark passing a key by
            this much drops it. At least ``horizon``; ``None`` keeps residuals for ever (the
            held keys then grow with every key ever seen). The default, a year, is longer
            than any gap in the handbook's data (106 days) or a year's simulation.
        allowed_lateness: How far behind the latest event time seen a key's events may arrive
            (events of one key stay in order); idle keys expire only after the watermark
            has passed them by ``horizon``.

    Example:
        >>> w = Window(DAY, delay=7 * DAY)
        >>> KeyedWindowSpec("terminal", "ts", (Aggregate("risk", "share", w, "fraud"),),
        ...                 label="fraud", label_delay=7 * DAY).horizon
        datetime.timedelta(days=8)
    """

    key: str
    time: str
    aggregates: tuple[Aggregate, ...]
    label: str | None = None
    label_delay: dt.timedelta = ZERO
    carry_residual: bool = False
    allowed_lateness: dt.timedelta = ZERO
    residual_horizon: dt.timedelta | None = RESIDUAL_HORIZON

    def __post_init__(self) -> None:
        if not isinstance(self.aggregates, tuple) or not self.aggregates:
            raise ConfigError("aggregates must be a non-empty tuple of Aggregate")
        names = [a.name for a in self.aggregates]
        if len(set(names)) != len(names) or {self.key, self.time} & set(names):
            raise ConfigError(f"aggregate names must differ from each other and from key/time: {names}")
        if self.allowed_lateness < ZERO or self.label_delay < ZERO:
            raise ConfigError("allowed_lateness and label_delay must be non-negative")
        for agg in self.aggregates:
            if self.label is not None and agg.column == self.label and agg.window.delay < self.label_delay:
                raise ConfigError(f"aggregate {agg.name!r} reads label {self.label!r} through a window "
                                  f"ending {agg.window.delay} before the event, but labels are known "
                                  f"only {self.label_delay} after it")
        if self.residual_horizon is not None and not self.residual_horizon >= self.horizon:
            raise ConfigError(f"residual_horizon {self.residual_horizon} must be at least the horizon "
                              f"{self.horizon} (or None: keep residuals for ever)")

    @property
    def horizon(self) -> dt.timedelta:
        """The longest reach: rows older than this before their key's latest event are dropped."""
        return max(a.window.reach for a in self.aggregates)


@dataclass(frozen=True)
class _Plan:
    """A spec compiled to indices: distinct windows, input columns and running sums."""

    windows: tuple[Window, ...]
    columns: tuple[tuple[str, bool], ...]  # (column, read as a 0/1 flag for share)
    running: tuple[tuple[int, ...], ...]  # per window: columns kept as running sums
    horizon: int
    lateness: int
    residual: int | None  # ns a carried residual is kept for an idle key (None: for ever)

    @property
    def restart(self) -> int | None:
        """The gap in a key's events from which its running sums restart at zero."""
        return self.residual if self.carry else self.horizon

    carry: bool = False

    @classmethod
    def of(cls, spec: KeyedWindowSpec) -> _Plan:
        aggs = [a for a in spec.aggregates if a.kind != "count"]
        windows = tuple(dict.fromkeys(a.window for a in spec.aggregates))
        columns = tuple(dict.fromkeys((str(a.column), a.kind == "share") for a in aggs))
        running = tuple(
            tuple(dict.fromkeys(columns.index((str(a.column), a.kind == "share"))
                                for a in aggs if a.window == w and a.kind in _RUNNING))
            for w in windows
        )
        residual = None if spec.residual_horizon is None else _ns(spec.residual_horizon)
        return cls(windows, columns, running, _ns(spec.horizon), _ns(spec.allowed_lateness),
                   residual if spec.carry_residual else None, spec.carry_residual)

    def column(self, agg: Aggregate) -> int:
        return self.columns.index((str(agg.column), agg.kind == "share"))

    @property
    def flags(self) -> tuple[int, ...]:
        """The flag columns; the arena keeps, after the input columns, each one's prefix count
        (the flags of its key's earlier rows), so a window's count is a difference."""
        return tuple(i for i, (_, flag) in enumerate(self.columns) if flag)

    @property
    def arena_columns(self) -> int:
        return len(self.columns) + len(self.flags)

    @property
    def n_running(self) -> int:
        return sum(len(r) for r in self.running)

    def running_slice(self, w: int) -> slice:
        start = sum(len(r) for r in self.running[:w])
        return slice(start, start + len(self.running[w]))

    @functools.cached_property
    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the compiled kernels (:mod:`pipelines.window_kernels`) take: per window its
        reach and delay (ns), and the running-sum columns of all windows in order, each with
        its window."""
        return (np.array([_ns(w.reach) for w in self.windows], dtype=np.int64),
                np.array([_ns(w.delay) for w in self.windows], dtype=np.int64),
                np.array([c for r in self.running for c in r], dtype=np.int64),
                np.array([w for w, r in enumerate(self.running) for _ in r], dtype=np.int64))


def as_frame(batch: FrameLike) -> pl.DataFrame:
    frame = batch if isinstance(batch, pl.DataFrame) else pl.from_arrow(batch)
    if not isinstance(frame, pl.DataFrame):
        raise FeatureError(f"expected a table or record batch, got {type(batch).__name__}")
    return frame


def _select(frame: pl.DataFrame, spec: KeyedWindowSpec, plan: _Plan) -> pl.DataFrame:
    """Columns ``k``, ``t`` (Int64 ns) and ``c0``.. (Float64; flags as 0/1); checks and nulls."""
    needed = list(dict.fromkeys([spec.key, spec.time, *(c for c, _ in plan.columns)]))
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FeatureError(f"batch lacks columns {missing}")
    if not isinstance(frame.schema[spec.time], pl.Datetime):
        raise FeatureError(f"time column {spec.time!r} must be a Datetime, got {frame.schema[spec.time]}")
    cols = frame.select(
        pl.col(spec.key).alias("k"),
        pl.col(spec.time).dt.epoch("ns").alias("t"),
        *((pl.col(c).cast(pl.Boolean) if flag else pl.col(c)).cast(pl.Float64).alias(f"c{i}")
          for i, (c, flag) in enumerate(plan.columns)),
    )
    names = [spec.key, spec.time, *(c for c, _ in plan.columns)]
    nulls = list(dict.fromkeys(name for name, n in zip(names, cols.null_count().row(0), strict=True) if n))
    if nulls:
        raise FeatureError(f"batch has nulls in {nulls}")
    return cols


def _arrays(
    frame: pl.DataFrame, spec: KeyedWindowSpec, plan: _Plan
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys, the times (Int64 ns) and the value columns ``(n_columns, n)`` (Float64; flags
    as 0/1) of a batch, with :func:`_select`'s checks.

    The same columns as :func:`_select`, taken with Series casts and numpy instead of a
    frame ``select``: a Polars query costs about 0.2 ms whatever the rows, and the operator
    runs once per batch of a live partition, often of a single event.
    """
    needed = list(dict.fromkeys([spec.key, spec.time, *(c for c, _ in plan.columns)]))
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FeatureError(f"batch lacks columns {missing}")
    time = frame.get_column(spec.time)
    if not isinstance(time.dtype, pl.Datetime):
        raise FeatureError(f"time column {spec.time!r} must be a Datetime, got {time.dtype}")
    key = frame.get_column(spec.key)
    values = [(frame.get_column(c).cast(pl.Boolean) if flag else frame.get_column(c)).cast(pl.Float64)
              for c, flag in plan.columns]
    names = [spec.key, spec.time, *(c for c, _ in plan.columns)]
    counts = (key.null_count(), time.null_count(), *(v.null_count() for v in values))
    nulls = list(dict.fromkeys(name for name, n in zip(names, counts, strict=True) if n))
    if nulls:
        raise FeatureError(f"batch has nulls in {nulls}")
    matrix = np.vstack([v.to_numpy() for v in values]) if values else np.empty((0, frame.height))
    return key.to_numpy(), _epoch_ns(time), matrix


def _input_arrays(
    batch: FrameLike, spec: KeyedWindowSpec, plan: _Plan
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_arrays` of a batch; an Arrow batch of plain columns is read without Polars."""
    if isinstance(batch, pa.Table | pa.RecordBatch):
        plain = _arrow_arrays(batch, spec, plan)
        if plain is not None:
            return plain
    return _arrays(as_frame(batch), spec, plan)


def _arrow_arrays(
    batch: pa.Table | pa.RecordBatch, spec: KeyedWindowSpec, plan: _Plan
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_arrays` straight from Arrow when the key is an integer, the time a timestamp
    and the values numeric or boolean, all without nulls (numpy casts them as Polars does);
    ``None`` for anything else, which the Polars path reads (and refuses with its errors)."""
    names = list(dict.fromkeys([spec.key, spec.time, *(c for c, _ in plan.columns)]))
    if any(name not in batch.column_names for name in names):
        return None
    columns = {name: batch.column(name) for name in names}
    if (not pa.types.is_integer(columns[spec.key].type) or not pa.types.is_timestamp(columns[spec.time].type)
            or any(column.null_count for column in columns.values())
            or not all(_numeric(columns[c].type) for c, _ in plan.columns)):
        return None
    values = [columns[c].to_numpy() for c, _ in plan.columns]
    matrix = np.vstack([(v != 0) if flag else v for v, (_, flag) in zip(values, plan.columns, strict=True)]) \
        .astype(np.float64) if values else np.empty((0, batch.num_rows))
    times = np.asarray(columns[spec.time].to_numpy()).astype("datetime64[ns]").view(np.int64)
    return np.asarray(columns[spec.key].to_numpy()), times, matrix


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _epoch_ns(time: pl.Series) -> np.ndarray:
    """Nanoseconds since the epoch of a Datetime Series without nulls (``dt.epoch("ns")``:
    a coarser unit scales up exactly)."""
    return time.to_numpy().astype("datetime64[ns]").view(np.int64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(lo[i], hi[i])`` for all i, without a Python loop."""
    lengths = hi - lo
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(lo - starts, lengths)


def _rolled(values: np.ndarray) -> np.ndarray:
    """``np.roll(values, 1)`` of a 1-D array, in one concatenation (a fifth of its cost)."""
    return np.concatenate([values[-1:], values[:-1]])


def _extremum(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """``ufunc.reduce(values[lo:hi])`` per range (0.0 where the range is empty)."""
    sizes = hi - lo
    members = values[_ranges(lo, hi)]
    out = np.zeros(len(lo))
    full = sizes > 0
    if full.any():
        out[full] = ufunc.reduceat(members, (np.cumsum(sizes) - sizes)[full])
    return out


def _finish(agg: Aggregate, count: np.ndarray, value: np.ndarray) -> pa.Array:
    """Turn a raw per-event result into the aggregate's output column (empty windows filled)."""
    empty = count == 0
    if agg.kind == "count":
        return pa.array(count, pa.int64())
    if agg.kind == "sum":
        return pa.array(np.where(empty, 0.0, value), pa.float64())
    if agg.kind in ("mean", "share"):
        value = value / np.maximum(count, 1)
    if agg.empty is None:
        return pa.array(value, pa.float64(), mask=empty)
    return pa.array(np.where(empty, agg.empty, value), pa.float64())


def _finish_floats(agg: Aggregate, count: np.ndarray, value: np.ndarray) -> np.ndarray:
    """:func:`_finish` as float64 (an empty window's null as NaN), the same values."""
    empty = count == 0
    if agg.kind == "count":
        return count.astype(np.float64)
    if agg.kind == "sum":
        return np.where(empty, 0.0, value)
    if agg.kind in ("mean", "share"):
        value = value / np.maximum(count, 1)
    return np.where(empty, np.nan if agg.empty is None else agg.empty, value)


class _Arena:
    """Row storage: every key's rows sit in one slab of consecutive slots, in arrival order.

    ``times`` and ``values`` (one row per input column) are indexed by slot; slots below
    ``used`` are allocated. Slabs never move except by :meth:`move_to`.
    """

    def __init__(self, n_columns: int, capacity: int = 0) -> None:
        capacity = max(capacity, _ARENA_MIN_SLOTS)
        self.times = np.zeros(capacity, dtype=np.int64)
        self.values = np.zeros((n_columns, capacity))
        self.used = 0

    @property
    def capacity(self) -> int:
        return len(self.times)

    def allocate(self, sizes: np.ndarray) -> np.ndarray:
        """First slots of new slabs of ``sizes`` slots, growing the arena when needed."""
        total = int(sizes.sum())
        if self.used + total > self.capacity:
            grow = max(2 * self.capacity, self.used + total) - self.capacity
            self.times = np.pad(self.times, (0, grow))
            self.values = np.pad(self.values, ((0, 0), (0, grow)))
        bases = self.used + np.cumsum(sizes) - sizes
        self.used += total
        return bases

    def move_to(self, target: _Arena, first: np.ndarray, end: np.ndarray, bases: np.ndarray) -> None:
        """Copy the slot ranges ``[first, end)`` to ``target`` at ``bases`` (may be ``self``)."""
        source, dest = _ranges(first, end), _ranges(bases, bases + (end - first))
        target.times[dest] = self.times[source]
        target.values[:, dest] = self.values[:, source]


_NO_TIME = np.iinfo(np.int64).min  # the latest-event time of a key that has none yet
_NONE_LEFT = np.iinfo(np.int64).max  # an expiry floor when no key of that kind is held


class _KeyTable:
    """Per key slot: its slab (slots ``[base, limit)``, rows in ``[first, end)``), the time
    of its latest event and its running sums ``(capacity, n_running)``.

    Slots are never reordered: a new key takes a freed slot or one past the used ones (the
    arrays double when full), so adding keys costs time in proportion to the new keys, not
    to the table. Keys are found through a sorted index in two parts: ``main``, rebuilt from
    the live slots now and then, and a small sorted ``delta`` of the keys added since, kept
    sorted by insertion. An expired key's slot is freed at once; its entry in ``main`` goes
    stale (a lookup checks the slot still holds that key) until the next rebuild, which comes
    when the delta and the stale entries outgrow a sixteenth of the keys.
    """

    def __init__(self, n_running: int) -> None:
        self.keys: np.ndarray = np.empty(0, dtype=np.int64)
        self.base, self.first, self.end, self.limit = (np.empty(0, dtype=np.int64) for _ in range(4))
        self.last = np.empty(0, dtype=np.int64)
        self.sums = np.empty((0, n_running))
        self.live = np.empty(0, dtype=bool)
        self.used = 0  # slots ever handed out (free ones included)
        self.free = np.empty(0, dtype=np.int64)
        self.main = (self.keys, np.empty(0, dtype=np.int64))
        self.delta = (self.keys, np.empty(0, dtype=np.int64))
        self.stale = 0

    @classmethod
    def of_sorted(cls, keys: np.ndarray, base: np.ndarray, end: np.ndarray, limit: np.ndarray,
                  last: np.ndarray, sums: np.ndarray) -> _KeyTable:
        """A table of distinct sorted ``keys`` in slots ``0..n-1`` (as a snapshot holds them)."""
        table = cls(sums.shape[1])
        table.keys, table.base, table.first, table.end, table.limit = keys, base, base.copy(), end, limit
        table.last, table.sums, table.live = last, sums, np.ones(len(keys), dtype=bool)
        table.used = len(keys)
        table.main = (keys.copy(), np.arange(len(keys), dtype=np.int64))
        table.delta = (keys[:0], np.empty(0, dtype=np.int64))
        return table

    @property
    def count(self) -> int:
        """How many keys are held."""
        return self.used - len(self.free)

    def locate(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slot of each ``wanted`` key and whether it is held (``wanted`` sorted, unique)."""
        slot = np.full(len(wanted), -1, dtype=np.int64)
        for keys, slots in (self.main, self.delta):
            if not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            candidate = slots[at]
            held = (keys[at] == wanted) & self.live[candidate]
            held[held] = self.keys[candidate[held]] == wanted[held]  # not a stale entry
            slot = np.where(held, candidate, slot)
        return slot, slot >= 0

    def add(self, new: np.ndarray) -> None:
        """Give the absent keys ``new`` (sorted, distinct) slots without rows or sums."""
        reused = self.free[len(self.free) - min(len(new), len(self.free)):]
        self.free = self.free[:len(self.free) - len(reused)]
        fresh = np.arange(self.used, self.used + len(new) - len(reused), dtype=np.int64)
        self._reserve(self.used + len(fresh), new)
        self.used += len(fresh)
        slots = np.concatenate([reused, fresh])
        self.keys[slots], self.live[slots], self.last[slots], self.sums[slots] = new, True, _NO_TIME, 0.0
        self.base[slots] = self.first[slots] = self.end[slots] = self.limit[slots] = 0
        keys, where = self.delta
        at = np.searchsorted(keys, new)  # ``new`` is sorted: the insertions keep the delta sorted
        self.delta = (np.insert(keys.astype(self.keys.dtype), at, new), np.insert(where, at, slots))
        if len(self.delta[0]) + self.stale > max(4096, self.count // 16):
            self._rebuild()

    def remove(self, slots: np.ndarray) -> None:
        """Free ``slots`` (their keys are dropped with their sums and slab bounds)."""
        self.live[slots] = False
        self.base[slots] = self.first[slots] = self.end[slots] = self.limit[slots] = 0
        self.last[slots], self.sums[slots] = _NO_TIME, 0.0
        self.free = np.concatenate([self.free, slots])
        keys, where = self.delta
        kept = ~np.isin(where, slots)
        self.stale += int(len(slots) - np.count_nonzero(~kept))
        self.delta = (keys[kept], where[kept])

    def _reserve(self, size: int, new: np.ndarray) -> None:
        """Room for ``size`` slots (doubling) and a key type that holds ``new``."""
        dtype = np.result_type(self.keys, new)
        if dtype != self.keys.dtype:  # e.g. a longer fixed-width string: convert once
            self.keys = self.keys.astype(dtype)
        grow = max(size, 2 * len(self.live), 64) - len(self.live) if size > len(self.live) else 0
        if grow:
            self.keys = np.concatenate([self.keys, np.zeros(grow, dtype=dtype)])
            for name in ("base", "first", "end", "limit"):
                setattr(self, name, np.pad(getattr(self, name), (0, grow)))
            self.last = np.pad(self.last, (0, grow), constant_values=_NO_TIME)
            self.sums = np.pad(self.sums, ((0, grow), (0, 0)))
            self.live = np.pad(self.live, (0, grow))

    def _rebuild(self) -> None:
        slots = np.flatnonzero(self.live)
        slots = slots[np.argsort(self.keys[slots], kind="stable")]
        self.main = (self.keys[slots], slots)
        self.delta = (self.keys[:0], np.empty(0, dtype=np.int64))
        self.stale = 0

    def held(self) -> np.ndarray:
        """The slots of the held keys, in key order (as a snapshot lists them)."""
        slots = np.flatnonzero(self.live)
        return slots[np.argsort(self.keys[slots], kind="stable")]

    def columns(self) -> tuple[np.ndarray, ...]:
        return self.keys, self.base, self.first, self.end, self.limit, self.last, self.sums, self.live

    @property
    def rows(self) -> np.ndarray:
        return self.end - self.first


class _Batch(NamedTuple):
    """A batch's rows sorted by key (stable, so each key keeps arrival order)."""

    order: np.ndarray  # the input row of each sorted row
    times: np.ndarray
    values: np.ndarray  # (n_columns, n)
    keys: np.ndarray  # distinct keys, sorted
    start: np.ndarray  # per distinct key: its first sorted row
    count: np.ndarray  # per distinct key: its rows

    @classmethod
    def of(cls, keys: np.ndarray, times: np.ndarray, values: np.ndarray) -> _Batch:
        order = np.argsort(keys, kind="stable")
        keys, times, values = keys[order], times[order], values[:, order]
        new_key = np.concatenate([[True], keys[1:] != keys[:-1]])
        back = np.flatnonzero(~new_key & (np.diff(times, prepend=times[0]) < 0))
        if back.size:
            raise EventOrderError(f"key {keys[back[0]]!r} goes back in time within a batch")
        start = np.flatnonzero(new_key)
        count = np.diff(np.append(start, len(keys)))
        return cls(order, times, np.ascontiguousarray(values, dtype=np.float64), keys[start], start, count)


class _Events(NamedTuple):
    """The batch's rows as events, in key-sorted order."""

    slot: np.ndarray  # arena slot of the event's row
    slab: np.ndarray  # first slot of its key's rows
    head: np.ndarray  # starts a running-sum segment (first of its key in the batch, or fresh)
    fresh: np.ndarray  # a head whose sums restart at zero
    prev: np.ndarray  # for a head continuing from stored rows: the last stored row's slot, else -1
    last: np.ndarray  # the key's last event in the batch
    key: np.ndarray  # the key's index in the key table


@functools.cache
def _kernels() -> ModuleType:
    """The compiled kernels, loaded with their compiler on first use: Numba takes some 0.6 s
    to import and set up, which only a process that runs an operator pays."""
    from pipelines import window_kernels

    window_kernels.warm()
    return window_kernels


class KeyedWindowOperator:
    """Streaming per-key window aggregates: one batch in, the batch's features out.

    Batches may interleave many keys; each key's rows must arrive in event-time order across
    batches (the runtime keeps per-key order). Results equal :func:`window_features_batch`
    over the concatenated batches, whatever the batch boundaries.

    Args:
        spec: What to compute.

    Attributes:
        spec: The spec.
        late_rows: Rows that arrived older than the watermark (their key may have expired).

    Example:
        >>> spec = KeyedWindowSpec("k", "t", (Aggregate("s", "sum", Window(HOUR), "x"),))
        >>> op = KeyedWindowOperator(spec)
        >>> at = [dt.datetime(2024, 1, 1, 0, m) for m in (0, 30, 59)]
        >>> op.update(pl.DataFrame({"k": [7, 7], "t": at[:2], "x": [1.0, 2.0]}))["s"].to_list()
        [1.0, 3.0]
        >>> op.update(pl.DataFrame({"k": [7], "t": at[2:], "x": [4.0]}))["s"].to_list()
        [7.0]
    """

    def __init__(self, spec: KeyedWindowSpec) -> None:
        self.spec = spec
        self._plan = _Plan.of(spec)
        # per batch these would compare frozen dataclasses dozens of times
        self._window_aggregates = tuple(tuple(a for a in spec.aggregates if a.window == w)
                                        for w in self._plan.windows)
        _kernels()  # loaded now, not on the first batch (a live partition's first decision)
        self.late_rows = 0
        self._max_time: int | None = None
        self._arena = _Arena(self._plan.arena_columns)
        self._table = _KeyTable(self._plan.n_running)
        # Lower bounds of the latest-event times of the keys holding rows and of those
        # holding only a residual: while the watermark is short of them nothing can expire,
        # and the per-batch expiry scan is skipped. _NO_TIME forces a scan.
        self._floor_rows = self._floor_residual = _NO_TIME

    @property
    def state_rows(self) -> int:
        """How many rows the state retains."""
        return int(self._table.rows.sum())

    @property
    def state_keys(self) -> int:
        """How many keys the state holds (with rows, or with a carried residual)."""
        return self._table.count

    @property
    def state_bytes(self) -> int:
        """Memory held by the state's arrays (the arena keeps room for appends)."""
        table = self._table
        index = sum(a.nbytes for a in (*table.main, *table.delta, table.free))
        return self._arena.times.nbytes + self._arena.values.nbytes + index + sum(
            c.nbytes for c in table.columns())

    def update(self, batch: FrameLike) -> pl.DataFrame:
        """Add a batch; return its rows' features (one row per input row, in input order).

        Raises:
            FeatureError: a column is missing or has nulls (the state is unchanged).
            EventOrderError: a key's events go back in time (the state is unchanged).
        """
        frame = pl.from_arrow(self.update_arrow(batch))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def update_arrow(self, batch: FrameLike) -> pa.Table:
        """:meth:`update`, the features as an Arrow table: an Arrow batch of integer keys and
        numeric values goes through without a Polars frame (a live partition's batch is often
        one event, and each Polars conversion or query costs a tenth of a millisecond or more).

        Raises:
            FeatureError: as :meth:`update`.
            EventOrderError: as :meth:`update`.
        """
        raw, order = self._update(batch)
        return self._output({agg.name: _finish(agg, *raw[agg.name]) for agg in self.spec.aggregates}
                            if raw else {}, order)

    def update_numpy(self, batch: FrameLike) -> dict[str, np.ndarray]:
        """:meth:`update_arrow`'s features as float64 arrays in input order (an empty
        window's null as NaN), for a caller that computes on them in numpy: the same
        values, without Arrow columns made only to be converted back (the terminal stage's
        twenty aggregates cost some 0.25 ms a batch both ways).

        Raises:
            FeatureError: as :meth:`update`.
            EventOrderError: as :meth:`update`.
        """
        raw, order = self._update(batch)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return {agg.name: _finish_floats(agg, *raw[agg.name])[rank] if raw else np.empty(0)
                for agg in self.spec.aggregates}

    def _update(self, batch: FrameLike) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Apply a batch; each aggregate's (count, raw value) per row in key order, and the
        order (input row of each)."""
        keys, times, values = _input_arrays(batch, self.spec, self._plan)
        if len(times) == 0:
            return {}, np.empty(0, dtype=np.int64)
        rows = _Batch.of(keys, times, values)
        index = self._admit(rows)
        table = self._table
        stored, last = table.end[index] - table.first[index], table.last[index]
        slots = self._place(index, rows.count)
        self._write(rows, slots, stored)
        events = self._events(rows, index, slots, stored, last)
        raw, last_sums = self._aggregate(events)
        self._advance(rows, index, last_sums)
        self._expire()
        return raw, rows.order

    def _admit(self, rows: _Batch) -> np.ndarray:
        """Check the batch continues each key's time order; add new keys; their table indices."""
        index, found = self._table.locate(rows.keys)
        known = np.flatnonzero(found)
        back = known[rows.times[rows.start[known]] < self._table.last[index[known]]]
        if back.size:
            at, stored = rows.times[rows.start[back[0]]], self._table.last[index[back[0]]]
            raise EventOrderError(f"key {rows.keys[back[0]]!r} goes back in time: {at} ns after {stored} ns")
        if not found.all():
            self._table.add(rows.keys[~found])
            index, _ = self._table.locate(rows.keys)
        return index

    def _place(self, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Slots for the batch's rows, right after each key's stored rows.

        A full slab first slides its rows back over the slots its pruned rows left; if that
        is not enough room, the key moves to a new slab twice the size it needs.
        """
        table = self._table
        stored = table.end[index] - table.first[index]
        full = table.end[index] + counts > table.limit[index]
        if full.any():
            fits = stored + counts <= table.limit[index] - table.base[index]
            self._move(index[full & fits], table.base[index[full & fits]])
            grow = full & ~fits
            if grow.any():
                self._relocate(index[grow], 2 * (stored[grow] + counts[grow]), index, counts)
        slots = _ranges(table.end[index], table.end[index] + counts)
        table.end[index] += counts
        return slots

    def _write(self, rows: _Batch, slots: np.ndarray, stored: np.ndarray) -> None:
        """Store the batch's rows, with each flag column's prefix count continuing its key's."""
        arena, n = self._arena, len(self._plan.columns)
        arena.times[slots], arena.values[:n, slots] = rows.times, rows.values
        for j, column in enumerate(self._plan.flags):
            flags = rows.values[column]
            before = np.cumsum(flags) - flags  # exact: integer counts
            last = slots[rows.start] - 1  # each key's last stored row, if any
            carried = np.where(stored > 0, arena.values[n + j, last] + arena.values[column, last], 0.0)
            arena.values[n + j, slots] = before + np.repeat(carried - before[rows.start], rows.count)

    def _move(self, which: np.ndarray, bases: np.ndarray, limits: np.ndarray | None = None) -> None:
        """Move keys' rows to slots starting at ``bases`` (slabs end at ``limits`` if given)."""
        table = self._table
        rows = table.end[which] - table.first[which]
        self._arena.move_to(self._arena, table.first[which], table.end[which], bases)
        table.first[which], table.end[which] = bases, bases + rows
        if limits is not None:
            table.base[which], table.limit[which] = bases, limits

    def _relocate(self, which: np.ndarray, size: np.ndarray, index: np.ndarray, counts: np.ndarray) -> None:
        """New slabs of ``size`` for keys ``which``; a full arena is compacted instead."""
        if self._arena.used + int(size.sum()) > self._arena.capacity:
            self._compact(index, counts)
        else:
            bases = self._arena.allocate(size)
            self._move(which, bases, bases + size)

    def _compact(self, index: np.ndarray, counts: np.ndarray) -> None:
        """Copy every key's rows into a fresh arena, each slab twice what it needs after the
        batch's ``counts`` rows arrive, the arena half again the slabs."""
        table = self._table
        incoming = np.zeros(len(table.keys), dtype=np.int64)
        incoming[index] = counts
        size = 2 * (table.rows + incoming)
        arena = _Arena(self._plan.arena_columns, int(1.5 * size.sum()))
        bases = arena.allocate(size)
        self._arena.move_to(arena, table.first, table.end, bases)
        rows = table.rows
        table.base, table.first, table.end, table.limit = bases, bases.copy(), bases + rows, bases + size
        self._arena = arena

    def _events(
        self, rows: _Batch, index: np.ndarray, slots: np.ndarray, stored: np.ndarray, last: np.ndarray
    ) -> _Events:
        of_key = np.repeat(np.arange(len(index)), rows.count)
        first = np.zeros(len(slots), dtype=bool)
        first[rows.start] = True
        has_prev = ~first | (stored[of_key] > 0)
        before = np.where(first, last[of_key], _rolled(rows.times))
        known = ~first | (last[of_key] != _NO_TIME)  # a residual-only key is known, with no rows
        if self._plan.restart is None:
            fresh = np.zeros(len(slots), dtype=bool)
        else:
            gap = np.where(known, rows.times - np.where(known, before, 0), 0)
            fresh = ~known | (gap >= self._plan.restart)
        head = first | fresh
        prev = np.where(head & has_prev & ~fresh, slots - 1, -1)
        last_event = np.append(first[1:], True)
        slab = self._table.first[index][of_key]
        return _Events(slots, slab, head, fresh, prev, last_event, index[of_key])

    def _aggregate(self, events: _Events) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Each aggregate's (count, raw value) per event (see :func:`_finish`), and each key's
        running sums after its last event."""
        plan, arena, columns = self._plan, self._arena, {}
        starts = self._table.sums[events.key]
        starts[events.fresh] = 0.0
        lo, hi, running = _kernels().window_sums(arena.times, arena.values, events.slot, events.slab,
                                                events.head, events.prev, *plan.kernel_arrays, starts)
        for w in range(len(plan.windows)):
            part = running[plan.running_slice(w)]
            for agg in self._window_aggregates[w]:
                columns[agg.name] = (hi[w] - lo[w], self._raw(agg, w, lo[w], hi[w], part))
        return columns, running[:, events.last].T

    def _raw(self, agg: Aggregate, w: int, lo: np.ndarray, hi: np.ndarray, running: np.ndarray) -> np.ndarray:
        """The aggregate per event before empty windows are filled: the running sum for sum
        and mean, the count of non-zero rows (a prefix difference) for share."""
        if agg.kind == "count":
            return hi - lo
        column = self._plan.column(agg)
        if agg.kind in _RUNNING:
            return running[self._plan.running[w].index(column)]
        if agg.kind == "share":
            prefix = self._arena.values[len(self._plan.columns) + self._plan.flags.index(column)]
            flags, last = self._arena.values[column], np.maximum(hi - 1, lo)
            return np.where(hi > lo, prefix[last] + flags[last] - prefix[lo], 0.0)
        if agg.kind == "last":  # a key's rows sit in arrival order in its slab
            return np.where(hi > lo, self._arena.values[column, np.maximum(hi - 1, lo)], 0.0)
        ufunc = np.minimum if agg.kind == "min" else np.maximum
        return _extremum(self._arena.values[column], lo, hi, ufunc)

    def _advance(self, rows: _Batch, index: np.ndarray, last_sums: np.ndarray) -> None:
        """Record each key's latest event and sums, drop rows past the horizon, move the clock."""
        table, horizon = self._table, self._plan.horizon
        table.last[index] = rows.times[rows.start + rows.count - 1]
        table.sums[index] = last_sums
        table.first[index] = _kernels().searches(self._arena.times, table.first[index], table.end[index],
                                      table.last[index] - horizon)
        newest = int(rows.times.max())
        if self._max_time is not None:
            self.late_rows += int(np.count_nonzero(rows.times < self._max_time - self._plan.lateness))
            newest = max(newest, self._max_time)
        self._max_time = newest
        self._floor_rows = min(self._floor_rows, int(table.last[index].min()))

    def _expire(self) -> None:
        """Drop keys the watermark has passed by the horizon; a carried residual that is not
        zero is kept, without rows, until the watermark passes its key by the residual horizon."""
        assert self._max_time is not None
        watermark = self._max_time - self._plan.lateness
        idle_cut = watermark - self._plan.horizon
        residual = self._plan.residual
        residual_cut = _NO_TIME if residual is None else max(watermark - residual, _NO_TIME)
        if idle_cut < self._floor_rows and residual_cut < self._floor_residual:
            return  # nothing can expire yet: skip the scan over every key
        table = self._table
        drop = table.live & (table.end > table.first) & (table.last <= idle_cut)
        if self.spec.carry_residual and self._plan.n_running:
            idle = np.flatnonzero(drop)
            table.sums[idle] = self._drain(idle)
            table.base[idle] = table.first[idle] = table.end[idle] = table.limit[idle] = 0
            residual = table.live & (table.end == table.first)
            # a zero residual is the same as no entry; an old one is dropped (sums restart)
            drop = residual & (~(table.sums != 0.0).any(axis=1) | (table.last <= residual_cut))
        if drop.any():
            table.remove(np.flatnonzero(drop))
        holding = table.end > table.first
        self._floor_rows = int(np.min(table.last[table.live & holding], initial=_NONE_LEFT))
        self._floor_residual = int(np.min(table.last[table.live & ~holding], initial=_NONE_LEFT))

    def _drain(self, gone: np.ndarray) -> np.ndarray:
        """The running sums of keys ``gone`` after subtracting every row still in their windows:
        the subtractions their next event would do first, in the same order."""
        table, arena = self._table, self._arena
        return _kernels().drained_sums(arena.times, arena.values, table.first[gone], table.end[gone],
                            *self._plan.kernel_arrays, table.sums[gone])

    def _output(self, columns: dict[str, pa.Array], order: np.ndarray) -> pa.Table:
        if not columns:
            none = np.empty(0, dtype=np.int64)
            columns = {a.name: _finish(a, none, none.astype(np.float64)) for a in self.spec.aggregates}
        names = [a.name for a in self.spec.aggregates]
        table = pa.table([columns[name] for name in names], names=names)
        if np.any(order != np.arange(len(order))):  # the batch was not in key order already
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            table = table.take(pa.array(rank))
        return table

    def snapshot(self) -> bytes:
        """The state as bytes (Arrow IPC): each key's rows, latest time and sums; the clock.

        The bytes depend only on the rows and sums kept, not on the arena's layout or on how
        the input was cut into batches.

        Example:
            >>> spec = KeyedWindowSpec("k", "t", (Aggregate("n", "count", Window(HOUR)),))
            >>> op = KeyedWindowOperator(spec)
            >>> _ = op.update(pl.DataFrame({"k": [1], "t": [dt.datetime(2024, 1, 1)]}))
            >>> clone = KeyedWindowOperator(spec)
            >>> clone.restore(op.snapshot()); clone.state_rows
            1
        """
        table, arena = self._table, self._arena
        held = table.held()
        start, end = table.first[held], table.end[held]
        slots = _ranges(start, end)
        values = arena.values[:, slots]
        n = len(self._plan.columns)  # prefix counts restart at each key's first row kept
        first = np.minimum(start, arena.capacity - 1)
        values[n:] -= np.repeat(arena.values[n:, first], end - start, axis=1)
        meta = {"spec": repr(self.spec), "late_rows": str(self.late_rows),
                "max_time": "" if self._max_time is None else str(self._max_time)}
        rows = pa.table({"time": arena.times[slots], **{f"c{i}": column for i, column in enumerate(values)}},
                        metadata=meta)
        keys = pa.table({"key": table.keys[held], "rows": end - start, "last": table.last[held],
                         **{f"s{i}": table.sums[held, i] for i in range(table.sums.shape[1])}})
        return pack_states([_ipc(rows), _ipc(keys)])

    def restore(self, data: bytes) -> None:
        """Replace the state with a :meth:`snapshot` of an operator with the same spec.

        Raises:
            StateRestoreError: the snapshot is corrupt or its spec differs.
        """
        parts = unpack_states(data)
        if len(parts) != 2:
            raise StateRestoreError(f"expected 2 parts in a window-state snapshot, got {len(parts)}")
        rows, keys = _read_ipc(parts[0]), _read_ipc(parts[1])
        meta = {k.decode(): v.decode() for k, v in (rows.schema.metadata or {}).items()}
        if meta.get("spec") not in _spec_names(self.spec):
            raise StateRestoreError(f"snapshot taken with spec {meta.get('spec')!r}, not {self.spec!r}")
        counts = _numpy(keys, "rows")
        if int(counts.sum()) != rows.num_rows:
            raise StateRestoreError("snapshot rows do not add up to its keys' row counts")
        size = 2 * counts
        arena = _Arena(self._plan.arena_columns, int(size.sum()))
        bases = arena.allocate(size)
        slots = _ranges(bases, bases + counts)
        arena.times[slots] = _numpy(rows, "time")
        for i in range(len(arena.values)):
            arena.values[i, slots] = _numpy(rows, f"c{i}")
        sums = np.array([_numpy(keys, f"s{i}") for i in range(self._plan.n_running)], dtype=np.float64)
        self._table = _KeyTable.of_sorted(_numpy(keys, "key"), bases, bases + counts, bases + size,
                                          _numpy(keys, "last"),
                                          sums.reshape(self._plan.n_running, keys.num_rows).T.copy())
        self._floor_rows = self._floor_residual = _NO_TIME
        self._arena = arena
        self._max_time = int(meta["max_time"]) if meta.get("max_time") else None
        self.late_rows = int(meta.get("late_rows", "0"))


def _spec_names(spec: KeyedWindowSpec) -> tuple[str, ...]:
    """The spec names a snapshot for ``spec`` may carry: its repr and, for the default
    residual horizon, the repr from before that field existed (such snapshots kept residuals
    for ever; restored, those expire from now on)."""
    name = repr(spec)
    if spec.residual_horizon != RESIDUAL_HORIZON:
        return (name,)
    return name, name.replace(f", residual_horizon={RESIDUAL_HORIZON!r}", "")


def pack_states(parts: list[bytes]) -> bytes:
    """Frame byte strings: magic, count, then (length, bytes) per part."""
    head = _MAGIC + struct.pack("<I", len(parts))
    return head + b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def unpack_states(data: bytes) -> list[bytes]:
    if not isinstance(data, bytes | bytearray | memoryview) or bytes(data[:len(_MAGIC)]) != _MAGIC:
        raise StateRestoreError("not a feature-state snapshot")
    try:
        (count,), at, parts = struct.unpack_from("<I", data, len(_MAGIC)), len(_MAGIC) + 4, []
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", data, at)
            parts.append(bytes(data[at + 8:at + 8 + size]))
            at += 8 + size
    except struct.error as exc:
        raise StateRestoreError("truncated feature-state snapshot") from exc
    if at != len(data) or any(len(p) == 0 for p in parts):
        raise StateRestoreError("truncated feature-state snapshot")
    return parts


def _ipc(table: pa.Table) -> bytes:
    return to_ipc(table).to_pybytes()


def _read_ipc(data: bytes) -> pa.Table:
    try:
        return from_ipc(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StateRestoreError(f"unreadable feature-state snapshot: {exc}") from exc


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        raise StateRestoreError(f"snapshot lacks column {name!r}")
    column = table.column(name)
    if not table.num_rows:
        return np.empty(0, dtype=column.type.to_pandas_dtype())
    return column.to_numpy().copy()  # Arrow's buffers are read-only; the state is updated in place


def window_features_batch(frame: FrameLike, spec: KeyedWindowSpec) -> pl.DataFrame:
    """The offline reference: ``spec``'s aggregates over a whole history, in pure Polars.

    Each key's rows must be in event-time order (ties in arrival order, which is row order).
    ``min`` and ``max`` materialise every window (memory grows with total window size).

    Args:
        frame: The whole history.
        spec: What to compute.

    Returns:
        One row per input row, in input order, with one column per aggregate.

    Example:
        >>> spec = KeyedWindowSpec("k", "t", (Aggregate("n", "count", Window(HOUR)),))
        >>> at = [dt.datetime(2024, 1, 1, 0, 0), dt.datetime(2024, 1, 1, 0, 0),
        ...       dt.datetime(2024, 1, 1, 0, 59), dt.datetime(2024, 1, 1, 1, 0)]
        >>> window_features_batch(pl.DataFrame({"k": [1, 1, 1, 1], "t": at}), spec)["n"].to_list()
        [1, 2, 3, 2]
    """
    plan = _Plan.of(spec)
    data = _reference_rows(as_frame(frame), spec, plan)
    columns: list[pl.Series] = []
    for w, window in enumerate(plan.windows):
        lo, hi = _reference_bounds(window)
        spans = data.select(lo.alias("lo"), hi.alias("hi"))
        summed = [f"c{i}" for i in plan.running[w]]
        sums = _reference_sums(data, window, summed) if summed else None
        for agg in spec.aggregates:
            if agg.window == window:
                columns.append(_reference_aggregate(agg, plan, data, spans, sums))
    return pl.DataFrame(columns).with_columns(data["row"]).sort("row").drop("row")


def _reference_rows(frame: pl.DataFrame, spec: KeyedWindowSpec, plan: _Plan) -> pl.DataFrame:
    """Rows sorted by (key, arrival): row numbers, key-group bounds and running-sum segments."""
    data = _select(frame, spec, plan).with_row_index("row")
    data = data.sort("k", "row").with_row_index("g").with_columns(pl.col("g").cast(pl.Int64))
    gap = pl.col("t").diff().over("k")
    if data.select((gap < 0).any()).item():
        raise EventOrderError("a key's events go back in time")
    restart = gap.is_null() if plan.restart is None else gap.is_null() | (gap >= plan.restart)
    first = pl.col("g") - pl.int_range(pl.len(), dtype=pl.Int64).over("k")
    data = data.with_columns(gs=first, seg=restart.cum_sum())
    return data.with_columns(ge=pl.col("gs") + pl.len().over("k"))


def _group_search(value: pl.Expr, side: Literal["left", "right"]) -> pl.Expr:
    """Row number of ``t.search_sorted(value)`` within the row's key group."""
    return pl.col("gs") + pl.col("t").search_sorted(value, side=side).over("k").cast(pl.Int64)


def _reference_bounds(window: Window) -> tuple[pl.Expr, pl.Expr]:
    """``[lo, hi)`` row ranges of each row's window."""
    t = pl.col("t")
    lo = _group_search(t - _ns(window.reach), "right")
    if window.delay == ZERO:
        return lo, pl.col("g") + 1
    return lo, _group_search(t - _ns(window.delay), "right")


def _reference_sums(data: pl.DataFrame, window: Window, columns: list[str]) -> pl.DataFrame:
    """Running sums per row: each row is added at the first event whose window holds it and
    subtracted at the first whose window has passed it, summed per segment in (event,
    subtract-before-add, row) order from 0.0; an operation across a restart is dropped."""
    t, cols = pl.col("t"), pl.col(columns)
    enter = pl.col("g") if window.delay == ZERO else _group_search(t + _ns(window.delay), "left")
    leave = _group_search(t + _ns(window.reach), "left")
    ops = data.select("g", "ge", "seg", *columns, enter.alias("enter"), leave.alias("leave"))
    live = pl.col("enter") != pl.col("leave")
    adds = ops.filter(live & (pl.col("enter") < pl.col("ge"))).select(
        pl.col("enter").alias("event"), pl.lit(1).alias("phase"), "g", cols)
    subtracts = ops.filter(live & (pl.col("leave") < pl.col("ge"))).select(
        pl.col("leave").alias("event"), pl.lit(0).alias("phase"), "g", -cols)
    heads = ops.filter(pl.col("seg").is_first_distinct()).select(
        pl.col("g").alias("event"), pl.lit(-1).alias("phase"), "g", *(pl.lit(0.0).alias(c) for c in columns))
    steps = pl.concat([heads, adds, subtracts])
    segment = data["seg"].gather(steps["event"])
    steps = (steps.with_columns(segment)
             .filter(segment == data["seg"].gather(steps["g"]))
             .sort("event", "phase", "g")
             .with_columns(cols.cum_sum().over("seg"))
             .group_by("event").agg(cols.last()))
    per_row = data.select("g", "seg").join(steps, left_on="g", right_on="event", how="left",
                                           maintain_order="left")
    return per_row.select(cols.forward_fill().over("seg"))


def _reference_aggregate(
    agg: Aggregate, plan: _Plan, data: pl.DataFrame, spans: pl.DataFrame, sums: pl.DataFrame | None
) -> pl.Series:
    """One aggregate's column in (key, arrival) order, empty windows filled."""
    count = spans["hi"] - spans["lo"]
    if agg.kind == "count":
        return count.alias(agg.name)
    values = data[f"c{plan.column(agg)}"]
    if agg.kind in ("sum", "mean"):
        assert sums is not None
        raw = sums[f"c{plan.column(agg)}"]
    elif agg.kind == "share":
        prefix = pl.concat([pl.Series([0], dtype=pl.Int64), values.cast(pl.Int64).cum_sum()])
        raw = prefix.gather(spans["hi"]) - prefix.gather(spans["lo"])
    elif agg.kind == "last":  # rows are in (key, arrival) order: the window's last row is hi - 1
        raw = values.gather((spans["hi"] - 1).clip(lower_bound=0))
    else:
        raw = _reference_extremum(values, spans, agg.kind)
    frame = pl.DataFrame({"n": count, "x": raw})
    empty = 0.0 if agg.kind == "sum" else agg.empty
    value = pl.col("x") / pl.col("n") if agg.kind in ("mean", "share") else pl.col("x")
    out = pl.when(pl.col("n") == 0).then(pl.lit(empty, pl.Float64)).otherwise(value.cast(pl.Float64))
    return frame.select(out.alias(agg.name)).to_series()


def _reference_extremum(values: pl.Series, spans: pl.DataFrame, kind: str) -> pl.Series:
    members = spans.select(pl.int_range(pl.len()).alias("e"), pl.int_ranges("lo", "hi").alias("j"))
    members = members.explode("j", empty_as_null=True)
    members = members.with_columns(x=values.gather(members["j"]))
    agg = pl.col("x").min() if kind == "min" else pl.col("x").max()
    return members.group_by("e", maintain_order=True).agg(agg)["x"]
