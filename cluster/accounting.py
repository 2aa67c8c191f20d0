"""The run's counters, and the check that nothing was lost or doubled."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.errors import AccountingError


@dataclass
class RunCounts:
    """Counters of one run; ``read + derived == stored + dead_lettered + filtered`` at the end.

    ``sent`` rows went to the keyed partitions; each was stored, or dead-lettered there as a
    poison event (``poisoned``, part of ``dead_lettered``).
    """

    read: int = 0
    stored: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    filtered: int = 0
    sent: int = 0
    derived: int = 0
    alerts: int = 0
    hop_limited: int = 0
    poisoned: int = 0
    batches: int = 0
    checkpoints: int = 0
    restarts: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    #: the steps' own counters (``StepOutput.counters``), for the summary
    steps: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        produced = self.read + self.derived
        balanced = produced == self.stored + self.dead_lettered + self.filtered
        if not balanced or self.sent != self.stored + self.poisoned:
            raise AccountingError(self.numbers())

    def numbers(self) -> dict[str, int]:
        """Every counter but ``reasons`` (what a checkpoint records besides them); the
        steps' own counters as one mapping, ``steps``."""
        return {k: v for k, v in asdict(self).items() if k != "reasons"}

    def count_dead_letters(self, reasons: np.ndarray) -> None:
        """Add one batch's dead letters, by reason code."""
        self.dead_lettered += len(reasons)
        if len(reasons):
            codes, n = np.unique(reasons, return_counts=True)
            for reason, k in zip(codes.tolist(), n.tolist(), strict=True):
                self.reasons[reason] = self.reasons.get(reason, 0) + k

    def count_reasons(self, reasons: dict[str, int]) -> None:
        """Add dead letters counted by reason code elsewhere (a partition's receipt)."""
        for reason, n in reasons.items():
            self.dead_lettered += n
            self.reasons[reason] = self.reasons.get(reason, 0) + n


class Latencies:
    """Ingest-to-store latency per acknowledged batch, weighted by its rows (the receipts
    themselves are not kept: a long run acknowledges millions of batches)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.rows: list[int] = []

    def add(self, seconds: float, rows: int) -> None:
        self.seconds.append(seconds)
        self.rows.append(rows)

    def percentiles(self, qs: list[float]) -> list[float]:
        return weighted_percentiles(np.array(self.seconds, float), np.array(self.rows, float), qs)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: list[float]) -> list[float]:
    """Percentiles of ``values`` where each counts ``weights`` times."""
    if len(values) == 0 or weights.sum() == 0:
        return [0.0 for _ in qs]
    order = np.argsort(values)
    cum = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][min(np.searchsorted(cum, q / 100), len(cum) - 1)]) for q in qs]
