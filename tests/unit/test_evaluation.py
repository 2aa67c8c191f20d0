"""Unit tests for models.evaluation: the fraud handbook's split, metrics and model selection."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from models.evaluation import (
    DEFAULT_SPLIT,
    VALIDATION_ANCHOR,
    EvaluationError,
    Metrics,
    SplitSpec,
    card_precision_at_k,
    card_precision_per_day,
    evaluate_prequential,
    fit_and_evaluate,
    format_comparison,
    mean_metrics,
    prequential_folds,
    published_results,
    read_handbook,
    select_model,
    split_train_test,
)
from models.fraud import HANDBOOK_FEATURES, make_model

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HANDBOOK = SHARED_DATA / "fraud-handbook"
HANDBOOK_FILES = [
    HANDBOOK / f"{kind}-2018-{month}.parquet"
    for kind in ("transactions", "features")
    for month in ("07", "08")
]
needs_handbook = pytest.mark.skipif(
    not all(path.exists() for path in HANDBOOK_FILES),
    reason=f"fraud handbook transactions/features for 2018-07 and 2018-08 not found in {HANDBOOK}",
)


def day(month: int, number: int) -> dt.date:
    return dt.date(2018, month, number)


def transactions(rows: list[tuple[int, dt.date, int]]) -> pl.DataFrame:
    """A frame of (customer, day, fraud) rows at noon, numbered in order."""
    return pl.DataFrame(
        {
            "TRANSACTION_ID": list(range(len(rows))),
            "TX_DATETIME": [dt.datetime.combine(d, dt.time(12)) for _, d, _ in rows],
            "CUSTOMER_ID": [customer for customer, _, _ in rows],
            "TX_FRAUD": [fraud for _, _, fraud in rows],
        }
    )


@pytest.fixture(autouse=True)
def one_native_thread() -> Iterator[None]:
    # OpenMP spins badly when the test machine is busy; the results do not depend on it.
    with threadpool_limits(limits=1):
        yield


# --- split and known compromised cards ------------------------------------------------------

HAND_BUILT = transactions(
    [
        (5, day(7, 24), 1),  # fraud before the training period: never counts
        (7, day(7, 26), 0),
        (1, day(7, 27), 1),  # fraud in training: removed on every test day
        (2, day(8, 1), 1),  # first delay day = D - 8 for D = 08-09: removed from 08-09 on
        (3, day(8, 6), 1),  # D - 8 for D = 08-14: removed on 08-14 only
        (4, day(8, 7), 1),  # last delay day is D - 8 of no test day: never removed
        (1, day(8, 8), 0),
        (2, day(8, 8), 1),
        (5, day(8, 8), 0),
        (6, day(8, 8), 1),  # fraud on a test day: known from 08-16, after the window
        (2, day(8, 9), 1),
        (7, day(8, 10), 0),
        (3, day(8, 13), 1),
        (1, day(8, 14), 1),
        (3, day(8, 14), 0),
        (4, day(8, 14), 1),
        (6, day(8, 14), 0),
    ]
)


def kept(frame: pl.DataFrame) -> list[tuple[int, dt.date]]:
    return list(zip(frame["CUSTOMER_ID"], frame["TX_DATETIME"].dt.date(), strict=True))


def test_known_compromised_cards_removed_per_test_day() -> None:
    split = split_train_test(HAND_BUILT, DEFAULT_SPLIT)
    assert kept(split.train) == [(7, day(7, 26)), (1, day(7, 27))]
    assert kept(split.test) == [
        (2, day(8, 8)),
        (5, day(8, 8)),
        (6, day(8, 8)),
        (7, day(8, 10)),
        (3, day(8, 13)),
        (4, day(8, 14)),
        (6, day(8, 14)),
    ]


def test_history_days_extend_training_only() -> None:
    split = split_train_test(HAND_BUILT, SplitSpec(day(7, 25), history_days=1))
    assert kept(split.train) == [(5, day(7, 24)), (7, day(7, 26)), (1, day(7, 27))]
    assert split.test.equals(split_train_test(HAND_BUILT, DEFAULT_SPLIT).test)


def literal_removal(frame: pl.DataFrame, spec: SplitSpec) -> list[int]:
    """The README's wording, day by day: training frauds plus, cumulatively, day D-8 frauds."""
    dated = frame.with_columns(pl.col("TX_DATETIME").dt.date().alias("day"))
    frauds = dated.filter(pl.col("TX_FRAUD") == 1)
    in_training = pl.col("day").is_between(spec.train_start, spec.train_end, closed="left")
    known = set(frauds.filter(in_training)["CUSTOMER_ID"])
    kept_ids: list[int] = []
    for offset in range(spec.test_days):
        test_day = spec.test_start + dt.timedelta(days=offset)
        lagged = test_day - dt.timedelta(days=spec.delay_days + 1)
        known |= set(frauds.filter(pl.col("day") == lagged)["CUSTOMER_ID"])
        rows = dated.filter((pl.col("day") == test_day) & ~pl.col("CUSTOMER_ID").is_in(list(known)))
        kept_ids += rows["TRANSACTION_ID"].to_list()
    return kept_ids


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 12), st.integers(0, 1)), min_size=1, max_size=40
    ),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(1, 3),
)
def test_removal_matches_the_literal_description(
    rows: list[tuple[int, int, int]], train_days: int, delay_days: int, test_days: int
) -> None:
    spec = SplitSpec(day(1, 2), train_days=train_days, delay_days=delay_days, test_days=test_days)
    # One sure row in training and one per test day so neither set is empty.
    rows = rows + [(99, 1, 0)] + [(98, 1 + train_days + delay_days + i, 0) for i in range(test_days)]
    frame = transactions([(c, day(1, 1) + dt.timedelta(days=d), f) for c, d, f in rows]).sort("TX_DATETIME")
    assert split_train_test(frame, spec).test["TRANSACTION_ID"].to_list() == literal_removal(frame, spec)


