"""The window operator's compiled kernels against brute force: each event's window found by
scanning its key's rows, each running sum against the plain sum of its window (integer
values, so every order of additions gives the same float), and a key's sums drained to zero
once its rows have all left."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.window_kernels import drained_sums, searches, window_sums

HOUR_NS = 3_600 * 10**9


def arena(seed: int, keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each key's rows in one slab of consecutive slots, in time order (ties included): the
    arena's times and two value columns, and each slot's key slab start."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, keys)
    times = np.concatenate([np.sort(rng.integers(0, 48, n)) * HOUR_NS // 2 for n in sizes]).astype(np.int64)
    values = rng.integers(-50, 50, (2, len(times))).astype(np.float64)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes).astype(np.int64)
    return times, values, first, sizes


@pytest.mark.parametrize("seed", range(6))
def test_windows_and_running_sums_equal_brute_force(seed: int) -> None:
    times, values, slab, _ = arena(seed, keys=5)
    reach = np.array([3 * HOUR_NS, 10 * HOUR_NS, 12 * HOUR_NS], dtype=np.int64)
    delay = np.array([0, 0, 2 * HOUR_NS], dtype=np.int64)
    columns, window_of = np.array([0, 1, 0], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64)
    slot = np.arange(len(times), dtype=np.int64)
    head = np.r_[True, slab[1:] != slab[:-1]]  # each key's first row starts its sums at zero
    prev = np.full(len(slot), -1, dtype=np.int64)
    lo, hi, sums = window_sums(times, values, slot, slab, head, prev, reach, delay, columns, window_of,
                               np.zeros((len(slot), len(columns))))
    for e in slot:
        key = slab == slab[e]
        for w in range(len(reach)):
            inside = np.flatnonzero(key & (slot <= e) & (times > times[e] - reach[w])
                                    & (times <= times[e] - delay[w]))
            want = (inside[0], inside[-1] + 1) if len(inside) else None
            assert want is None and lo[w, e] == hi[w, e] or (lo[w, e], hi[w, e]) == want
        for j, (column, w) in enumerate(zip(columns, window_of, strict=True)):
            assert sums[j, e] == values[column, lo[w, e]:hi[w, e]].sum()


def test_a_head_event_continues_from_its_key_s_last_stored_row() -> None:
    """A batch's first event of a key with stored rows starts from the key's sums and leaves
    its last stored row's window: the same sums as applying every row in one batch."""
    times, values, slab, _ = arena(7, keys=1)
    reach, delay = np.array([5 * HOUR_NS], dtype=np.int64), np.array([0], dtype=np.int64)
    columns, window_of = np.array([0], dtype=np.int64), np.array([0], dtype=np.int64)
    slot = np.arange(len(times), dtype=np.int64)
    head = slot == 0
    whole = window_sums(times, values, slot, slab, head, np.full(len(slot), -1), reach, delay, columns,
                        window_of, np.zeros((len(slot), 1)))[2]
    cut = len(slot) // 2
    later = slot[cut:]
    prev = np.where(later == cut, cut - 1, -1).astype(np.int64)
    starts = np.full((len(later), 1), whole[0, cut - 1])
    split = window_sums(times, values, later, slab[cut:], later == cut, prev, reach, delay, columns,
                        window_of, starts)[2]
    assert split.tolist() == whole[:, cut:].tolist()


def test_a_key_leaving_the_state_drains_its_sums_and_searches_find_the_first_later_row() -> None:
    times, values, first, sizes = arena(3, keys=4)
    starts = np.cumsum(sizes) - sizes
    ends = starts + sizes
    reach = np.array([6 * HOUR_NS, 9 * HOUR_NS], dtype=np.int64)
    delay = np.array([0, HOUR_NS], dtype=np.int64)
    columns, window_of = np.array([0, 1], dtype=np.int64), np.array([0, 1], dtype=np.int64)
    slot = np.arange(len(times), dtype=np.int64)
    head = np.r_[True, first[1:] != first[:-1]]
    sums = window_sums(times, values, slot, first, head, np.full(len(slot), -1), reach, delay, columns,
                       window_of, np.zeros((len(slot), 2)))[2]
    last = sums[:, ends - 1].T.copy()
    assert drained_sums(times, values, starts, ends, reach, delay, columns, window_of, last).tolist() \
        == np.zeros((len(starts), 2)).tolist()
    targets = times[ends - 1] - HOUR_NS
    found = searches(times, starts, ends, targets)
    for k in range(len(starts)):
        later = np.flatnonzero(times[starts[k]:ends[k]] > targets[k])
        assert found[k] == (starts[k] + later[0] if len(later) else ends[k])
