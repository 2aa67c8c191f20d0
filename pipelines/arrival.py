"""Arrival order for live sources: each key's events are decided as they arrive.

A live source never waits for a watermark. Its events go to the keyed operators in arrival
order, which is each key's time order as long as producers send in order. An event older
than its key's latest (a producer's retry, a slow path) would take a keyed window back in
time: :class:`ArrivalGuard` finds those, per partition key and per enrichment stage key
(a terminal's events come from many customers), so the run sends them the late lane
instead (stored flagged ``{"late": true}`` with ``late: process``, else dead-lettered).

With a ``horizon``, a key whose latest event is that much older than the newest event time
seen is forgotten (an event of it after that is in order again, as for a new key): only
safe when no keyed operator remembers the key longer, so a live run keeps every key (one
time per key and dimension).

Example:
    >>> import pyarrow as pa
    >>> guard = ArrivalGuard({"key": KeyOf("key")})
    >>> t = pa.table({"key": ["a", "a", "b", "a"], "ts": pa.array([5, 9, 1, 7], pa.int64())})
    >>> guard.late(t, "ts").tolist()
    [False, False, False, True]
    >>> guard.late(pa.table({"key": ["a"], "ts": pa.array([8], pa.int64())}), "ts").tolist()
    [True]
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

_NEVER = np.iinfo(np.int64).min


@dataclass(frozen=True)
class KeyOf:
    """Where an event's key in one dimension is: a column, or a field of a struct column
    (``field``), for the event types matching ``event_types`` (a regex; others have none).

    Read in Arrow, as text: a batch of a few events pays microseconds, not a Polars plan.
    """

    column: str
    field: str | None = None
    event_types: str | None = None

    def of(self, events: pa.Table) -> pa.Array:
        """Each event's key as large text (null: no key in this dimension)."""
        values = events.column(self.column).combine_chunks()
        if self.field is not None:
            values = pc.struct_field(values, self.field)
        keys = pc.cast(values, pa.large_string())
        if self.event_types is not None:
            kind = events.column("event_type").combine_chunks()
            keys = pc.if_else(pc.match_substring_regex(kind, self.event_types), keys,
                              pa.nulls(len(keys), pa.large_string()))
        return keys


