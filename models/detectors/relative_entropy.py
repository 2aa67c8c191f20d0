"""Relative-entropy detector (Wang, Talwar, Schwan and Eriksson, "Statistical techniques for
online anomaly detection in data centers", 2011; as NAB describes its version), written from
those descriptions.

Per key, the values of the last ``window`` rows form a histogram over ``bins`` equal bins
(plus one below and one above the grid, so values outside it stay distinct). The detector
keeps *sub-models*: histograms of regimes seen before. For a new window ``P`` and each
sub-model ``Q`` the statistic ``2 W KL(P || Q)`` is, under "P comes from Q", chi-square with
``bins + 1`` degrees of freedom. The smallest statistic's tail probability ``q`` (the
p-value of the best-matching regime; Wilson-Hilferty's normal approximation, which does
not underflow) gives the score ``t / (t + 5)`` with ``t = -log10 q``: 0.5 at ``q = 1e-5``,
and unlike ``1 - q`` it never rounds to 1, so one threshold still ranks extreme windows.
When ``q`` is below ``significance`` the window matches no known regime and becomes a new
sub-model (at most ``max_models``; beyond that the least matched is replaced).

The grid is fixed by the key's first ``warmup`` rows (their range), since a streaming
detector cannot know a file's minimum and maximum; those rows score 0.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from scipy.special import log_ndtr

from models.anomaly import KeyState, StreamingDetector

__all__ = ["RelativeEntropyDetector"]

SMOOTHING = 1e-3  # probability floor per bin, so KL stays finite


class RelativeEntropyDetector(StreamingDetector):
    """Histogram regimes compared by relative entropy; a Python loop over rows, numpy inside.

    Example:
        >>> d = RelativeEntropyDetector(window=20, warmup=40)
        >>> x = np.r_[np.tile([0.0, 1.0], 100), np.full(40, 5.0)]
        >>> s = d.score_arrays(np.full(240, "k", dtype=object), x)
        >>> 200 <= int(np.argmax(s)) < 220
        True
    """

    name: ClassVar[str] = "relative_entropy"

    def __init__(
        self,
        window: int = 52,
        bins: int = 5,
        significance: float = 0.01,
        warmup: int = 150,
        max_models: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if window < 2 or bins < 1 or not 0 < significance < 1 or warmup < window or max_models < 1:
            raise ValueError("window >= 2, bins >= 1, 0 < significance < 1, warmup >= window")
        self.window = window
        self.bins = bins
        self.significance = significance
        self.warmup = warmup
        self.max_models = max_models

    def _score_key(
        self, state: KeyState | None, values: np.ndarray, timestamps: np.ndarray | None
    ) -> tuple[np.ndarray, KeyState]:
        state = state or {"recent": np.zeros(0, np.int64), "buffer": np.zeros(0),
                          "low": math.nan, "width": math.nan,
                          "models": np.zeros((0, self.bins + 2)), "matches": np.zeros(0)}
        scores = np.zeros(values.size)
        start = 0
        if np.isnan(state["low"]):
            start = min(values.size, self.warmup - state["buffer"].size)
            state["buffer"] = np.concatenate([state["buffer"], values[:start]])
            if state["buffer"].size == self.warmup:
                low, high = float(state["buffer"].min()), float(state["buffer"].max())
                state["low"], state["width"] = low, (high - low) / self.bins if high > low else 1.0
                self._run(state, state["buffer"])
                state["buffer"] = np.zeros(0)
        if start < values.size and not np.isnan(state["low"]):
            scores[start:] = self._run(state, values[start:])
        return scores, state

    def _bin_of(self, state: KeyState, values: np.ndarray) -> np.ndarray:
        """Bin 0: below the grid, 1..bins: the grid, bins + 1: above it."""
        at = np.floor((values - state["low"]) / state["width"]) + 1
        return np.clip(at, 0, self.bins + 1).astype(np.int64)

    def _run(self, state: KeyState, values: np.ndarray) -> np.ndarray:
        """Score each row's window against the sub-models, learning new ones."""
        bins = np.concatenate([state["recent"], self._bin_of(state, values)])
        one_hot = np.zeros((bins.size + 1, self.bins + 2))
        one_hot[np.arange(1, bins.size + 1), bins] = 1.0
        counts = np.cumsum(one_hot, axis=0)  # integer counts: exact in float64
        ends = np.arange(bins.size - values.size, bins.size) + 1
        hist = counts[ends] - counts[np.maximum(ends - self.window, 0)]
        full = ends >= self.window
        models, matches = state["models"], state["matches"]
        dof = self.bins + 1
        new_regime = -math.log10(self.significance)  # decades of the tail
        out = np.zeros(values.size)
        for i in np.flatnonzero(full).tolist():
            p = (hist[i] + SMOOTHING) / (self.window + SMOOTHING * hist.shape[1])
            decades = math.inf
            if models.shape[0]:
                kl = (p * (np.log(p) - np.log(models))).sum(axis=1)
                best = int(np.argmin(kl))
                decades = chi_square_tail_decades(2.0 * self.window * float(kl[best]), dof)
            out[i] = 1.0 if math.isinf(decades) else decades / (decades + 5.0)
            if decades > new_regime:
                models, matches = _add_model(models, matches, p, self.max_models)
            else:
                matches[best] += 1
        state["recent"] = bins[-(self.window - 1) :].copy()
        state["models"], state["matches"] = models, matches
        return out


def chi_square_tail_decades(statistic: float, dof: int) -> float:
    """``-log10 P(X >= statistic)`` for ``X`` chi-square with ``dof`` degrees of freedom,
    by Wilson-Hilferty's cube-root normal approximation (finite for any statistic).

    Example:
        >>> round(chi_square_tail_decades(15.09, 5), 1)  # the 1 % point of chi-square(5)
        2.0
    """
    k = float(dof)
    z = ((max(statistic, 0.0) / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))
    return float(-log_ndtr(-z) / math.log(10.0))


def _add_model(
    models: np.ndarray, matches: np.ndarray, p: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Append a sub-model, replacing the least matched (the oldest among ties) when full."""
    if models.shape[0] < limit:
        return np.vstack([models, p]), np.append(matches, 0.0)
    worst = int(np.argmin(matches))
    models, matches = models.copy(), matches.copy()
    models[worst], matches[worst] = p, 0.0
    return models, matches