def test_missing_columns_and_empty_sets_raise() -> None:
    with pytest.raises(EvaluationError, match="missing columns: CUSTOMER_ID"):
        split_train_test(HAND_BUILT.drop("CUSTOMER_ID"))
    with pytest.raises(EvaluationError, match="the data covers 2018-07-24..2018-08-14"):
        split_train_test(HAND_BUILT, DEFAULT_SPLIT.shifted(-30))
    with pytest.raises(EvaluationError, match="needs 2018-07-23..2018-08-14"):
        split_train_test(HAND_BUILT, SplitSpec(day(7, 25), history_days=2))
    no_training = HAND_BUILT.filter(pl.col("TX_DATETIME").dt.date().is_between(day(7, 25), day(7, 31)).not_())
    with pytest.raises(EvaluationError, match="empty train set"):
        split_train_test(no_training)


# --- card precision ---------------------------------------------------------------------------


def scored(rows: list[tuple[int, dt.date, int, float]]) -> tuple[pl.DataFrame, np.ndarray]:
    return transactions([(c, d, f) for c, d, f, _ in rows]), np.array([s for *_, s in rows])


def test_card_precision_by_hand() -> None:
    test, scores = scored(
        [
            # day 1, k = 2: cards 10 (0.9, fraud) and 20 (0.8) are the top 2 -> 1/2; 10 detected.
            (10, day(8, 8), 1, 0.9),
            (20, day(8, 8), 0, 0.8),
            (30, day(8, 8), 1, 0.7),
            # day 2: 10 is dropped although it scores highest; 30 (its max 0.6, fraud on another
            # transaction) and 20 (0.5, kept: it was top-2 but not fraudulent) -> 1/2.
            (10, day(8, 9), 1, 0.95),
            (20, day(8, 9), 0, 0.5),
            (30, day(8, 9), 0, 0.6),
            (30, day(8, 9), 1, 0.1),
            (40, day(8, 9), 1, 0.4),
        ]
    )
    assert card_precision_per_day(test, scores, k=2) == [0.5, 0.5]
    assert card_precision_at_k(test, scores, k=2) == 0.5


def test_card_precision_denominator_is_always_k() -> None:
    test, scores = scored([(1, day(8, 8), 1, 0.3), (2, day(8, 9), 0, 0.2)])
    assert card_precision_per_day(test, scores) == [0.01, 0.0]
    assert card_precision_at_k(test, scores) == pytest.approx(0.005)


def test_card_precision_ties_go_to_the_lower_customer_id() -> None:
    test, scores = scored([(2, day(8, 8), 1, 0.5), (1, day(8, 8), 0, 0.5), (3, day(8, 8), 1, 0.5)])
    assert card_precision_per_day(test, scores, k=1) == [0.0]
    assert card_precision_per_day(test, scores, k=2) == [0.5]


# --- folds, selection and the published table ----------------------------------------------------


def test_fold_construction() -> None:
    tests = [(f.train_start.isoformat(), f.test_start.isoformat()) for f in prequential_folds()]
    assert tests == [
        ("2018-07-25", "2018-08-08"),
        ("2018-07-18", "2018-08-01"),
        ("2018-07-11", "2018-07-25"),
        ("2018-07-04", "2018-07-18"),
    ]
    validation = prequential_folds(VALIDATION_ANCHOR)
    assert [f.train_start for f in validation] == [day(7, 11), day(7, 4), day(6, 27), day(6, 20)]
    assert max(f.test_end for f in validation) == DEFAULT_SPLIT.train_end  # never sees the test weeks


