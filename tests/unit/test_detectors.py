"""The established detectors (models.detectors): what each one is for, on short series.

The conformance checks they share with every detector (batch splits, snapshots, pickling,
seeds) run in tests/unit/test_anomaly.py.
"""

from __future__ import annotations

import numpy as np

from models.anomaly import make_detector
from models.detectors.contextual import level_facts
from models.detectors.likelihood import likelihood_score
from models.detectors.relative_entropy import chi_square_tail_decades


def one_key(n: int) -> np.ndarray:
    return np.full(n, "k", dtype=object)


def test_contextual_learns_a_repeating_pattern_and_flags_a_new_one() -> None:
    x = np.tile([0.0, 1.0, 2.0, 3.0, 2.0, 1.0], 80)
    x[400:403] = [9.0, 0.0, 9.0]
    scores = make_detector("cad_ose", warmup=30, rest_period=20).score_arrays(one_key(x.size), x)
    assert scores[400] > 0.75  # a new situation, and the expected context did not come
    assert scores[300:400].max() < 0.5  # the learned cycle is not news
    assert scores[401:421].max() == 0.0  # the rest period mutes the rest of the burst


def test_contextual_level_facts_share_bits_between_close_levels() -> None:
    assert set(level_facts(2, 3)) & set(level_facts(3, 3)) == {4, 2 * 1 + 1}
    assert level_facts(9, 3) == (1, 2, 4, 7)  # beyond the warm-up grid: one more bit


def test_contextual_expanding_grid_scores_the_same_in_any_batches() -> None:
    x = np.r_[np.sin(np.arange(200) / 3.0), 5.0, np.sin(np.arange(99) / 3.0)]
    whole = make_detector("cad_ose", grid="expanding", warmup=20).score_arrays(one_key(300), x)
    det = make_detector("cad_ose", grid="expanding", warmup=20)
    parts = [det.score_arrays(one_key(b - a), x[a:b]) for a, b in ((0, 7), (7, 190), (190, 300))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_contextual_rebuild_grid_scores_the_same_in_any_batches_and_after_restore() -> None:
    x = np.r_[np.sin(np.arange(200) / 3.0), 5.0, np.sin(np.arange(99) / 3.0), -4.0, np.zeros(50)]
    params = {"grid": "rebuild", "warmup": 20, "rest_period": 10, "history": 120}
    whole = make_detector("cad_ose", **params).score_arrays(one_key(x.size), x)
    det = make_detector("cad_ose", **params)
    parts = [det.score_arrays(one_key(b - a), x[a:b]) for a, b in ((0, 7), (7, 200), (200, 260))]
    restored = make_detector("cad_ose", **params)
    restored.restore(det.snapshot())  # mid-stream, after two range changes
    parts.append(restored.score_arrays(one_key(x.size - 260), x[260:]))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_contextual_rebuild_grid_flags_a_value_beyond_the_range_on_a_relearned_memory() -> None:
    x = np.tile([0.0, 1.0, 2.0, 3.0, 2.0, 1.0], 80)
    x[400] = 30.0  # the range grows tenfold: the cycle now sits in the lowest levels
    det = make_detector("cad_ose", grid="rebuild", warmup=30, rest_period=20)
    scores = det.score_arrays(one_key(x.size), x)
    assert scores[400] > 0.75 and scores[300:400].max() < 0.5
    # the range it saw, widened by the margin (a tenth of the new span) on the side it grew
    assert dict(det.snapshot()["keys"])["k"]["high"] == 30.0 + 0.1 * 30.0


def test_knn_cad_scores_rows_beyond_every_calibration_value_below_one() -> None:
    x = np.sin(np.arange(500) / 4.0) + np.random.default_rng(0).normal(0, 0.05, 500)
    x[420], x[470] = 2.0, 6.0
    s = make_detector("knn_cad", dim=5, k=5, train=100, calibration=100).score_arrays(one_key(500), x)
    assert min(s[420], s[470]) > 0.99 and s[300:420].mean() < 0.7
    assert max(s[420], s[470]) < 1.0  # beyond every calibration value, yet still ranked


def test_change_point_mass_moves_to_short_runs_after_a_level_shift() -> None:
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, 300), rng.normal(8, 1, 100)]
    s = make_detector("bocpd", warmup=50).score_arrays(one_key(400), x)
    assert s[300] > 0.9 and s[100:300].max() < 0.5


