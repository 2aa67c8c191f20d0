"""Leave-one-category-out validation of a NAB threshold: how a detector does on series whose
labels it never saw.

NAB picks one threshold per detector and profile over the whole corpus. Scored on the same
series, that number flatters a detector tuned to them. Here each category (``data/<category>``)
is held out in turn: the threshold is swept on the other categories' series only (the
held-out series' labels are not even passed in), then the held-out series are scored at that
threshold. The held-out raw totals add up to a corpus score on the normaliser of the whole
corpus, comparable with the all-in score.

Example:
    >>> # scores = run_detector(corpus, make_detector("cad_ose"))
    >>> # loco = leave_one_category_out(scores, corpus, PROFILES["standard"])
    >>> # loco.normalised, [fold.threshold for fold in loco.folds]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.nab import (
    CostProfile,
    NabCorpus,
    NabScore,
    normalised_score,
    score_at_threshold,
    sweep_threshold,
)

__all__ = ["CategoryFold", "HeldOutScore", "category_of", "leave_one_category_out", "subcorpus"]


@dataclass(frozen=True)
class CategoryFold:
    """One held-out category: the threshold chosen without it, and its score there."""

    category: str
    threshold: float
    held_out: NabScore


@dataclass(frozen=True)
class HeldOutScore:
    """All folds of a leave-one-category-out run, and their total on the whole corpus."""

    profile: str
    folds: tuple[CategoryFold, ...]
    raw: float
    normalised: float


def category_of(name: str) -> str:
    """``"realKnownCause/nyc_taxi.csv"`` -> ``"realKnownCause"``."""
    return name.split("/", 1)[0]


def subcorpus(corpus: NabCorpus, categories: set[str]) -> NabCorpus:
    """The series of the given categories only (labels included: the caller decides who sees
    which part)."""
    return NabCorpus(corpus.root, tuple(s for s in corpus.series if category_of(s.name) in categories))


def choose_threshold(
    scores: Mapping[str, np.ndarray], training: NabCorpus, profile: CostProfile
) -> float:
    """NAB's optimiser on the training series only; scores of other series are ignored."""
    mine = {s.name: scores[s.name] for s in training.series}
    return sweep_threshold(mine, training, profile).threshold


def leave_one_category_out(
    scores: Mapping[str, np.ndarray], corpus: NabCorpus, profile: CostProfile
) -> HeldOutScore:
    """Hold out each category in turn; threshold from the rest, score on it.

    Args:
        scores: per series, the detector's scores (run once with one setting for all).
        corpus: the whole corpus.
        profile: the cost profile.

    Returns:
        The folds and the summed held-out raw score, normalised over the whole corpus.

    Raises:
        ValueError: the corpus has fewer than two categories.
    """
    categories = sorted({category_of(s.name) for s in corpus.series})
    if len(categories) < 2:
        raise ValueError("leave-one-category-out needs at least two categories")
    folds = []
    for held in categories:
        training = subcorpus(corpus, set(categories) - {held})
        threshold = choose_threshold(scores, training, profile)
        test = subcorpus(corpus, {held})
        mine = {s.name: scores[s.name] for s in test.series}
        folds.append(CategoryFold(held, threshold, score_at_threshold(mine, test, profile, threshold)))
    raw = float(sum(f.held_out.raw for f in folds))
    return HeldOutScore(profile.name, tuple(folds), raw,
                        normalised_score(raw, corpus.n_windows, profile))
