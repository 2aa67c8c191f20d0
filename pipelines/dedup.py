"""Exactly-once by event id: the filter that recognises an event seen before.

A re-read file, a producer retry or a replay after recovery brings events whose ids were
already stored; they go to the dead-letter store as ``duplicate_event_id`` instead of
being stored twice. The state is the sorted array of 64-bit FNV-1a hashes of the ids
stored so far (8 bytes per event), checked and extended per batch with numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.hashing import fnv1a64


class DuplicateFilter:
    """Remembers stored event ids; marks repeats within and across batches.

    Example:
        >>> f = DuplicateFilter()
        >>> f.mark(pa.array(["a", "b", "a"])).tolist()
        [False, False, True]
        >>> f.mark(pa.array(["b", "c"])).tolist()
        [True, False]
    """

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._seen)

    def mark(self, event_ids: pa.Array, keep: np.ndarray | None = None) -> np.ndarray:
        """Mask of duplicates among ``event_ids``; records the others as seen.

        Args:
            event_ids: ids of one batch, in source order (the first occurrence wins).
            keep: optional mask of rows that are candidates at all (rows already rejected
                for another reason are neither duplicates nor recorded).
        """
        hashes = fnv1a64(event_ids)
        candidates = np.ones(len(hashes), bool) if keep is None else np.asarray(keep, bool)
        duplicate = np.zeros(len(hashes), dtype=bool)
        rows = np.flatnonzero(candidates)
        if len(rows) == 0:
            return duplicate
        h = hashes[rows]
        _, first = np.unique(h, return_index=True)
        repeated = np.ones(len(h), dtype=bool)
        repeated[first] = False
        position = np.searchsorted(self._seen, h)
        seen = (position < len(self._seen)) & (
            self._seen[np.minimum(position, len(self._seen) - 1)] == h
        ) if len(self._seen) else np.zeros(len(h), dtype=bool)
        duplicate[rows] = repeated | seen
        self._seen = np.union1d(self._seen, h[~duplicate[rows]])
        return duplicate

    def snapshot(self) -> bytes:
        """The state as immutable bytes (for checkpoints)."""
        return self._seen.tobytes()

    def restore(self, state: bytes) -> None:
        self._seen = np.frombuffer(state, dtype=np.uint64).copy()
