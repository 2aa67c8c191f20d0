"""Derived event ids, the stable routing hash and the duplicate filter."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import dedup
from pipelines.dedup import DuplicateFilter, HashSet
from pipelines.event_ids import (
    EVENTRAY_NAMESPACE,
    VECTOR_MIN_ROWS,
    derived_event_ids,
    uuid5_strings,
)
from pipelines.hashing import VECTOR_MIN_ROWS as HASH_VECTOR_MIN_ROWS
from pipelines.hashing import partition_of, stable_hash64


@settings(max_examples=60, deadline=None)
@given(source=st.text(min_size=1, max_size=80), part=st.text(max_size=80),
       offsets=st.lists(st.integers(0, 10**15), max_size=30))
def test_derived_ids_equal_uuid5(source: str, part: str, offsets: list[int]) -> None:
    got = derived_event_ids(source, part, np.array(offsets, dtype=np.int64)).to_pylist()
    assert got == [str(uuid.uuid5(EVENTRAY_NAMESPACE, f"{source}/{part}#{o}")) for o in offsets]


@pytest.mark.parametrize("rows", [1, VECTOR_MIN_ROWS - 1, VECTOR_MIN_ROWS, 3 * VECTOR_MIN_ROWS])
def test_ids_equal_uuid5_on_both_sides_of_the_vector_threshold(rows: int) -> None:
    offsets = np.arange(rows, dtype=np.int64) * 7919 + 5  # offsets of several widths
    got = derived_event_ids("src", "part-1", offsets).to_pylist()
    assert got == [str(uuid.uuid5(EVENTRAY_NAMESPACE, f"src/part-1#{o}")) for o in offsets]
    names = [f"e{i}/route-é" for i in range(rows)]
    assert uuid5_strings(pa.array(names)).to_pylist() == \
        [str(uuid.uuid5(EVENTRAY_NAMESPACE, name)) for name in names]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=40)), max_size=40))
def test_stable_hash_is_the_reference_xxh3(values: list[str | None]) -> None:
    arr = pa.array(values, pa.string())
    assert stable_hash64(arr).tolist() == [xxhash.xxh3_64_intdigest((v or "").encode()) for v in values]
    if len(values) > 2:  # sliced and chunked arrays hash the same as fresh ones
        fresh = pa.array(values[1:], pa.string())
        assert stable_hash64(arr.slice(1)).tolist() == stable_hash64(fresh).tolist()
        chunked = pa.chunked_array([arr.slice(0, 1), arr.slice(1)])
        assert stable_hash64(chunked).tolist() == stable_hash64(arr).tolist()


@pytest.mark.parametrize("rows", [1, HASH_VECTOR_MIN_ROWS - 1, HASH_VECTOR_MIN_ROWS,
                                  2 * HASH_VECTOR_MIN_ROWS + 3])
def test_stable_hash_is_the_reference_on_both_sides_of_the_vector_threshold(rows: int) -> None:
    values = [None if i % 97 == 0 else f"k{i}-é{'x' * (i % 13)}" for i in range(rows)]
    want = [xxhash.xxh3_64_intdigest((v or "").encode()) for v in values]
    assert stable_hash64(pa.array(values, pa.string())).tolist() == want
    assert stable_hash64(pa.array(values, pa.large_string())).tolist() == want
    half = rows // 2
    chunked = pa.chunked_array([pa.array(values[:half], pa.string()), pa.array(values[half:], pa.string())])
    assert stable_hash64(chunked).tolist() == want
    assert stable_hash64(pa.array(values, pa.string()).slice(1)).tolist() == want[1:]


def test_stable_hash_golden_values() -> None:
    # Pinned: partitions and duplicate filters must agree across processes and releases.
    got = stable_hash64(pa.array(["", "a", "C0000042", "é", None])).tolist()
    assert got == [0x2D06800538D394C2, 0xE6C632B61E964E1F, 0xB6D305E88DCD9A8C, 0xF7940A006CF10CB3,
                   0x2D06800538D394C2]


def test_partition_of_is_stable_and_spread() -> None:
    keys = pa.array([str(i) for i in range(20_000)])
    owners = partition_of(keys, 8)
    assert owners[:8].tolist() == [5, 0, 4, 0, 7, 2, 5, 2]
    counts = np.bincount(owners, minlength=8)
    assert counts.min() > 0.9 * 20_000 / 8


def test_one_huge_key_hashes_in_one_vector_step() -> None:
    # A per-byte loop took seconds for one 1 MB key; the hash is linear in bytes, not rows.
    keys = pa.array([f"k{i}" for i in range(1_000)] + ["x" * 1_000_000])
    started = time.perf_counter()
    owners = partition_of(keys, 4)
    assert time.perf_counter() - started < 0.5
    assert owners[-1] == xxhash.xxh3_64_intdigest(b"x" * 1_000_000) % 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=12), max_size=8))
def test_duplicate_filter_keeps_first_occurrences(batches: list[list[str]]) -> None:
    f, seen = DuplicateFilter(), set()
    for batch in batches:
        marks = f.mark(pa.array(batch, pa.string())).tolist()
        expected = []
        for value in batch:
            expected.append(value in seen)
            seen.add(value)
        assert marks == expected
    restored = DuplicateFilter()
    restored.restore(f.snapshot())
    assert len(restored) == len(seen)
    again = restored.mark(pa.array(sorted(seen) + ["zz"], pa.string())).tolist()
    assert again == [True] * len(seen) + [False]


def test_rejected_rows_are_neither_duplicates_nor_remembered() -> None:
    f = DuplicateFilter()
    assert f.mark(pa.array(["a", "a"]), keep=np.array([False, True])).tolist() == [False, False]
    assert f.mark(pa.array(["a"])).tolist() == [True]


HOUR = 3_600_000_000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 30)), max_size=12),
                max_size=8),
       st.integers(0, 10))
def test_filter_is_exact_within_the_horizon(batches: list[list[tuple[str, int]]],
                                             horizon_hours: int) -> None:
    # Reference: the first occurrences of ids, each with its hour (an hour older than the
    # horizon counts as the horizon's edge), forgetting hours older than watermark - horizon;
    # an id seen again while its first copy is remembered, or earlier in the same batch, is a
    # duplicate at any hour (an old row too: its first copy may be new).
    f = DuplicateFilter(horizon_us=horizon_hours * HOUR, bucket_us=HOUR)
    kept: list[tuple[str, int]] = []
    watermark, first_advance = 0, True
    for batch in batches:
        hours = np.array([h for _, h in batch], dtype=np.int64)
        marks = f.mark(pa.array([i for i, _ in batch], pa.string()), hours * HOUR).tolist()
        floor = watermark - horizon_hours if watermark else None
        expected, in_batch = [], set()
        for event_id, hour in batch:
            inside = floor is None or hour >= floor
            repeat = event_id in in_batch or any(event_id == k for k, _ in kept)
            in_batch.add(event_id)
            expected.append(repeat)
            if not repeat:
                kept.append((event_id, hour if inside else floor))
        assert marks == expected
        watermark = max([watermark, *hours.tolist()])
        f.advance(watermark * HOUR)
        if first_advance:  # ids seen before the first watermark move to the horizon's edge
            kept = [(k, max(h, watermark - horizon_hours)) for k, h in kept]
            first_advance = False
        kept = [(k, h) for k, h in kept if h >= watermark - horizon_hours]
        assert len(f) == len(kept)  # memory is the horizon's ids, no more
        assert f._known is None or len(f._known) == len(kept)  # the lookup set forgets too


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 200), max_size=40)), max_size=30))
def test_the_hash_set_holds_what_was_added_and_not_removed(steps: list[tuple[bool, list[int]]]) -> None:
    """Adds and removals of small hashes (many share a slot; removals leave tombstones that
    later adds reuse; the table grows), checked against a Python set."""
    known, reference = HashSet(), set()
    for adding, values in steps:
        batch = np.array(sorted(set(values)), np.uint64)
        if adding:
            batch = batch[~np.isin(batch, np.array(sorted(reference), np.uint64))]
            known.add(batch)
            reference |= set(batch.tolist())
        else:
            known.remove(batch)
            reference -= set(batch.tolist())
        probe = np.arange(0, 260, dtype=np.uint64)
        assert known.contains(probe).tolist() == [int(v) in reference for v in probe]
        assert len(known) == len(reference)


def test_equal_hashes_never_make_a_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every id hashes alike: the 64-bit hash alone would call every new id a duplicate.
    monkeypatch.setattr(dedup, "stable_hash64", lambda ids: np.zeros(len(ids), np.uint64))
    f, t = DuplicateFilter(), np.zeros(4, np.int64)
    assert f.mark(pa.array(["a", "b", "c", "a"]), t).tolist() == [False, False, False, True]
    assert f.mark(pa.array(["d", "b", "e", "c"]), t).tolist() == [False, True, False, True]


def test_forgotten_events_are_not_duplicates_and_memory_is_released() -> None:
    f = DuplicateFilter(horizon_us=2 * HOUR, bucket_us=HOUR)
    f.advance(0)  # the stream has a watermark from the start
    ids = pa.array([f"id{i}" for i in range(100)])
    assert not f.mark(ids, np.arange(100) * HOUR // 10).any()
    f.advance(12 * HOUR)  # keeps the buckets from hour 10 on: nothing of hours 0-9 is left
    assert len(f) == 0
    again = f.mark(ids, np.arange(100) * HOUR // 10)
    assert not again.any()  # forgotten: not called duplicates
    assert len(f) == 100  # remembered again, as at the horizon's edge (hour 10)
    f.advance(13 * HOUR)
    assert len(f) == 0


def test_ids_seen_before_the_first_watermark_are_kept_for_one_horizon() -> None:
    f = DuplicateFilter(horizon_us=2 * HOUR, bucket_us=HOUR)
    f.mark(pa.array(["old"]), np.array([0]))  # far behind the stream's start
    f.advance(100 * HOUR)
    assert f.mark(pa.array(["old"]), np.array([99]) * HOUR).tolist() == [True]
    f.advance(101 * HOUR)
    assert len(f) == 0  # forgotten one horizon later, as any id


def test_an_old_copy_of_a_remembered_event_is_a_duplicate() -> None:
    """The second copy of a recent event, stamped far behind the horizon, is still caught:
    the first copy is remembered (a late copy must not be stored twice)."""
    f = DuplicateFilter(horizon_us=2 * HOUR, bucket_us=HOUR)
    assert not f.mark(pa.array(["a", "b"]), np.array([100, 100]) * HOUR).any()
    f.advance(100 * HOUR)
    assert f.mark(pa.array(["a", "c"]), np.array([3, 3]) * HOUR).tolist() == [True, False]
    # the old row "c" is remembered as if at the horizon's edge: a later copy is caught
    assert f.mark(pa.array(["c"]), np.array([99]) * HOUR).tolist() == [True]


def test_snapshots_restore_in_full_and_by_changed_buckets() -> None:
    f = DuplicateFilter(horizon_us=24 * HOUR, bucket_us=HOUR)
    f.advance(0)  # the stream has a watermark from the start
    f.mark(pa.array(["a", "b"]), np.array([0, 5 * HOUR]))
    base = f.snapshot()
    f.mark(pa.array(["c"]), np.array([5 * HOUR]))
    f.advance(25 * HOUR)  # drops hour 0
    delta = f.snapshot(changed_only=True)
    assert len(delta) < len(base) + 200
    restored = DuplicateFilter(horizon_us=24 * HOUR, bucket_us=HOUR)
    restored.restore(base, delta)
    assert len(restored) == len(f) == 2
    probe = pa.array(["a", "b", "c", "d"]), np.array([0, 5 * HOUR, 5 * HOUR, 5 * HOUR])
    assert restored.mark(*probe).tolist() == f.mark(*probe).tolist() == [False, True, True, False]
