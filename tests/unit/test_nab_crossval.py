"""Leave-one-category-out: thresholds chosen without the held-out category's labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.nab import PROFILES, NabCorpus, NabSeries, normalised_score, score_at_threshold
from models.nab_crossval import choose_threshold, leave_one_category_out, subcorpus

STANDARD = PROFILES["standard"]
T0 = np.datetime64("2014-04-01T00:00", "us")
N = 400


def series(name: str, window: tuple[int, int] | None) -> NabSeries:
    ts = T0 + np.arange(N) * np.timedelta64(5, "m")
    windows = () if window is None else ((ts[window[0]], ts[window[1]]),)
    return NabSeries(name, ts.astype(str), ts, np.zeros(N), windows)


def corpus(held_window: tuple[int, int] = (300, 340)) -> NabCorpus:
    return NabCorpus(Path("."), (
        series("a/one.csv", (200, 240)), series("a/two.csv", (250, 290)),
        series("b/one.csv", (150, 190)), series("c/one.csv", held_window),
    ))


def scores() -> dict[str, np.ndarray]:
    """A detector that fires at 0.9 inside the a/b windows and 0.6 early in c's window."""
    out = {name: np.zeros(N) for name in ("a/one.csv", "a/two.csv", "b/one.csv", "c/one.csv")}
    out["a/one.csv"][205] = out["a/two.csv"][255] = out["b/one.csv"][155] = 0.9
    out["a/one.csv"][100] = 0.6  # a false positive in training at the score c's hit has
    out["c/one.csv"][305] = 0.6
    return out


def test_held_out_labels_never_move_the_threshold() -> None:
    here = leave_one_category_out(scores(), corpus((300, 340)), STANDARD)
    moved = leave_one_category_out(scores(), corpus((100, 140)), STANDARD)
    fold = {f.category: f for f in here.folds}
    fold_moved = {f.category: f for f in moved.folds}
    assert fold["c"].threshold == fold_moved["c"].threshold == 0.9  # from a and b only
    assert fold["c"].held_out.detected == 0  # 0.6 at c's window is below the training threshold


def test_choose_threshold_reads_only_the_training_series() -> None:
    training = subcorpus(corpus(), {"a", "b"})
    poisoned = {**scores(), "c/one.csv": np.full(3, np.nan)}  # never looked at
    assert choose_threshold(poisoned, training, STANDARD) == 0.9


def test_folds_add_up_to_one_corpus_score() -> None:
    loco = leave_one_category_out(scores(), corpus(), STANDARD)
    assert [f.category for f in loco.folds] == ["a", "b", "c"]
    raw = sum(f.held_out.raw for f in loco.folds)
    assert loco.raw == pytest.approx(raw)
    assert loco.normalised == pytest.approx(normalised_score(raw, 4, STANDARD))
    held = {f.category: f for f in loco.folds}
    direct = score_at_threshold({"b/one.csv": scores()["b/one.csv"]}, subcorpus(corpus(), {"b"}),
                                STANDARD, held["b"].threshold)
    assert held["b"].held_out == direct


def test_one_category_cannot_be_held_out() -> None:
    only_a = replace(corpus(), series=corpus().series[:2])
    with pytest.raises(ValueError, match="two categories"):
        leave_one_category_out(scores(), only_a, STANDARD)
