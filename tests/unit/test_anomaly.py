"""Streaming anomaly detectors: the conformance checks every detector passes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.anomaly import (
    DETECTORS,
    DetectorStateError,
    KnnNoveltyDetector,
    RobustZScoreDetector,
    StreamingDetector,
    ThresholdPolicy,
    UnknownDetectorError,
    WindowedGaussianDetector,
    make_detector,
)

SMALL = {  # small windows so every mechanism (warm-up, refresh, rest period) is exercised
    "windowed_gaussian": {"window": 40},
    "robust_zscore": {"window": 40, "step": 3},
    "knn_novelty": {
        "memory": 150, "shape_memory": 90, "calibration": 60, "refractory": 25, "min_history": 20,
    },
    "cad_ose": {"warmup": 30, "rest_period": 20},
    "knn_cad": {"dim": 4, "k": 5, "train": 40, "calibration": 30},
    "bocpd": {"warmup": 30, "expected_run": 50.0, "max_run": 60},
    "relative_entropy": {"window": 12, "bins": 4, "warmup": 30},
    "likelihood": {
        "inner": "robust_zscore", "short": 1, "history": 80, "learning": 40, "reestimate": 10,
        "rest_period": 15,
    },
    "ensemble": {"members": "robust_zscore,windowed_gaussian", "rest_period": 15},
}


def fresh(name: str, seed: int = 0) -> StreamingDetector:
    return make_detector(name, seed=seed, **SMALL[name])


def series(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 10.0 * np.sin(np.arange(n) / 7.0) + rng.normal(0.0, 1.0, n)
    x[rng.choice(n, 5, replace=False)] += 25.0
    return x


def keyed(n: int, keys: tuple[str, ...] = ("a", "b", "c"), seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows of several keys, interleaved at random, each key with its own series."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, len(keys), n)
    values = np.empty(n)
    for k in range(len(keys)):
        values[owner == k] = series(int((owner == k).sum()), seed=seed + k)
    return np.array(keys, dtype=object)[owner], values


def in_batches(det: StreamingDetector, keys: np.ndarray, values: np.ndarray, cuts: list[int]) -> np.ndarray:
    bounds = [0, *sorted(set(cuts)), len(values)]
    pairs = zip(bounds, bounds[1:], strict=False)
    return np.concatenate([det.score_arrays(keys[a:b], values[a:b]) for a, b in pairs])


names = pytest.mark.parametrize("name", sorted(DETECTORS))


def test_registry_lists_every_detector() -> None:
    assert set(DETECTORS) == {
        "windowed_gaussian", "robust_zscore", "knn_novelty", "cad_ose", "knn_cad", "bocpd",
        "relative_entropy", "likelihood", "ensemble",
    }
    assert DETECTORS["knn_novelty"] is KnnNoveltyDetector


def test_unknown_name_error_lists_allowed_names() -> None:
    with pytest.raises(UnknownDetectorError) as info:
        make_detector("isolation_forest")
    assert "knn_novelty" in str(info.value) and "robust_zscore" in str(info.value)
    assert isinstance(info.value, KeyError) and info.value.allowed == tuple(sorted(DETECTORS))


@names
def test_constructor_arguments_are_attributes(name: str) -> None:
    det = make_detector(name, seed=7, **SMALL[name])
    assert det.seed == 7
    for arg, value in SMALL[name].items():
        assert getattr(det, arg) == value
    assert det.params()["seed"] == 7


@names
def test_scores_lie_in_unit_interval_one_per_row(name: str) -> None:
    keys, values = keyed(600)
    scores = fresh(name).score_arrays(keys, values)
    assert scores.shape == values.shape
    assert np.all((scores >= 0.0) & (scores <= 1.0)) and np.all(np.isfinite(scores))


@names
@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=120))
def test_scores_in_unit_interval_for_any_values(name: str, values: list[float]) -> None:
    scores = fresh(name).score_arrays(np.full(len(values), "k", dtype=object), np.array(values))
    assert np.all((scores >= 0.0) & (scores <= 1.0))


@names
@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(1, 399), max_size=8))
def test_any_batch_split_equals_one_big_batch(name: str, cuts: list[int]) -> None:
    keys, values = keyed(400)
    whole = fresh(name).score_arrays(keys, values)
    np.testing.assert_array_equal(in_batches(fresh(name), keys, values, cuts), whole)


@names
def test_row_by_row_equals_one_big_batch(name: str) -> None:
    keys, values = keyed(250)
    whole = fresh(name).score_arrays(keys, values)
    np.testing.assert_array_equal(in_batches(fresh(name), keys, values, list(range(1, 250))), whole)


@names
def test_interleaved_keys_do_not_contaminate_each_other(name: str) -> None:
    keys, values = keyed(500)
    together = fresh(name).score_arrays(keys, values)
    for key in ("a", "b", "c"):
        mine = keys == key
        alone = fresh(name).score_arrays(keys[mine], values[mine])
        np.testing.assert_array_equal(together[mine], alone)


@names
def test_snapshot_restore_round_trip_mid_stream(name: str) -> None:
    keys, values = keyed(500)
    reference = fresh(name).score_arrays(keys, values)
    first = fresh(name)
    first.score_arrays(keys[:230], values[:230])
    plain = json.loads(json.dumps(first.snapshot()))  # plain data survives JSON
    second = fresh(name)
    second.restore(plain)
    np.testing.assert_array_equal(second.score_arrays(keys[230:], values[230:]), reference[230:])
    assert sorted(second.keys) == ["a", "b", "c"]


@names
def test_restore_refuses_another_detectors_snapshot(name: str) -> None:
    det = fresh(name)
    det.score_arrays(np.array(["k"], dtype=object), np.array([1.0]))
    other = make_detector(name, seed=99, **SMALL[name])
    with pytest.raises(DetectorStateError):
        other.restore(det.snapshot())
    wrong = {**det.snapshot(), "detector": "something_else"}
    with pytest.raises(DetectorStateError):
        fresh(name).restore(wrong)


@names
def test_picklable_mid_stream(name: str) -> None:
    keys, values = keyed(400)
    reference = fresh(name).score_arrays(keys, values)
    det = fresh(name)
    det.score_arrays(keys[:150], values[:150])
    clone = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(clone.score_arrays(keys[150:], values[150:]), reference[150:])


@names
def test_deterministic_under_a_seed(name: str) -> None:
    keys, values = keyed(400)
    a = make_detector(name, seed=3, **SMALL[name]).score_arrays(keys, values)
    b = make_detector(name, seed=3, **SMALL[name]).score_arrays(keys, values)
    np.testing.assert_array_equal(a, b)


@names
def test_accepts_arrow_and_polars_batches_with_timestamps(name: str) -> None:
    keys, values = keyed(120)
    stamps = np.arange(120).astype("datetime64[s]").astype("datetime64[us]")
    reference = fresh(name).score_arrays(keys, values)
    frame = pl.DataFrame({"key": keys.tolist(), "value": values, "timestamp": stamps})
    np.testing.assert_array_equal(fresh(name).score(frame), reference)
    batch = pa.RecordBatch.from_pydict({"key": keys.tolist(), "value": values})
    np.testing.assert_array_equal(fresh(name).score(batch), reference)


@names
def test_empty_batch_and_bad_input(name: str) -> None:
    det = fresh(name)
    assert det.score_arrays(np.array([], dtype=object), np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        det.score_arrays(np.array(["k"], dtype=object), np.array([np.nan]))
    with pytest.raises(ValueError, match="columns"):
        det.score(pl.DataFrame({"id": ["k"], "value": [1.0]}))


@names
def test_forget_drops_a_keys_state(name: str) -> None:
    keys, values = keyed(200)
    det = fresh(name)
    det.score_arrays(keys, values)
    det.forget(["a", "zzz"])
    assert sorted(det.keys) == ["b", "c"]


@pytest.mark.parametrize("name", sorted(set(DETECTORS) - {"relative_entropy"}))
def test_an_injected_spike_scores_highest(name: str) -> None:
    # relative entropy compares value distributions over a window, where one spike is one
    # count among many; its own test (tests/unit/test_detectors.py) uses a regime change
    x = 10.0 * np.sin(np.arange(300) / 7.0)
    x[250] += 60.0
    scores = fresh(name).score_arrays(np.full(300, 5, dtype=object), x)
    assert int(np.argmax(scores[30:])) + 30 == 250


def test_gaussian_first_row_scores_zero_and_matches_window_statistics() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    scores = WindowedGaussianDetector(window=3).score_arrays(np.full(5, "k", dtype=object), x)
    assert scores[0] == 0.0
    z = abs(10.0 - 3.0) / np.std([2.0, 3.0, 4.0])
    from math import erf, sqrt

    assert scores[4] == pytest.approx(erf(z / sqrt(2.0)), rel=1e-6)


def test_robust_zscore_ignores_one_outlier_in_its_window() -> None:
    x = np.r_[np.tile([0.0, 1.0], 20), 500.0, np.tile([0.0, 1.0], 5), 1.0]
    scores = RobustZScoreDetector(window=40).score_arrays(np.full(x.size, "k", dtype=object), x)
    assert scores[40] > 0.95 and scores[-1] < 0.5


def test_knn_rest_period_reports_a_burst_once() -> None:
    x = 10.0 * np.sin(np.arange(400) / 7.0)
    x[300:310] += 80.0  # ten anomalous rows in a row
    det = KnnNoveltyDetector(memory=200, shape_memory=150, calibration=100, refractory=50,
                             min_history=20)
    scores = det.score_arrays(np.full(400, "k", dtype=object), x)
    assert scores[300] > 0.9
    assert np.count_nonzero(scores[301:340] > 0.5) == 0


def test_threshold_policy_decides_apart_from_scoring() -> None:
    assert ThresholdPolicy(0.5).alerts(np.array([0.1, 0.5, 0.7])).tolist() == [False, True, True]
