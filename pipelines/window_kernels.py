"""The keyed window operator's inner loops, compiled: window bounds and running sums.

:class:`~pipelines.features.KeyedWindowOperator` keeps each key's rows in one slab of an
arena, sorted by arrival (so by time). For each event of a batch (in key-sorted order) these
kernels find its windows as slot ranges and carry its key's running sums from the previous
event's windows to its own: the rows that left are subtracted, then the rows that entered are
added, each in slot order. That is the float arithmetic the offline implementation does
(:func:`~pipelines.features.window_features_batch`), addition for addition, so the two agree
bit for bit.

Compiled with Numba (no ``fastmath``: IEEE additions, in the order written). The numpy
formulation they replace spent some hundred small array operations a batch on index
bookkeeping, whatever the batch's size: 0.5-2.6 ms for a live batch of five events, most of
a partition's time. A loop per event here is compiled code, not Python.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["drained_sums", "searches", "warm", "window_sums"]


@njit(cache=True, nogil=True)
def _search(times: np.ndarray, start: int, end: int, target: int) -> int:  # pragma: no cover - compiled
    """The first index in ``[start, end)`` with ``times > target`` (``end`` if none);
    ``times[start:end]`` is sorted."""
    lo, hi = start, end
    while lo < hi:
        mid = (lo + hi) >> 1
        if times[mid] <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _window(times: np.ndarray, first: int, at: int, reach: int,
            delay: int) -> tuple[int, int]:  # pragma: no cover - compiled
    """The window of the row at slot ``at`` (its key's rows start at ``first``) as a slot
    range ``[lo, hi)``: rows after ``time - reach``, up to ``time - delay`` (``delay`` 0: up
    to and including the row itself, never a later one)."""
    lo = _search(times, first, at + 1, times[at] - reach)
    hi = at + 1 if delay == 0 else _search(times, first, at + 1, times[at] - delay)
    return lo, hi


@njit(cache=True, nogil=True)
def searches(times: np.ndarray, starts: np.ndarray, ends: np.ndarray,
             targets: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Per query ``i``, the first index in ``[starts[i], ends[i])`` with ``times > targets[i]``
    (``ends[i]`` if none); each range of ``times`` is sorted."""
    out = np.empty(len(starts), dtype=np.int64)
    for i in range(len(starts)):
        out[i] = _search(times, starts[i], ends[i], targets[i])
    return out


@njit(cache=True, nogil=True)
def window_sums(
    times: np.ndarray,
    values: np.ndarray,
    slot: np.ndarray,
    slab: np.ndarray,
    head: np.ndarray,
    prev: np.ndarray,
    reach: np.ndarray,
    delay: np.ndarray,
    columns: np.ndarray,
    window_of: np.ndarray,
    starts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The batch's windows and running sums.

    Args:
        times: the arena's times (ns), each key's slab sorted.
        values: the arena's value columns, ``(n_columns, capacity)``.
        slot: each event's row in the arena (events in key-sorted order, a key's in arrival
            order).
        slab: the first slot of each event's key.
        head: the event starts its key's sums afresh from ``starts`` (the key's first event
            in the batch, or one after a gap past the horizon).
        prev: for a head continuing its key's stored rows, the slot of the last of them; -1
            for a head whose sums start at ``starts`` with nothing to leave its windows.
        reach: per window, how far back it starts (ns: delay + duration).
        delay: per window, how long before the event it ends (ns; 0: it includes the event).
        columns: the value columns kept as running sums, over all windows in order.
        window_of: the window of each of ``columns``.
        starts: ``(n_events, len(columns))``: the sums a head event starts from.

    Returns:
        ``lo`` and ``hi``, ``(n_windows, n_events)``: each event's windows as slot ranges
        ``[lo, hi)``; ``sums``, ``(len(columns), n_events)``: the running sums after it.
    """
    n, n_windows = len(slot), len(reach)
    lo = np.empty((n_windows, n), dtype=np.int64)
    hi = np.empty((n_windows, n), dtype=np.int64)
    # a head continuing its key's stored rows leaves the windows of the last of them: found
    # once per window here, not once per running column below
    prev_lo = np.empty((n_windows, n), dtype=np.int64)
    prev_hi = np.empty((n_windows, n), dtype=np.int64)
    sums = np.empty((len(columns), n), dtype=np.float64)
    for e in range(n):
        at, first = slot[e], slab[e]
        for w in range(n_windows):
            lo[w, e], hi[w, e] = _window(times, first, at, reach[w], delay[w])
            if head[e] and prev[e] >= 0:
                prev_lo[w, e], prev_hi[w, e] = _window(times, first, prev[e], reach[w], delay[w])
    for j in range(len(columns)):
        w, column = window_of[j], columns[j]
        total = 0.0
        for e in range(n):
            if head[e]:
                total = starts[e, j]
                if prev[e] >= 0:
                    left_from, left_to = prev_lo[w, e], prev_hi[w, e]
                else:
                    left_from = left_to = slot[e]
            else:
                left_from, left_to = lo[w, e - 1], hi[w, e - 1]
            for r in range(left_from, min(lo[w, e], left_to)):  # rows that left, in slot order
                total -= values[column, r]
            for r in range(max(left_to, lo[w, e]), hi[w, e]):  # then rows that entered
                total += values[column, r]
            sums[j, e] = total
    return lo, hi, sums


@njit(cache=True, nogil=True)
def drained_sums(
    times: np.ndarray,
    values: np.ndarray,
    first: np.ndarray,
    end: np.ndarray,
    reach: np.ndarray,
    delay: np.ndarray,
    columns: np.ndarray,
    window_of: np.ndarray,
    sums: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """Keys' running sums after every row still in their windows has left: the subtractions
    each key's next event would do first, in slot order.

    Args:
        first, end: each key's stored rows, ``[first, end)`` (not empty).
        sums: ``(n_keys, len(columns))``, the keys' sums after their last rows.
        Others: as :func:`window_sums`.
    """
    out = sums.copy()
    bounds = np.empty((len(reach), 2), dtype=np.int64)
    for k in range(len(first)):
        for w in range(len(reach)):  # the windows of the key's last row, once per window
            bounds[w, 0], bounds[w, 1] = _window(times, first[k], end[k] - 1, reach[w], delay[w])
        for j in range(len(columns)):
            column = columns[j]
            total = out[k, j]
            for r in range(bounds[window_of[j], 0], bounds[window_of[j], 1]):
                total -= values[column, r]
            out[k, j] = total
    return out


def warm() -> None:
    """Compile the kernels, or load them from Numba's cache (some 0.4 s, the first of them
    setting up the compiler), for the argument types the operator passes."""
    none, times = np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    values, flags = np.zeros((1, 1)), np.zeros(0, dtype=np.bool_)
    searches(times, none, none, none)
    window_sums(times, values, none, none, flags, none, none, none, none, none, np.zeros((0, 0)))
    drained_sums(times, values, none, none, none, none, none, none, np.zeros((0, 0)))
