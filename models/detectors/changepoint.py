"""Bayesian online change-point detection (Adams and MacKay, "Bayesian Online Changepoint
Detection", 2007), written from the paper.

Each key keeps a posterior over the *run length* ``r`` (rows since the last change point).
Values within a run are Gaussian with unknown mean and variance under a Normal-Gamma prior,
so the predictive of the next value given a run length is a Student t. Per row:

1. predictive probability of ``x_t`` under every run length's posterior parameters;
2. growth: ``P(r_t = r + 1) ∝ P(r_{t-1} = r) p(x_t | r) (1 - H)``; change:
   ``P(r_t = 0) ∝ sum_r P(r_{t-1} = r) p(x_t | r) H`` with the constant hazard ``H = 1 /
   expected_run``;
3. normalise; update each run length's Normal-Gamma parameters with ``x_t``.

Run lengths beyond ``max_run`` are merged into the last one (the usual truncation). The
score is the posterior mass on run lengths shorter than ``recent`` rows: near 0 while the
current regime goes on, near 1 right after the data changed regime.

Values are standardised by the mean and deviation of the key's first ``warmup`` rows (the
prior's scale must be the data's, and a streaming detector only knows what it has seen);
warm-up rows score 0 and are learned once the scale is fixed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from scipy.special import gammaln

from models.anomaly import KeyState, StreamingDetector

__all__ = ["ChangePointDetector"]


class ChangePointDetector(StreamingDetector):
    """Adams-MacKay run-length posterior per key; a Python loop over rows, numpy inside.

    Example:
        >>> d = ChangePointDetector(warmup=50, expected_run=100)
        >>> x = np.r_[np.sin(np.arange(200)), 6.0 + np.sin(np.arange(100))]
        >>> s = d.score_arrays(np.full(300, "k", dtype=object), x)
        >>> 200 <= int(np.argmax(s)) <= 203
        True
    """

    name: ClassVar[str] = "bocpd"

    def __init__(
        self,
        expected_run: float = 250.0,
        max_run: int = 300,
        recent: int = 5,
        warmup: int = 150,
        prior_strength: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if expected_run <= 1 or max_run < recent or recent < 1 or warmup < 2 or prior_strength <= 0:
            raise ValueError("expected_run > 1, max_run >= recent >= 1, warmup >= 2, prior > 0")
        self.expected_run = expected_run
        self.max_run = max_run
        self.recent = recent
        self.warmup = warmup
        self.prior_strength = prior_strength

    def _score_key(
        self, state: KeyState | None, values: np.ndarray, timestamps: np.ndarray | None
    ) -> tuple[np.ndarray, KeyState]:
        state = state or {"buffer": np.zeros(0), "centre": math.nan, "scale": math.nan,
                          "prob": np.ones(1), "mu": np.zeros(1), "kappa": np.ones(1),
                          "alpha": np.ones(1), "beta": np.ones(1)}
        scores = np.zeros(values.size)
        start = 0
        if np.isnan(state["centre"]):
            start = min(values.size, self.warmup - state["buffer"].size)
            state["buffer"] = np.concatenate([state["buffer"], values[:start]])
            if state["buffer"].size == self.warmup:
                state["centre"] = float(state["buffer"].mean())
                state["scale"] = max(float(state["buffer"].std()), 1e-9)
                self._run(state, state["buffer"])
                state["buffer"] = np.zeros(0)
        if start < values.size and not np.isnan(state["centre"]):
            scores[start:] = self._run(state, values[start:])
        return scores, state

    def _run(self, state: KeyState, values: np.ndarray) -> np.ndarray:
        """Update the run-length posterior row by row; the score of each row."""
        z = (values - state["centre"]) / state["scale"]
        prob, mu, kappa, alpha, beta = (state[n] for n in ("prob", "mu", "kappa", "alpha", "beta"))
        hazard = 1.0 / self.expected_run
        k0, a0, b0 = self.prior_strength, 1.0, 1.0
        out = np.empty(z.size)
        for i, x in enumerate(z.tolist()):
            # Student t predictive of x under each run length's Normal-Gamma posterior
            var = beta * (kappa + 1.0) / (alpha * kappa)
            log_pred = (gammaln(alpha + 0.5) - gammaln(alpha) - 0.5 * np.log(2.0 * math.pi * alpha * var)
                        - (alpha + 0.5) * np.log1p((x - mu) ** 2 / (2.0 * alpha * var)))
            joint = prob * np.exp(log_pred - log_pred.max())
            grown = np.concatenate([[hazard * joint.sum()], joint * (1.0 - hazard)])
            new_mu = np.concatenate([[0.0], (kappa * mu + x) / (kappa + 1.0)])
            new_beta = np.concatenate([[b0], beta + kappa * (x - mu) ** 2 / (2.0 * (kappa + 1.0))])
            new_kappa = np.concatenate([[k0], kappa + 1.0])
            new_alpha = np.concatenate([[a0], alpha + 0.5])
            if grown.size > self.max_run + 1:  # merge the oldest run lengths (truncation)
                grown[-2] += grown[-1]
                grown, new_mu, new_kappa, new_alpha, new_beta = (
                    a[:-1] for a in (grown, new_mu, new_kappa, new_alpha, new_beta))
            prob = grown / grown.sum()
            mu, kappa, alpha, beta = new_mu, new_kappa, new_alpha, new_beta
            out[i] = prob[: self.recent].sum()
        state.update(prob=prob, mu=mu, kappa=kappa, alpha=alpha, beta=beta)
        return out
