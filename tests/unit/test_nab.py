"""NAB scoring: hand-built cases, the threshold sweep, the corpus layout and the real subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.anomaly import make_detector
from models.nab import (
    PROFILES,
    NabCorpus,
    NabSeries,
    evaluate_detector,
    load_corpus,
    probation_rows,
    read_results,
    row_rewards,
    run_detector,
    scaled_sigmoid,
    score_at_threshold,
    score_results,
    sweep_threshold,
    window_spans,
)

NAB_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nab"
STANDARD = PROFILES["standard"]
T0 = np.datetime64("2014-04-01T00:00", "us")


def make_series(
    name: str, n: int, spans: list[tuple[int, int]], stamps: np.ndarray | None = None
) -> NabSeries:
    ts = T0 + np.arange(n) * np.timedelta64(5, "m") if stamps is None else stamps
    windows = tuple((ts[a], ts[b]) for a, b in spans)
    text = np.datetime_as_string(ts, unit="s").astype(object)
    text = np.array([t.replace("T", " ") for t in text])
    return NabSeries(name, text, ts, np.zeros(n), windows)


def corpus_of(*series: NabSeries) -> NabCorpus:
    return NabCorpus(Path("."), tuple(series))


def one_hot(n: int, *rows: int) -> np.ndarray:
    s = np.zeros(n)
    s[list(rows)] = 1.0
    return s


# a 200-row file: rows 0..29 probationary, one window on rows 100..119 (width 20)
FILE = make_series("cat/a.csv", 200, [(100, 119)])
ONE = corpus_of(FILE)


def raw_at_one(scores: np.ndarray, profile: str = "standard") -> float:
    return score_at_threshold({FILE.name: scores}, ONE, PROFILES[profile], 0.5).raw


def test_probationary_length_and_sigmoid() -> None:
    assert probation_rows(200) == 30 and probation_rows(4032) == 604 and probation_rows(10**6) == 750
    assert float(scaled_sigmoid(-1.0)) == pytest.approx(0.98661, abs=1e-5)
    assert float(scaled_sigmoid(0.0)) == 0.0 and float(scaled_sigmoid(5.0)) == -1.0


def test_detection_at_window_start_is_worth_a_full_tp() -> None:
    assert raw_at_one(one_hot(200, 100)) == pytest.approx(1.0)


def test_detection_at_window_end_is_worth_little() -> None:
    expected = float(scaled_sigmoid(-1 / 20) / scaled_sigmoid(-1.0))
    assert raw_at_one(one_hot(200, 119)) == pytest.approx(expected)
    assert 0 < expected < 0.15


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    assert raw_at_one(one_hot(200, 110, 105, 118)) == pytest.approx(
        float(scaled_sigmoid(-15 / 20) / scaled_sigmoid(-1.0))
    )


def test_false_positive_after_a_window_is_weighted_by_distance() -> None:
    miss = -1.0  # the window itself is missed
    near = miss + 0.11 * float(scaled_sigmoid((125 - 119) / 19))
    assert raw_at_one(one_hot(200, 125)) == pytest.approx(near)
    assert raw_at_one(one_hot(200, 190)) == pytest.approx(miss - 0.11)  # beyond 3 widths


def test_false_positive_before_the_first_window_costs_a_full_fp() -> None:
    assert raw_at_one(one_hot(200, 50)) == pytest.approx(-1.0 - 0.11)
    assert raw_at_one(one_hot(200, 50), "reward_low_FP") == pytest.approx(-1.0 - 0.22)


def test_probationary_rows_are_not_scored() -> None:
    assert raw_at_one(one_hot(200, 5)) == pytest.approx(-1.0)


def test_no_detection_costs_a_fn_per_window() -> None:
    assert raw_at_one(np.zeros(200)) == -1.0
    assert raw_at_one(np.zeros(200), "reward_low_FN") == -2.0


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_perfect_detector_scores_100_and_null_scores_0(profile: str) -> None:
    two = make_series("cat/b.csv", 300, [(100, 119), (200, 219)])
    quiet = make_series("other/c.csv", 300, [])
    corpus = corpus_of(FILE, two, quiet)
    perfect = {FILE.name: one_hot(200, 100), two.name: one_hot(300, 100, 200), quiet.name: np.zeros(300)}
    best = sweep_threshold(perfect, corpus, PROFILES[profile])
    assert best.normalised == pytest.approx(100.0) and best.detected == 3 and best.false_positives == 0
    null = {s.name: np.full(s.values.size, 0.5) for s in corpus.series}
    assert sweep_threshold(null, corpus, PROFILES[profile]).normalised == 0.0
    silent = {s.name: np.zeros(s.values.size) for s in corpus.series}
    assert sweep_threshold(silent, corpus, PROFILES[profile]).threshold == 1.1


def test_identical_window_times_in_two_files_are_two_windows() -> None:
    a, b = make_series("x/a.csv", 200, [(100, 119)]), make_series("y/b.csv", 200, [(100, 119)])
    scores = {a.name: one_hot(200, 100), b.name: np.zeros(200)}
    result = score_at_threshold(scores, corpus_of(a, b), STANDARD, 0.5)
    assert result.raw == pytest.approx(0.0) and result.detected == 1


def test_window_spans_with_repeated_and_stepped_back_timestamps() -> None:
    minutes = np.array([0, 5, 10, 10, 10, 15, 12, 20, 25, 30])
    ts = T0 + minutes * np.timedelta64(1, "m")
    # window 10..25: opens at the first 10, the step back to 12 does not close it
    assert window_spans(ts, [(ts[2], ts[8])]) == [(2, 8)]
    # limits that no row carries fall back to the rows just inside them
    off = (T0 + np.timedelta64(11, "m"), T0 + np.timedelta64(21, "m"))
    assert window_spans(ts, [off]) == [(5, 7)]


def test_row_rewards_mark_windows_and_probation() -> None:
    reward, window = row_rewards(200, [(100, 119)], STANDARD)
    assert (window[:30] == -2).all() and (window[100:120] == 0).all() and window[120] == -1
    assert reward[100] == pytest.approx(1.0) and reward[99] == pytest.approx(-0.11)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), min_size=300, max_size=300))
def test_sweep_equals_best_fixed_threshold(values: list[float]) -> None:
    two = make_series("cat/b.csv", 300, [(100, 119), (200, 219)])
    corpus = corpus_of(two)
    scores = {two.name: np.array(values)}
    for profile in PROFILES.values():
        swept = sweep_threshold(scores, corpus, profile)
        thresholds = [1.1, *sorted(set(values), reverse=True)]
        fixed = [score_at_threshold(scores, corpus, profile, t) for t in thresholds]
        direct = max(fixed, key=lambda r: r.raw)
        assert swept.raw == pytest.approx(direct.raw, abs=1e-9)


def write_corpus(root: Path) -> NabCorpus:
    """A two-file corpus in NAB's layout (one file repeats a timestamp)."""
    rng = np.random.default_rng(0)
    labels = {}
    for category, name, n, spans in (("artificial", "a.csv", 300, [(200, 229)]), ("real", "b.csv", 240, [])):
        ts = T0 + np.arange(n) * np.timedelta64(5, "m")
        if name == "b.csv":
            ts[50] = ts[49]
        values = np.sin(np.arange(n) / 6.0) + rng.normal(0, 0.05, n)
        values[[215]] += 5.0 if spans else 0.0
        path = root / "data" / category / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stamps = [str(t).replace("T", " ") for t in ts.astype("datetime64[s]")]
        lines = ["timestamp,value"] + [f"{t},{float(v)!r}" for t, v in zip(stamps, values, strict=True)]
        path.write_text("\n".join(lines) + "\n")
        labels[f"{category}/{name}"] = [
            [str(ts[a]).replace("T", " "), str(ts[b]).replace("T", " ")] for a, b in spans
        ]
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    return load_corpus(root)