class ArrivalGuard:
    """Per key dimension, the latest event time seen of each key.

    A dimension's keys are kept as an Arrow string array, their times as a numpy array:
    a batch is looked up with one hash lookup (``pyarrow.compute.index_in``) and its own
    order decided in numpy, so a batch of one event costs microseconds, not the fixed cost
    of a dozen Polars joins and group-bys.

    Args:
        dimensions: name -> where each event's key in that dimension is (null: the event
            has no key there, never late in it).
        horizon: how long (in the time column's units) a key is remembered after its
            latest event, behind the newest event time seen.
    """

    def __init__(self, dimensions: dict[str, KeyOf], horizon: int | None = None) -> None:
        self.dimensions, self.horizon = dimensions, horizon
        self._keys = {name: pa.array([], pa.large_string()) for name in dimensions}
        self._times = {name: np.zeros(0, np.int64) for name in dimensions}
        self.newest = _NEVER

    @property
    def latest(self) -> dict[str, pl.DataFrame]:
        """Each dimension's keys (``k``) and their latest times (``t``)."""
        return {name: pl.DataFrame({"k": pl.Series(self._keys[name], dtype=pl.String),
                                    "t": pl.Series(self._times[name], dtype=pl.Int64)})
                for name in self.dimensions}

    def late(self, events: pa.Table, time: str, considered: np.ndarray | None = None) -> np.ndarray:
        """Which events are older than their key's latest, in any dimension (the others
        become their keys' latest). ``time``: the column of event times (integers or
        timestamps). ``considered``: only these rows are checked and learnt."""
        late = np.zeros(events.num_rows, bool)
        rows = np.flatnonzero(np.ones(events.num_rows, bool) if considered is None else considered)
        if len(rows):
            if len(rows) < events.num_rows:
                events = events.take(pa.array(rows))
            times = pc.cast(events.column(time), pa.int64()).to_numpy()
            for name, key in self.dimensions.items():
                late[rows[self._late_in(name, key.of(events), times)]] = True
        self._forget()
        return late

    def _late_in(self, name: str, keys: pa.Array, times: np.ndarray) -> np.ndarray:
        """Positions (in ``keys``) late in one dimension; learns the others' times."""
        keyed = np.flatnonzero(pc.is_valid(keys).to_numpy(zero_copy_only=False))
        if len(keyed) == 0:
            return keyed
        times = times[keyed]
        encoded = pc.dictionary_encode(keys.take(pa.array(keyed)))
        group = encoded.indices.to_numpy().astype(np.int64)
        distinct = encoded.dictionary
        known = pc.index_in(distinct, value_set=self._keys[name])
        stored = np.full(len(distinct), _NEVER, np.int64)
        found = pc.is_valid(known).to_numpy(zero_copy_only=False)
        stored[found] = self._times[name][pc.drop_null(known).to_numpy()]
        prior = np.maximum(stored[group], _earlier_max(group, times))
        # a key's latest becomes the newest of its times (stored or in this batch)
        newest = stored.copy()
        np.maximum.at(newest, group, times)
        self._times[name][pc.drop_null(known).to_numpy()] = newest[found]
        self._keys[name] = pa.concat_arrays([self._keys[name], distinct.filter(pa.array(~found))])
        self._times[name] = np.concatenate([self._times[name], newest[~found]])
        self.newest = max(self.newest, int(times.max()))
        return keyed[times < prior]

    def _forget(self) -> None:
        if self.horizon is None or self.newest == _NEVER:
            return
        cutoff = self.newest - self.horizon
        for name in self.dimensions:
            kept = self._times[name] >= cutoff
            if not kept.all():
                self._keys[name] = self._keys[name].filter(pa.array(kept))
                self._times[name] = self._times[name][kept]

    def snapshot(self) -> bytes:
        """The state as Arrow IPC bytes (one table: dimension, key, latest time)."""
        table = pl.concat([latest.with_columns(d=pl.lit(name)) for name, latest in self.latest.items()]
                          or [pl.DataFrame(schema={"k": pl.String, "t": pl.Int64, "d": pl.String})])
        sink = io.BytesIO()
        table.with_columns(newest=pl.lit(self.newest, pl.Int64)).write_ipc(sink)
        return sink.getvalue()

    def restore(self, state: bytes) -> None:
        table = pl.read_ipc(io.BytesIO(state))
        self.newest = int(table["newest"][0]) if table.height else _NEVER
        for name in self.dimensions:
            rows = table.filter(pl.col("d") == name)
            self._keys[name] = rows.get_column("k").to_arrow().cast(pa.large_string())
            self._times[name] = rows.get_column("t").to_numpy().astype(np.int64)


def _earlier_max(group: np.ndarray, times: np.ndarray) -> np.ndarray:
    """For each row, the latest time of the rows before it in its group (``_NEVER`` for a
    group's first): one running maximum over the rows sorted by group, on dense ranks of
    the times offset by group so that no group's maximum runs into the next."""
    distinct_times, rank = np.unique(times, return_inverse=True)
    width = len(distinct_times)
    order = np.argsort(group, kind="stable")
    value = group[order] * width + rank[order]
    running = np.maximum.accumulate(value)
    before = np.full(len(order), -1, np.int64)
    before[1:] = running[:-1] - group[order][1:] * width
    first = np.ones(len(order), bool)
    first[1:] = group[order][1:] != group[order][:-1]
    earlier = np.where(first, _NEVER, distinct_times[np.maximum(before, 0)])
    out = np.empty(len(order), np.int64)
    out[order] = earlier
    return out
