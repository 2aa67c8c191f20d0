"""Anomaly likelihood: a raw score turned into how unusual it is for this key (Ahmad, Lavin,
Purdy and Agha, "Unsupervised real-time anomaly detection for streaming data",
Neurocomputing 2017), written from the paper's description.

Per key, with ``s_t`` the inner detector's raw score:

1. ``m_t``: the mean of the last ``short`` raw scores (a short moving average, so one noisy
   raw score does not alarm on its own);
2. ``mu``, ``sigma``: mean and standard deviation of the previous ``history`` short means,
   re-estimated every ``reestimate`` rows (sigma floored at ``min_std``);
3. likelihood ``L_t = 1 - Q((m_t - mu) / sigma)`` with ``Q`` the Gaussian tail;
4. the reported score is ``t / (t + 5)`` with ``t = -log10(1 - L_t)``, the tail's order of
   magnitude (a log scale as Numenta's detector reports, so ``L = 1 - 1e-5`` is 0.5; it never
   saturates, so one corpus-wide threshold still ranks extreme rows);
5. optionally a rest period: a row keeps its score only if it exceeds every score of the
   key's previous ``rest_period`` rows (a burst reports once, at its onset).

Rows before ``learning`` rows of a key score 0. Because ``L`` is measured against the key's
own score distribution, one threshold means "this rare" on every series, which is what lets
a corpus-wide threshold transfer to series never seen.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
from scipy.special import log_ndtr

from models.anomaly import KeyState, StreamingDetector, _previous_max, make_detector

__all__ = ["LikelihoodDetector", "likelihood_score"]

HALF_AT_DECADES = 5.0  # the tail of 1e-5 maps to 0.5


def likelihood_score(short_mean: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Log-scaled anomaly likelihood of short-term means against ``(mu, sigma)``.

    Example:
        >>> s = likelihood_score(np.array([0.1, 0.9]), np.array([0.1, 0.1]), np.array([0.1, 0.1]))
        >>> round(float(s[0]), 3), round(float(s[1]), 3)
        (0.057, 0.753)
    """
    decades = -log_ndtr(-(short_mean - mu) / sigma) / math.log(10.0)
    return decades / (decades + HALF_AT_DECADES)


class LikelihoodDetector(StreamingDetector):
    """Another detector's raw score, post-processed into its anomaly likelihood.

    Example:
        >>> d = LikelihoodDetector(inner="robust_zscore", learning=100, history=300)
        >>> x = np.sin(np.arange(600) / 5.0); x[500] = 8.0
        >>> s = d.score_arrays(np.full(600, "k", dtype=object), x)
        >>> int(np.argmax(s))
        500
    """

    name: ClassVar[str] = "likelihood"

    def __init__(
        self,
        inner: str = "knn_novelty",
        short: int = 10,
        history: int = 8640,
        learning: int = 300,
        reestimate: int = 100,
        min_std: float = 1e-3,
        rest_period: int = 800,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if min(short, history, reestimate) < 1 or learning < 2 or min_std <= 0:
            raise ValueError("windows must be >= 1, learning >= 2 and min_std > 0")
        self.inner = inner
        self.short = short
        self.history = history
        self.learning = learning
        self.reestimate = reestimate
        self.min_std = min_std
        self.rest_period = rest_period

        self._inner = make_detector(inner, seed=seed)

    def score_arrays(
        self, keys: np.ndarray, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        raw = self._inner.score_arrays(keys, values, timestamps)
        return super().score_arrays(keys, raw, timestamps)

    def _score_key(
        self, state: KeyState | None, values: np.ndarray, timestamps: np.ndarray | None
    ) -> tuple[np.ndarray, KeyState]:
        state = state or {"raw": np.zeros(0), "means": np.zeros(0), "seen": 0,
                          "mu": 0.0, "sigma": 1.0,
                          "recent": np.zeros(0)}
        raw = np.concatenate([state["raw"], values])
        padded = np.concatenate([np.full(self.short - 1, np.nan), raw])
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.short)[-values.size:]
        short_mean = np.nanmean(windows, axis=1)
        means = np.concatenate([state["means"], short_mean])
        first = means.size - values.size  # position of the first new row in `means`
        rows = state["seen"] + np.arange(values.size)
        refresh = (rows >= self.learning) & ((rows % self.reestimate == 0) | (rows == self.learning))
        at = np.flatnonzero(refresh)
        stats = np.array([(state["mu"], state["sigma"])] + [self._estimate(means, first + i) for i in at])
        # each row takes the statistics of its latest re-estimation (slot 0: the stored ones)
        slot = np.zeros(values.size, dtype=np.int64)
        slot[at] = np.arange(1, at.size + 1)
        slot = np.maximum.accumulate(slot) if slot.size else slot
        mu, sigma = stats[slot, 0], stats[slot, 1]
        current = (float(stats[-1, 0]), float(stats[-1, 1]))
        scores = np.where(rows >= self.learning, likelihood_score(short_mean, mu, sigma), 0.0)
        recent = state["recent"]
        if self.rest_period:
            onset = scores > _previous_max(scores, recent, self.rest_period)
            recent = np.concatenate([recent, scores])[-self.rest_period :].copy()
            scores = np.where(onset, scores, 0.0)
        new_state = {
            "raw": raw[-(self.short - 1) :].copy() if self.short > 1 else np.zeros(0),
            "means": means[-self.history :].copy(),
            "seen": int(state["seen"] + values.size),
            "mu": current[0],
            "sigma": current[1],
            "recent": recent,
        }
        return scores, new_state

    def _estimate(self, means: np.ndarray, position: int) -> tuple[float, float]:
        """Mean and (floored) deviation of the ``history`` short means before ``position``."""
        past = means[max(0, position - self.history) : position]
        return float(past.mean()), max(float(past.std()), self.min_std)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "inner": self._inner.snapshot()}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        super().restore(snapshot)
        self._inner.restore(snapshot["inner"])

    def forget(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        super().forget(keys)
        self._inner.forget(keys)