def test_corpus_layout_run_write_read_and_score(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "nab")
    assert [s.name for s in corpus.series] == ["artificial/a.csv", "real/b.csv"] and corpus.n_windows == 1
    detector = make_detector("windowed_gaussian", window=50)
    scores = run_detector(corpus, detector, tmp_path / "out", batch_size=70)
    written = (tmp_path / "out" / "real" / "b.csv").read_text().splitlines()
    assert written[0] == "timestamp,value,anomaly_score" and len(written) == 241
    assert written[51].split(",")[0] == written[50].split(",")[0]  # timestamps as in the input
    assert (tmp_path / "nab" / "data" / "real" / "b.csv").read_text().splitlines()[51].split(",")[0] == (
        written[51].split(",")[0]
    )
    back = read_results(tmp_path / "out", corpus)
    for name in scores:
        np.testing.assert_allclose(back[name], scores[name], rtol=1e-15)
    from_dir = score_results(tmp_path / "out", corpus)
    swept = sweep_threshold(scores, corpus, STANDARD)
    assert from_dir["standard"].raw == pytest.approx(swept.raw) and swept.detected == 1
    assert set(from_dir) == set(PROFILES)


def test_missing_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="combined_windows"):
        load_corpus(tmp_path)


def test_scores_must_be_in_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_threshold({FILE.name: np.full(200, 1.5)}, ONE, STANDARD)


needs_nab = pytest.mark.skipif(
    not (NAB_DIR / "labels" / "combined_windows.json").exists(),
    reason=f"NAB subset not found at {NAB_DIR} (shared reference data; see shared/data/README.md)",
)


@needs_nab
def test_shared_subset_loads_with_its_25_windows() -> None:
    corpus = load_corpus(NAB_DIR)
    assert len(corpus.series) == 18 and corpus.n_windows == 25
    spans = {s.name: window_spans(s.timestamps, s.windows) for s in corpus.series}
    assert all(len(spans[s.name]) == len(s.windows) for s in corpus.series)
    assert all(a >= probation_rows(s.values.size) for s in corpus.series for a, _ in spans[s.name])


@pytest.fixture(scope="module")
def knn_on_subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    if not (NAB_DIR / "labels" / "combined_windows.json").exists():
        pytest.skip(f"NAB subset not found at {NAB_DIR} (shared reference data; see shared/data/README.md)")
    out = tmp_path_factory.mktemp("knn")
    scores, _ = evaluate_detector("knn_novelty", NAB_DIR, out)
    return scores, out


@needs_nab
def test_best_detector_reaches_the_floor_on_the_shared_subset(knn_on_subset: tuple[dict, Path]) -> None:
    scores, out = knn_on_subset
    assert scores["standard"].normalised >= 60.0, scores
    rescored = score_results(out, load_corpus(NAB_DIR))
    assert rescored["standard"].raw == pytest.approx(scores["standard"].raw)


@needs_nab
@pytest.mark.parametrize("name", ["windowed_gaussian", "robust_zscore"])
def test_baselines_trail_the_best_detector(name: str, knn_on_subset: tuple[dict, Path]) -> None:
    scores, seconds = evaluate_detector(name, NAB_DIR)
    best, _ = knn_on_subset
    assert math.isfinite(seconds)
    for profile in PROFILES:
        assert 0.0 <= scores[profile].normalised < best[profile].normalised