def test_relative_entropy_flags_a_regime_change_once_its_window_fills() -> None:
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, 400), rng.normal(0, 1, 100) * 0.1 + 2.5]
    s = make_detector("relative_entropy", window=30, warmup=100).score_arrays(one_key(500), x)
    assert s[400:430].max() > 2 / 7  # tail below 1 %: learned as a new regime
    assert s[400:430].mean() > s[150:400].mean()


def test_chi_square_tail_never_underflows() -> None:
    assert 2.9 < chi_square_tail_decades(20.52, 5) < 3.1  # 0.1 % point of chi-square(5)
    assert np.isfinite(chi_square_tail_decades(1e6, 5))


def test_likelihood_is_calibrated_to_each_keys_own_score_level() -> None:
    # the same relative jump on a quiet and on a noisy raw score gives the same likelihood
    mu, sigma = np.array([0.1, 0.4]), np.array([0.01, 0.04])
    s = likelihood_score(mu + 4 * sigma, mu, sigma)
    assert abs(s[0] - s[1]) < 1e-12 and 0.3 < s[0] < 0.5


def test_likelihood_reports_a_burst_once_within_its_rest_period() -> None:
    rng = np.random.default_rng(1)
    x = np.sin(np.arange(900) / 6.0) + rng.normal(0, 0.05, 900)
    x[700:704] = 6.0
    det = make_detector("likelihood", inner="robust_zscore", learning=300, rest_period=100,
                        short=1)
    s = det.score_arrays(one_key(900), x)
    assert int(np.argmax(s)) == 700 and np.count_nonzero(s[701:800]) == 0


def test_best_names_the_shipped_ensemble_of_two_nearest_neighbour_detectors() -> None:
    best = make_detector("best")
    assert best.name == "ensemble" and best.params()["members"] == "knn_novelty,knn_cad"
    assert best.params()["combine"] == "min"


def test_ensemble_minimum_needs_every_member_to_find_the_row_novel() -> None:
    x = np.sin(np.arange(400) / 5.0)
    x[300] = 7.0
    members = "robust_zscore,windowed_gaussian"
    lowest = make_detector("ensemble", members=members, rest_period=0).score_arrays(one_key(400), x)
    each = [make_detector(m).score_arrays(one_key(400), x) for m in members.split(",")]
    np.testing.assert_array_equal(lowest, np.minimum(*each))
    mean = make_detector("ensemble", members=members, rest_period=0, combine="mean")
    np.testing.assert_allclose(mean.score_arrays(one_key(400), x), (each[0] + each[1]) / 2)


def test_ensemble_mean_is_reported_at_onsets_only() -> None:
    x = np.sin(np.arange(400) / 5.0)
    x[300:305] = 7.0
    det = make_detector("ensemble", members="robust_zscore,windowed_gaussian", rest_period=50,
                        combine="mean")
    s = det.score_arrays(one_key(400), x)
    assert int(np.argmax(s)) == 300 and np.count_nonzero(s[301:350]) == 0


def test_knn_cad_scores_a_short_series_before_its_calibration_window_fills() -> None:
    x = np.sin(np.arange(400) / 4.0) + np.random.default_rng(0).normal(0, 0.05, 400)
    x[250] = 6.0
    s = make_detector("knn_cad", dim=5, k=5, train=100, calibration=300).score_arrays(one_key(400), x)
    first = int(np.flatnonzero(s)[0])
    assert first < 250 and int(np.argmax(s)) == 250  # 100 calibration values are enough
