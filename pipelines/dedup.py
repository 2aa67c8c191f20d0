"""Exactly-once by event id: the filter that recognises an event seen before.

A re-read file, a producer retry or a replay after recovery brings events whose ids were
already seen. The filter is **exact within a horizon of event time** and bounded in memory:

- ids are kept per event-time bucket (one hour by default), as the id strings themselves,
  sorted by their 64-bit XXH3 hash for a vectorised binary search; a hash match is always
  confirmed on the strings, so two different ids never collide;
- :meth:`DuplicateFilter.advance` drops the buckets that end before ``watermark - horizon``;
- an event older than that (its bucket is gone, or was never kept) is **never called a
  duplicate**, and is not recorded: the filter never dead-letters a genuine event. Outside
  the horizon, idempotence is the store's job (:meth:`pipelines.store.EventStore.stored_ids`).

An event is a duplicate when an earlier event with the same id is remembered, whatever its
time within the horizon (a retry or a re-read carries the same event time; a producer that
reuses an id for another time is caught too); each id is kept in its own time's bucket, so
memory is released a bucket at a time. Memory is the ids of the horizon: about 8 bytes of
hash, 8 of offset and the id's bytes per event (~52 bytes for a UUID), and 18-36 bytes more
for a set of every hash held (:class:`HashSet`), which tells a batch of new ids at one
lookup instead of a binary search in every run of every bucket.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import PipelineError
from pipelines.hashing import stable_hash64
from pipelines.tables import from_ipc, to_ipc

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
#: Events without a time (the old call style) share one bucket that never expires.
_TIMELESS = np.iinfo(np.int64).max
_FORMAT = 1

_Run = tuple[np.ndarray, pa.LargeStringArray]  # hashes sorted, ids in the same order


class DedupRestoreError(PipelineError):
    """A duplicate filter snapshot cannot be read back."""


_EMPTY, _FULL, _GONE = 0, 1, 2


class HashSet:
    """64-bit hashes in an open-addressing table (linear probing, removals as tombstones),
    looked up and added a batch at a time in numpy: a probe round per collision depth, not
    a Python step per hash.

    Example:
        >>> known = HashSet()
        >>> known.add(np.array([5, 21, 37], np.uint64))  # 5, 21 and 37 share a slot of 16
        >>> known.remove(np.array([21], np.uint64))
        >>> known.contains(np.array([5, 21, 37, 6], np.uint64)).tolist(), len(known)
        ([True, False, True, False], 2)
    """

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self._allocate(16)
        if hashes is not None:
            self.add(hashes)

    def __len__(self) -> int:
        return self.full

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.state.nbytes

    def _allocate(self, capacity: int) -> None:
        self.values = np.zeros(capacity, np.uint64)
        self.state = np.zeros(capacity, np.int8)
        self.full = self.gone = 0

    def _start(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes & np.uint64(len(self.values) - 1)).astype(np.int64)

    def _find(self, hashes: np.ndarray) -> np.ndarray:
        """Each hash's slot (-1: not held)."""
        at = np.full(len(hashes), -1, np.int64)
        pending, slot, mask = np.arange(len(hashes)), self._start(hashes), len(self.values) - 1
        while len(pending):
            state = self.state[slot]
            hit = (state == _FULL) & (self.values[slot] == hashes[pending])
            at[pending[hit]] = slot[hit]
            going = ~hit & (state != _EMPTY)  # another hash, or a removed one: probe on
            pending, slot = pending[going], (slot[going] + 1) & mask
        return at

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the hashes held."""
        return self._find(np.asarray(hashes, np.uint64)) >= 0

    def add(self, hashes: np.ndarray) -> None:
        """Hold ``hashes`` (none held already, as the filter adds only ids not seen)."""
        hashes = np.asarray(hashes, np.uint64)
        if 2 * (self.full + self.gone + len(hashes)) > len(self.values):  # load <= 1/2
            live = self.values[self.state == _FULL]
            size = 16
            while size < 4 * (len(live) + len(hashes)):
                size *= 2
            self._allocate(size)
            self._place(live)
        self._place(hashes)

    def _place(self, hashes: np.ndarray) -> None:
        pending, slot, mask = hashes, self._start(hashes), len(self.values) - 1
        while len(pending):
            state = self.state[slot]
            free = state != _FULL
            # hashes sharing a free slot all write it; the one read back took it, the
            # others probe on (equal hashes would share it, counted twice: harmless)
            self.values[slot[free]] = pending[free]
            self.state[slot[free]] = _FULL
            took = free & (self.values[slot] == pending)
            self.full += int(np.count_nonzero(took))
            self.gone -= int(np.count_nonzero(took & (state == _GONE)))
            pending, slot = pending[~took], (slot[~took] + 1) & mask

    def remove(self, hashes: np.ndarray) -> None:
        """Forget ``hashes`` (those not held are ignored)."""
        at = np.unique(self._find(np.asarray(hashes, np.uint64)))
        at = at[at >= 0]
        self.state[at] = _GONE
        self.full -= len(at)
        self.gone += len(at)


class DuplicateFilter:
    """Remembers event ids per event-time bucket; marks repeats within and across batches.

    Within a bucket the ids are a few sorted runs of doubling sizes (a log-structured
    merge): a batch is checked with one binary search per run and appended as a new run.

    Args:
        horizon_us: how far behind the watermark ids are remembered (default 7 days).
        bucket_us: width of an event-time bucket (default 1 day); memory is released a
            bucket at a time, and a batch is checked against every bucket kept.

    Example:
        >>> f = DuplicateFilter(horizon_us=DAY_US)
        >>> t = np.array([0, 0, 0])
        >>> f.mark(pa.array(["a", "b", "a"]), t).tolist()
        [False, False, True]
        >>> f.mark(pa.array(["b", "c"]), np.array([0, 0])).tolist()
        [True, False]
        >>> f.advance(3 * DAY_US); len(f)  # the first watermark: kept at the horizon's edge
        3
        >>> f.advance(5 * DAY_US); len(f), f.mark(pa.array(["a"]), np.array([0])).tolist()
        (0, [False])
    """

    def __init__(self, horizon_us: int = 7 * DAY_US, bucket_us: int = DAY_US) -> None:
        if horizon_us < 0 or bucket_us <= 0:
            raise ValueError("horizon_us must be >= 0 and bucket_us > 0")
        self.horizon_us, self.bucket_us = horizon_us, bucket_us
        self._buckets: dict[int, list[_Run]] = {}
        self._floor: int | None = None  # buckets below it are outside the horizon
        self._changed: set[int] = set()
        # every hash the buckets hold (made again after a restore): a batch of new ids is
        # known new at one lookup, not one binary search per run of every bucket (18
        # buckets of 63 runs cost 0.48 ms a live batch of 3 ids)
        self._known: HashSet | None = None

    def __len__(self) -> int:
        return sum(len(h) for runs in self._buckets.values() for h, _ in runs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the remembered ids and their hashes."""
        return sum(h.nbytes + ids.nbytes for runs in self._buckets.values() for h, ids in runs)

    def advance(self, watermark_us: int) -> None:
        """Forget the buckets that end before ``watermark_us - horizon_us`` (at the first
        watermark, ids seen before it move to the horizon's edge instead: an event stamped
        far behind the stream's start is remembered for one horizon like any other)."""
        floor = (watermark_us - self.horizon_us) // self.bucket_us
        if self._floor is not None and floor <= self._floor:
            return
        first, self._floor = self._floor is None, floor
        for bucket in [b for b in self._buckets if b < floor]:
            runs = self._buckets.pop(bucket)
            self._changed.discard(bucket)
            if first:  # seen before any watermark: remembered as if at the horizon's edge
                self._buckets.setdefault(floor, []).extend(runs)
                self._changed.add(floor)
            elif self._known is not None:
                self._known.remove(np.concatenate([h for h, _ in runs]))

    def mark(self, event_ids: pa.Array | pa.ChunkedArray, timestamps: object = None,
             keep: np.ndarray | None = None) -> np.ndarray:
        """Mask of duplicates among ``event_ids``; records the others as seen.

        Args:
            event_ids: ids of one batch, in source order (the first occurrence wins).
            timestamps: event times (microseconds since the epoch: an int64 numpy array
                or an Arrow timestamp/int column); ``None`` puts every id in one bucket
                that never expires (exact, unbounded: the former behaviour).
            keep: optional mask of rows that are candidates at all (rows already rejected
                for another reason are neither duplicates nor recorded).
        """
        ids = _large_strings(event_ids)
        n = len(ids)
        buckets = self._bucket_of(timestamps, n)
        candidates = np.ones(n, bool) if keep is None else np.asarray(keep, bool).copy()
        # a row older than the horizon is checked against every id remembered (its first
        # copy may be recent) and remembered as if at the horizon's edge (its own bucket is
        # forgotten already), so a later copy within the horizon is caught too
        if self._floor is not None:
            buckets = np.maximum(buckets, self._floor)
        duplicate = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(candidates)
        if len(rows) == 0:
            return duplicate
        # the first occurrence in the batch (source order) wins, whatever its time
        in_order = ids.take(pa.array(rows))
        repeated = _repeated(in_order)
        hashes = stable_hash64(in_order)
        seen = repeated.copy()
        if self._known is None:
            self._known = HashSet(np.concatenate(
                [h for runs in self._buckets.values() for h, _ in runs] or [np.zeros(0, np.uint64)]))
        if self._known.contains(hashes).any():  # else no run holds any of them: all new
            for bucket in list(self._buckets):
                seen |= self._seen(bucket, hashes, in_order)
        duplicate[rows] = seen
        new = ~seen
        fresh = rows[new]
        by_bucket = np.argsort(buckets[fresh], kind="stable")
        order, fresh_hashes = fresh[by_bucket], hashes[new][by_bucket]
        ordered_buckets = buckets[order]
        ordered_ids = ids.take(pa.array(order))
        for start, end in _segments(ordered_buckets):
            self._add(int(ordered_buckets[start]), fresh_hashes[start:end],
                      ordered_ids.slice(start, end - start))
        return duplicate

    def _bucket_of(self, timestamps: object, n: int) -> np.ndarray:
        if timestamps is None:
            return np.full(n, _TIMELESS // self.bucket_us, dtype=np.int64)
        if isinstance(timestamps, pa.ChunkedArray | pa.Array):
            timestamps = pc.fill_null(timestamps.cast(pa.int64()), _TIMELESS).to_numpy()
        micros = np.asarray(timestamps, dtype=np.int64)
        if len(micros) != n:
            raise ValueError(f"{n} event ids but {len(micros)} timestamps")
        return micros // self.bucket_us

    def _seen(self, bucket: int, hashes: np.ndarray, ids: pa.LargeStringArray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run_hashes, run_ids in self._buckets.get(bucket, []):
            position = np.minimum(np.searchsorted(run_hashes, hashes), len(run_hashes) - 1)
            hit = np.flatnonzero(run_hashes[position] == hashes)
            if len(hit) == 0:
                continue
            same = pc.equal(run_ids.take(pa.array(position[hit])), ids.take(pa.array(hit)))
            same = same.to_numpy(zero_copy_only=False)
            found[hit[same]] = True
            for row in hit[~same]:  # equal 64-bit hashes, other id: rare, confirm exactly
                found[row] |= _in_equal_range(run_hashes, run_ids, int(position[row]), ids[row])
        return found

    def _add(self, bucket: int, hashes: np.ndarray, ids: pa.LargeStringArray) -> None:
        order = np.argsort(hashes, kind="stable")
        runs = self._buckets.setdefault(bucket, [])
        runs.append((hashes[order], ids.take(pa.array(order))))
        if self._known is not None:
            self._known.add(hashes)
        while len(runs) > 1 and len(runs[-2][0]) <= 2 * len(runs[-1][0]):
            newer, older = runs.pop(), runs.pop()
            runs.append(_merge([older, newer]))
        self._changed.add(bucket)

    def snapshot(self, changed_only: bool = False) -> bytes:
        """The state as immutable bytes (Arrow IPC), for checkpoints.

        Args:
            changed_only: only the buckets changed since the last snapshot, plus the list
                of live buckets: apply it on top of the earlier snapshots with
                :meth:`restore`. A full snapshot (the default) stands alone.
        """
        wanted = self._changed if changed_only else set(self._buckets)
        tables = []
        for bucket in sorted(wanted):
            runs = self._buckets[bucket] = [_merge(self._buckets[bucket])]
            ids = runs[0][1]
            tables.append(pa.table({"bucket": pa.array(np.full(len(ids), bucket)), "id": ids}))
        self._changed.clear()
        table = pa.concat_tables(tables) if tables else pa.table(
            {"bucket": pa.array([], pa.int64()), "id": pa.array([], pa.large_string())})
        header = {"format": _FORMAT, "horizon_us": self.horizon_us, "bucket_us": self.bucket_us,
                  "floor": self._floor, "delta": changed_only, "live": sorted(self._buckets)}
        return to_ipc(table.replace_schema_metadata({"dedup": json.dumps(header)})).to_pybytes()

    def restore(self, *states: bytes) -> None:
        """Replace the state by a full snapshot, then apply any ``changed_only`` ones in order
        (no state, or an empty one, starts empty)."""
        self._buckets, self._floor, self._changed, self._known = {}, None, set(), None
        for state in states:
            if state:
                self._apply(state)

    def _apply(self, state: bytes) -> None:
        try:
            table = from_ipc(state)
            header = json.loads(table.schema.metadata[b"dedup"])
        except (pa.ArrowInvalid, KeyError, TypeError, ValueError) as exc:
            raise DedupRestoreError(f"duplicate filter snapshot unreadable: {exc}") from exc
        if header["format"] != _FORMAT or header["bucket_us"] != self.bucket_us:
            raise DedupRestoreError(f"snapshot of another format or bucket width: {header}")
        live = set(header["live"])
        self._known = None  # made again from the buckets at the next batch
        self._buckets = {b: runs for b, runs in self._buckets.items() if b in live}
        self._floor = header["floor"]
        buckets = table["bucket"].to_numpy()
        ids = _large_strings(table["id"])
        for start, end in _segments(buckets):
            run_ids = ids.slice(start, end - start)  # saved in hash order
            self._buckets[int(buckets[start])] = [(stable_hash64(run_ids), run_ids)]


def _repeated(ids: pa.Array) -> np.ndarray:
    """Which ids appeared earlier in ``ids`` (a null is a value like any other), in Arrow:
    a Polars series op would hand the work to its thread pool, which on loaded cores waits
    to be scheduled, for a live batch of a few ids."""
    codes = pc.dictionary_encode(ids, null_encoding="encode").indices.to_numpy(zero_copy_only=False)
    repeated = np.ones(len(codes), dtype=bool)
    repeated[np.unique(codes, return_index=True)[1]] = False
    return repeated


def _large_strings(values: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    return pc.fill_null(values.cast(pa.large_string()), "")


def _segments(values: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal values in a sorted array."""
    if len(values) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]).tolist()
    return list(zip(starts, [*starts[1:], len(values)], strict=True))


def _merge(runs: list[_Run]) -> _Run:
    if len(runs) == 1:
        return runs[0]
    hashes = np.concatenate([h for h, _ in runs])
    order = np.argsort(hashes, kind="stable")
    ids = pa.concat_arrays([i for _, i in runs]).take(pa.array(order))
    return hashes[order], ids


def _in_equal_range(hashes: np.ndarray, ids: pa.LargeStringArray, start: int,
                    wanted: pa.Scalar) -> bool:
    end = int(np.searchsorted(hashes, hashes[start], side="right"))
    return any(ids[j] == wanted for j in range(start, end))