def synthetic_history(days: int = 50, per_day: int = 60, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = days * per_day
    features = {name: rng.normal(size=n) for name in HANDBOOK_FEATURES}
    signal = 2.5 * features["TERMINAL_ID_RISK_7DAY_WINDOW"] - 3.0
    seconds = np.sort(rng.integers(0, days * 86400, n))
    start = dt.datetime(2018, 1, 1)
    return pl.DataFrame(
        features
        | {
            "TRANSACTION_ID": np.arange(n),
            "TX_DATETIME": [start + dt.timedelta(seconds=int(s)) for s in seconds],
            "CUSTOMER_ID": rng.integers(0, 400, n),
            "TX_FRAUD": (rng.random(n) < 1.0 / (1.0 + np.exp(-signal))).astype(np.int64),
        }
    )


def test_prequential_evaluation_and_selection_on_synthetic_data() -> None:
    frame = synthetic_history()
    anchor = SplitSpec(dt.date(2018, 1, 29), train_days=5, delay_days=2, test_days=3)
    logistic = partial(make_model, "logistic_regression", seed=0)
    per_fold = evaluate_prequential(logistic, frame, anchor, n_folds=3)
    assert per_fold["fold"].to_list() == [0, 1, 2]
    assert per_fold["test_start"].to_list() == [day(1, 5) + dt.timedelta(days=d) for d in (31, 24, 17)]
    assert 0.6 < mean_metrics(per_fold).roc_auc <= 1.0
    ranking = select_model(
        {"logistic": logistic, "stump": partial(make_model, "decision_tree", seed=0, max_depth=1)},
        frame,
        anchor,
        n_folds=3,
        metric="roc_auc",
    )
    assert ranking.columns == ["candidate", "roc_auc", "average_precision", "card_precision_at_100"]
    assert ranking["candidate"].to_list() == ["logistic", "stump"]


def test_published_results_table() -> None:
    table = published_results()
    assert table.columns == ["model", "protocol", "roc_auc", "average_precision", "card_precision_at_100"]
    rows = {(r[0], r[1]): r[2:] for r in table.iter_rows()}
    assert rows[("logistic regression", "default split")] == (0.871, 0.606, 0.291)
    assert rows[("decision tree, depth 2", "default split")] == (0.763, 0.496, 0.241)
    assert rows[("random forest", "default split")] == (0.867, 0.658, 0.287)
    assert rows[("XGBoost", "default split")] == (0.862, 0.639, 0.273)
    assert rows[("random forest", "4 test folds")] == (0.870, 0.678, 0.299)
    assert rows[("XGBoost", "4 test folds")] == (0.869, 0.687, 0.303)


def test_comparison_table_puts_ours_beside_the_published_rows() -> None:
    ours = pl.DataFrame(
        {
            "model": ["logistic regression"],
            "protocol": ["default split"],
            "roc_auc": [0.8703],
            "average_precision": [0.6055],
            "card_precision_at_100": [0.2914],
        }
    )
    lines = format_comparison(ours).splitlines()
    assert lines[0].split() == ["protocol", "source", "model", "AUC", "AP", "CP@100"]
    assert "eventray  logistic regression      0.870  0.606   0.291" in lines[5]
    assert lines[6].startswith("4 test folds   handbook")


# --- the handbook's own data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def handbook() -> pl.DataFrame:
    return read_handbook(HANDBOOK)


@needs_handbook
def test_default_split_sizes_on_the_handbook_data(handbook: pl.DataFrame) -> None:
    split = split_train_test(handbook)
    assert (split.train.height, split.train["TX_FRAUD"].sum()) == (67_240, 598)
    assert (split.test.height, split.test["TX_FRAUD"].sum()) == (58_264, 385)
    assert split.train["TX_DATETIME"].dt.date().unique().sort().to_list()[0] == day(7, 25)


@needs_handbook
@pytest.mark.parametrize(
    ("name", "published", "ours"),
    [
        # Ours differ from the printed values by rounding (AUC 0.87034) and by one card of
        # CP@100 (the depth-2 tree ties many cards; the handbook's tie order is unspecified).
        ("logistic_regression", (0.871, 0.606, 0.291), (0.8703, 0.6055, 0.2914)),
        ("decision_tree", (0.763, 0.496, 0.241), (0.7632, 0.4963, 0.2400)),
    ],
)
def test_handbook_baselines_on_the_default_split(
    handbook: pl.DataFrame, name: str, published: tuple[float, ...], ours: tuple[float, ...]
) -> None:
    metrics = fit_and_evaluate(partial(make_model, name, seed=0), handbook)
    values = (metrics.roc_auc, metrics.average_precision, metrics.card_precision_at_100)
    assert values == pytest.approx(ours, abs=1e-4)
    assert values == pytest.approx(published, abs=0.0015)


@needs_handbook
@pytest.mark.slow
def test_random_forest_matches_the_published_default_split(handbook: pl.DataFrame) -> None:
    metrics = fit_and_evaluate(partial(make_model, "random_forest", seed=0, n_jobs=2), handbook)
    assert isinstance(metrics, Metrics)
    assert metrics.rounded() == (0.867, 0.658, 0.287)


def test_prequential_evaluation_reports_each_fold_as_it_goes() -> None:
    frame = synthetic_history()
    anchor = SplitSpec(dt.date(2018, 1, 29), train_days=5, delay_days=2, test_days=3)
    seen: list[tuple[int, dt.date, float]] = []
    per_fold = evaluate_prequential(partial(make_model, "logistic_regression", seed=0), frame, anchor,
                                    n_folds=3, on_fold=lambda i, spec, m: seen.append((i, spec.test_start,
                                                                                       m.roc_auc)))
    assert seen == list(zip(per_fold["fold"], per_fold["test_start"], per_fold["roc_auc"], strict=True))
