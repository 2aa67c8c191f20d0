"""Exactly-once by event id: the filter that recognises an event seen before.

A re-read file, a producer retry or a replay after recovery brings events whose ids were
already stored; they go to the dead-letter store as ``duplicate_event_id`` instead of
being stored twice. The state is the sorted array of 64-bit FNV-1a hashes of the ids
stored so far (8 bytes per event), checked and extended per batch with numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.hashing import stable_hash64


class DuplicateFilter:
    """Remembers stored event ids; marks repeats within and across batches.

    The seen hashes are kept as a few sorted runs of doubling sizes (a log-structured
    merge): a batch is checked with one binary search per run and appended as a new run;
    runs of similar size are merged, so the cost per event stays logarithmic instead of
    re-sorting everything seen for every batch.

    Example:
        >>> f = DuplicateFilter()
        >>> f.mark(pa.array(["a", "b", "a"])).tolist()
        [False, False, True]
        >>> f.mark(pa.array(["b", "c"])).tolist()
        [True, False]
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def _seen(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            position = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[position] == hashes
        return found

    def _add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        self._runs.append(np.sort(hashes))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            newer = self._runs.pop()
            older = self._runs.pop()
            self._runs.append(np.sort(np.concatenate([older, newer]), kind="mergesort"))

    def mark(self, event_ids: pa.Array, keep: np.ndarray | None = None) -> np.ndarray:
        """Mask of duplicates among ``event_ids``; records the others as seen.

        Args:
            event_ids: ids of one batch, in source order (the first occurrence wins).
            keep: optional mask of rows that are candidates at all (rows already rejected
                for another reason are neither duplicates nor recorded).
        """
        hashes = stable_hash64(event_ids)
        candidates = np.ones(len(hashes), bool) if keep is None else np.asarray(keep, bool)
        duplicate = np.zeros(len(hashes), dtype=bool)
        rows = np.flatnonzero(candidates)
        if len(rows) == 0:
            return duplicate
        h = hashes[rows]
        _, first = np.unique(h, return_index=True)
        repeated = np.ones(len(h), dtype=bool)
        repeated[first] = False
        duplicate[rows] = repeated | self._seen(h)
        self._add(h[~duplicate[rows]])
        return duplicate

    def snapshot(self) -> bytes:
        """The state as immutable bytes (for checkpoints)."""
        return np.sort(np.concatenate(self._runs)).tobytes() if self._runs else b""

    def restore(self, state: bytes) -> None:
        run = np.frombuffer(state, dtype=np.uint64).copy()
        self._runs = [run] if len(run) else []
