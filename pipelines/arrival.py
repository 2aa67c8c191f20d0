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

from pipelines.hashing import stable_hash64

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


class _LatestTimes:
    """One dimension's keys and the latest time of each, looked up in time proportional to
    the batch, not to the keys held (a card network has millions of them).

    Each key has a position: its time, and the two 64-bit hashes of its text (XXH3 of it
    and of it reversed), sit at that position in arrays that grow by doubling; its text is
    kept in appended chunks (for :meth:`ArrivalGuard.snapshot`). Keys are found by their
    first hash in a sorted index and a small sorted delta of the keys added since, merged
    into the index when it outgrows a sixteenth of the keys; the second hash tells a key
    from another with the same first hash (such keys are found through a dictionary).
    """

    def __init__(self) -> None:
        self.size = 0
        self.times = np.zeros(0, np.int64)
        self.first = np.zeros(0, np.uint64)
        self.second = np.zeros(0, np.uint64)
        self.chunks: list[pa.Array] = []
        self.index = (np.zeros(0, np.uint64), np.zeros(0, np.int64))  # first hash, position
        self.delta = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        self.shared: dict[tuple[int, int], int] = {}  # keys whose first hash another has
        self.floor = np.iinfo(np.int64).max  # no time held is older (what forget skips on)

    @staticmethod
    def hashes(keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return stable_hash64(keys), stable_hash64(pc.utf8_reverse(keys))

    def find(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Each key's position (-1: not held), its two hashes given."""
        found = np.full(len(first), -1, np.int64)
        order = np.argsort(first)  # sorted queries search several times faster
        ordered = first[order]
        for hashes, positions in (self.index, self.delta):
            if len(hashes):
                at = np.minimum(np.searchsorted(hashes, ordered), len(hashes) - 1)
                hit = hashes[at] == ordered
                found[order[hit]] = positions[at[hit]]
        mismatch = found >= 0
        mismatch[mismatch] = self.second[found[mismatch]] != second[mismatch]
        found[mismatch] = -1
        if self.shared:  # keys sharing a first hash with another (never seen in practice)
            for i in np.flatnonzero(found < 0):
                found[i] = self.shared.get((int(first[i]), int(second[i])), -1)
        return found

    def add(self, keys: pa.Array, first: np.ndarray, second: np.ndarray, times: np.ndarray) -> None:
        """Hold new keys (distinct, none held) with their times."""
        n = len(keys)
        if not n:
            return
        positions = np.arange(self.size, self.size + n, dtype=np.int64)
        self._reserve(self.size + n)
        self.times[positions], self.first[positions], self.second[positions] = times, first, second
        self.size += n
        self.chunks.append(keys)
        while len(self.chunks) > 1 and len(self.chunks[-2]) <= 2 * len(self.chunks[-1]):
            last = self.chunks.pop()  # merged like a binary counter: few chunks, each key
            self.chunks[-1] = pa.concat_arrays([self.chunks[-1], last])  # copied log times
        self.floor = min(self.floor, int(times.min()))
        order = np.argsort(first, kind="stable")
        first, positions = first[order], positions[order]
        taken = np.zeros(n, bool)  # a first hash already indexed, or repeated in this batch
        for hashes, _ in (self.index, self.delta):
            if len(hashes):
                at = np.minimum(np.searchsorted(hashes, first), len(hashes) - 1)
                taken |= hashes[at] == first
        taken[1:] |= first[1:] == first[:-1]
        for i in np.flatnonzero(taken):
            self.shared[(int(first[i]), int(self.second[positions[i]]))] = int(positions[i])
        first, positions = first[~taken], positions[~taken]
        hashes, at = self.delta
        where = np.searchsorted(hashes, first)
        self.delta = (np.insert(hashes, where, first), np.insert(at, where, positions))
        if len(self.delta[0]) > max(1024, self.size // 16):
            self._rebuild()

    def _reserve(self, size: int) -> None:
        if size > len(self.times):
            grow = max(size, 2 * len(self.times), 64) - len(self.times)
            self.times = np.concatenate([self.times, np.zeros(grow, np.int64)])
            self.first = np.concatenate([self.first, np.zeros(grow, np.uint64)])
            self.second = np.concatenate([self.second, np.zeros(grow, np.uint64)])

    def _rebuild(self) -> None:
        """The index again from every position (none in ``shared``), the delta empty."""
        positions = np.arange(self.size, dtype=np.int64)
        if self.shared:
            positions = np.setdiff1d(positions, np.fromiter(self.shared.values(), np.int64))
        order = np.argsort(self.first[positions], kind="stable")
        self.index = (self.first[positions][order], positions[order])
        self.delta = (np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def keys(self) -> pa.Array:
        if len(self.chunks) != 1:
            self.chunks = [pa.concat_arrays(self.chunks) if self.chunks
                           else pa.array([], pa.large_string())]
        return self.chunks[0]

    def forget(self, cutoff: int) -> None:
        """Drop the keys whose latest time is before ``cutoff``."""
        if cutoff <= self.floor:
            return
        kept = np.flatnonzero(self.times[:self.size] >= cutoff)
        keys = self.keys().take(pa.array(kept))
        first, second, times = self.first[kept], self.second[kept], self.times[kept]
        self.__init__()  # type: ignore[misc]
        self.add(keys, first, second, times)  # sets the floor again


class ArrivalGuard:
    """Per key dimension, the latest event time seen of each key.

    A batch's distinct keys are found by their hashes in a sorted index (a few searches
    per key, whatever the number of keys held: :class:`_LatestTimes`) and its own order is
    decided in numpy, so a batch of one event costs microseconds, not the fixed cost of a
    dozen Polars joins and group-bys, nor a pass over every key ever seen.

    Args:
        dimensions: name -> where each event's key in that dimension is (null: the event
            has no key there, never late in it).
        horizon: how long (in the time column's units) a key is remembered after its
            latest event, behind the newest event time seen.
    """

    def __init__(self, dimensions: dict[str, KeyOf], horizon: int | None = None) -> None:
        self.dimensions, self.horizon = dimensions, horizon
        self._held = {name: _LatestTimes() for name in dimensions}
        self.newest = _NEVER

    @property
    def latest(self) -> dict[str, pl.DataFrame]:
        """Each dimension's keys (``k``) and their latest times (``t``)."""
        return {name: pl.DataFrame({"k": pl.Series(held.keys(), dtype=pl.String),
                                    "t": pl.Series(held.times[:held.size], dtype=pl.Int64)})
                for name, held in self._held.items()}

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
        held = self._held[name]
        first, second = held.hashes(distinct)
        at = held.find(first, second)
        found = at >= 0
        stored = np.full(len(distinct), _NEVER, np.int64)
        stored[found] = held.times[at[found]]
        prior = np.maximum(stored[group], _earlier_max(group, times))
        # a key's latest becomes the newest of its times (stored or in this batch)
        newest = stored.copy()
        np.maximum.at(newest, group, times)
        held.times[at[found]] = newest[found]
        new = np.flatnonzero(~found)
        held.add(distinct.take(pa.array(new)), first[new], second[new], newest[new])
        self.newest = max(self.newest, int(times.max()))
        return keyed[times < prior]

    def _forget(self) -> None:
        if self.horizon is None or self.newest == _NEVER:
            return
        for held in self._held.values():
            held.forget(self.newest - self.horizon)

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
            keys = rows.get_column("k").to_arrow().cast(pa.large_string())
            held = self._held[name] = _LatestTimes()
            held.add(keys, *held.hashes(keys), rows.get_column("t").to_numpy().astype(np.int64))


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
