"""KNN CAD: conformalised k-nearest-neighbour anomaly detection (Burnaev and Ishimtsev,
"Conformalized density- and distance-based anomaly detection in time-series data", 2016),
written from the paper's and NAB's description.

Per row ``t`` of a key:

1. the *embedding* ``e_t`` is the last ``dim`` values (a time-delay vector);
2. the *non-conformity* ``a_t`` is the mean distance from ``e_t`` to its ``k`` nearest
   neighbours among the ``train`` embeddings that end at least ``dim`` rows earlier (so
   they do not overlap ``e_t``);
3. the score is the conformal rank of ``a_t`` among the non-conformities of the previous
   ``calibration`` rows, ``(below + a_t / (a_t + max)) / (calibration + 1)`` with ``below``
   the number of them under ``a_t`` and ``max`` the largest. The second term is ours: the
   plain rank gives every row beyond all calibration values the same score 1, so one
   corpus-wide threshold could not tell a small excess from a huge one.

A row scores 0 until its key has ``k`` embeddings to compare with and ``min(calibration,
100)`` calibration values (the rank among a handful of past values would be noise); until
the calibration window fills, the rank is among the values there are.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from models.anomaly import KeyState, StreamingDetector

__all__ = ["KnnCadDetector"]

# rows need this many calibration values before they are ranked: enough for a rank to mean
# something, few enough that a short series (a thousand rows or so) is scored after its
# first couple of hundred rows rather than after a full calibration window
MIN_CALIBRATION = 100


class KnnCadDetector(StreamingDetector):
    """Conformal k-NN detector; vectorised over blocks of a key's rows.

    Example:
        >>> d = KnnCadDetector(dim=5, k=5, train=100, calibration=100)
        >>> x = np.sin(np.arange(400) / 4.0); x[350] = 4.0
        >>> s = d.score_arrays(np.full(400, "k", dtype=object), x)
        >>> int(np.argmax(s[200:])) + 200, bool(s[350] < 1.0)
        (350, True)
    """

    name: ClassVar[str] = "knn_cad"
    block: ClassVar[int] = 256  # rows per distance matrix

    def __init__(
        self, dim: int = 19, k: int = 27, train: int = 300, calibration: int = 300, seed: int = 0
    ) -> None:
        super().__init__(seed)
        if min(dim, k, calibration) < 1 or train < k:
            raise ValueError("dim, k and calibration must be >= 1, and train >= k")
        self.dim = dim
        self.k = k
        self.train = train
        self.calibration = calibration

    def _score_key(
        self, state: KeyState | None, values: np.ndarray, timestamps: np.ndarray | None
    ) -> tuple[np.ndarray, KeyState]:
        state = state or {"values": np.zeros(0), "ncm": np.zeros(0), "seen": 0}
        x = np.concatenate([state["values"], values])
        start = state["seen"] - state["values"].size  # key row number of x[0]
        new = np.arange(x.size - values.size, x.size)
        ncm = self._nonconformity(x, new, start)
        history = np.concatenate([state["ncm"], ncm])
        scores = _conformal_rank(ncm, state["ncm"], self.calibration)
        new_state = {
            "values": x[-(self.train + 2 * self.dim) :].copy(),
            "ncm": history[~np.isnan(history)][-self.calibration :].copy(),
            "seen": int(state["seen"] + values.size),
        }
        return scores, new_state

    def _nonconformity(self, x: np.ndarray, new: np.ndarray, start: int) -> np.ndarray:
        """Mean distance to the ``k`` nearest earlier embeddings; NaN while too few exist."""
        out = np.full(new.size, np.nan)
        if x.size < self.dim:
            return out
        emb = np.lib.stride_tricks.sliding_window_view(x, self.dim)  # emb[j] ends at x[j+dim-1]
        end = new - self.dim + 1  # embedding index of each new row (negative: incomplete)
        for lo in range(0, new.size, self.block):
            q = end[lo : lo + self.block]
            last = q - self.dim  # newest neighbour: ends dim rows before the query
            first = np.maximum(last - self.train + 1, 0)
            ok = (q >= 0) & (last - first + 1 >= self.k) & (start + q >= 0)
            if not ok.any():
                continue
            q, first, last = q[ok], first[ok], last[ok]
            c0, c1 = int(first.min()), int(last.max()) + 1
            cand = np.arange(c0, c1)[None, :]
            dist = np.sqrt(np.square(emb[q][:, None, :] - emb[c0:c1][None, :, :]).sum(axis=-1))
            dist = np.where((cand >= first[:, None]) & (cand <= last[:, None]), dist, np.inf)
            nearest = np.sort(np.partition(dist, self.k - 1, axis=1)[:, : self.k], axis=1)
            out[np.flatnonzero(ok) + lo] = nearest.mean(axis=1)
        return out


def _conformal_rank(ncm: np.ndarray, history: np.ndarray, width: int) -> np.ndarray:
    """Share of the previous ``width`` (defined) non-conformities below each new one."""
    defined = np.concatenate([history, ncm[~np.isnan(ncm)]])
    scores = np.zeros(ncm.size)
    at = np.flatnonzero(~np.isnan(ncm))  # position j in `defined`: history.size + rank
    pos = history.size + np.arange(at.size)
    for lo in range(0, at.size, 1024):
        p = pos[lo : lo + 1024]
        idx = p[:, None] - width + np.arange(width)[None, :]
        valid = idx >= 0
        count = valid.sum(axis=1)
        past = np.where(valid, defined[np.maximum(idx, 0)], -np.inf)
        a = defined[p]
        below = (past < a[:, None]).sum(axis=1) - (width - count)  # -inf pads are not below
        largest = np.where(count > 0, past.max(axis=1), 0.0)
        margin = a / np.maximum(a + largest, 1e-300)
        ready = count >= min(width, MIN_CALIBRATION)
        scores[at[lo : lo + 1024]] = np.where(ready, (below + margin) / (count + 1), 0.0)
    return scores
