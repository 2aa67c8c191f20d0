"""An ensemble of detectors: their scores combined, reported at the onset of a burst.

Per key and row, every member scores the row (each with its own defaults and the
ensemble's seed); the ensemble's raw score is their minimum (``combine="min"``, default) or
their mean (``"mean"``), and a row keeps it only if it exceeds every raw score of the key's
previous ``rest_period`` rows (a burst reports once, at its onset, as CAD OSE's and NAB's
better detectors do).

Why the minimum: a row scores high only if every member finds it novel, so one corpus-wide
threshold asks for agreement. Two detectors that err on different rows rarely err together:
a false positive of one member (knn_novelty's reaction to a small shift in a quiet series,
knn_cad's to noise) is vetoed by the other, while a real anomaly usually moves both. On the
18 local NAB series, ``min(knn_novelty, knn_cad)`` scores 64.2 all in and 59.9 on held-out
categories (standard profile), the mean 58.5 / 54.8, and the threshold NAB's optimiser picks
for the minimum hardly moves with the category held out (0.535 to 0.549). See the README's
NAB section for every candidate's scores.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from models.anomaly import KeyState, StreamingDetector, _previous_max, make_detector

__all__ = ["COMBINE", "EnsembleDetector"]

#: How member scores become the ensemble's raw score.
COMBINE = {"min": np.min, "mean": np.mean}


class EnsembleDetector(StreamingDetector):
    """Minimum (or mean) of member detectors' scores, kept only at the onset of a burst.

    Example:
        >>> d = EnsembleDetector(members="robust_zscore,windowed_gaussian", rest_period=50,
        ...                      combine="mean")
        >>> x = np.sin(np.arange(300) / 5.0); x[250] = 6.0
        >>> s = d.score_arrays(np.full(300, "k", dtype=object), x)
        >>> int(np.argmax(s)), int(np.count_nonzero(s[251:300]))
        (250, 0)
    """

    name: ClassVar[str] = "ensemble"

    def __init__(
        self,
        members: str = "knn_novelty,knn_cad",
        rest_period: int = 800,
        combine: str = "min",
        seed: int = 0,
    ) -> None:
        super().__init__(seed)

        names = [m.strip() for m in members.split(",") if m.strip()]
        if not names or rest_period < 0:
            raise ValueError("members must name at least one detector; rest_period >= 0")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {sorted(COMBINE)}")
        self.combine = combine
        self.members = members
        self.rest_period = rest_period
        self._members = [make_detector(name, seed=seed) for name in names]

    def score_arrays(
        self, keys: np.ndarray, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        member_scores = [m.score_arrays(keys, values, timestamps) for m in self._members]
        raw = COMBINE[self.combine](member_scores, axis=0)
        return super().score_arrays(keys, raw, timestamps)

    def _score_key(
        self, state: KeyState | None, values: np.ndarray, timestamps: np.ndarray | None
    ) -> tuple[np.ndarray, KeyState]:
        recent = state["recent"] if state else np.zeros(0)
        if not self.rest_period:
            return values, {"recent": recent}
        onset = values > _previous_max(values, recent, self.rest_period)
        recent = np.concatenate([recent, values])[-self.rest_period :].copy()
        return np.where(onset, values, 0.0), {"recent": recent}

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "members": tuple(m.snapshot() for m in self._members)}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        super().restore(snapshot)
        for member, state in zip(self._members, snapshot["members"], strict=True):
            member.restore(state)

    def forget(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        super().forget(keys)
        for member in self._members:
            member.forget(keys)
