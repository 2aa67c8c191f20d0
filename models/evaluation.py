"""The fraud handbook's evaluation protocol, re-implemented from its published description.

Source: *Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*
(Le Borgne, Siblini, Lebichot, Bontempi, ULB, 2022), chapters 3 to 5, as summarised in
``shared/data/README.md``. The handbook's code (GPL-3.0) is not used.

**Split.** A :class:`SplitSpec` with training start ``s`` trains on the days
``[s, s + train_days)``, waits ``delay_days`` (labels arrive 7 days late) and tests on
``[s + train_days + delay_days, ... + test_days)``. The default is 2018-07-25..07-31,
7 days of delay, test 2018-08-08..08-14. Days are calendar days of ``TX_DATETIME``.

**Known compromised cards.** On test day ``D`` the customers already known to be
compromised are removed: those with a fraud on a day ``f`` with ``s <= f <= D - delay - 1``,
that is every fraud of the training period plus, cumulatively, the frauds of the days
``D - 8`` and before since the training period ended (with a 7-day delay). Frauds before
``s`` do not count, and ``history_days`` (extra training days before ``s``) changes neither
the test set nor this removal, so results with more history stay comparable.

**Metrics** over the test transactions: ROC AUC, Average Precision, and Card
Precision@100: for each test day, in order, drop the cards detected on an earlier test day
(in that day's top 100 and fraudulent that day), give each remaining card its highest
score of the day, take the 100 highest (ties: lower ``CUSTOMER_ID`` first), and count the
share with a fraud that day, always over 100; the result is the mean over the test days.

**Model selection (chapter 5, "prequential" validation), as read here.** A fold is a
whole train/delay/test block; fold ``i`` of a prequential assessment anchored at split
``A`` is ``A`` shifted back by ``i`` weeks. Hyperparameters are chosen by the mean
validation metric over 4 folds anchored at :data:`VALIDATION_ANCHOR` (training start
2018-07-11, i.e. the default split moved back by delay + test = 14 days, so its latest
test week is the default training week 07-25..07-31): validation tests on the weeks
starting 07-25, 07-18, 07-11 and 07-04, training on the weeks starting 07-11, 07-04,
06-27 and 06-20. The chosen model is then assessed on 4 folds anchored at
:data:`DEFAULT_SPLIT` (test weeks starting 08-08, 08-01, 07-25, 07-18); the handbook's
chapter 5 results are means over these test folds. Note that the last two test folds are
the first two validation folds; only the first two test folds are unseen by selection.

Example:
    >>> spec = DEFAULT_SPLIT
    >>> (spec.train_start.isoformat(), spec.test_start.isoformat())
    ('2018-07-25', '2018-08-08')
    >>> [fold.test_start.isoformat() for fold in prequential_folds(VALIDATION_ANCHOR)]
    ['2018-07-25', '2018-07-18', '2018-07-11', '2018-07-04']
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import polars as pl
from sklearn.metrics import average_precision_score, roc_auc_score

from models.fraud import LABEL, FraudModel, ModelError

REQUIRED_COLUMNS: tuple[str, ...] = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", LABEL)
METRIC_NAMES: tuple[str, ...] = ("roc_auc", "average_precision", "card_precision_at_100")
MetricName = Literal["roc_auc", "average_precision", "card_precision_at_100"]
ModelFactory = Callable[[], FraudModel]
TOP_K = 100
_DAY = "_DAY"
_SCORE = "_SCORE"


class EvaluationError(ModelError):
    """The data cannot support the asked split (missing columns, empty train or test)."""


@dataclass(frozen=True)
class SplitSpec:
    """A train / delay / test block of whole days.

    Attributes:
        train_start: first training day.
        train_days: training days; the protocol's training period.
        delay_days: days between training and test whose labels are not yet known.
        test_days: test days.
        history_days: extra labelled days before ``train_start`` added to the training
            set only (the test set and its card removal are unchanged).

    Example:
        >>> SplitSpec(dt.date(2018, 7, 25)).shifted(-7).test_start
        datetime.date(2018, 8, 1)
    """

    train_start: dt.date
    train_days: int = 7
    delay_days: int = 7
    test_days: int = 7
    history_days: int = 0

    @property
    def fit_start(self) -> dt.date:
        """First day of the data the model is fitted on (``history_days`` included)."""
        return self.train_start - dt.timedelta(days=self.history_days)

    @property
    def train_end(self) -> dt.date:
        """The day after the last training day."""
        return self.train_start + dt.timedelta(days=self.train_days)

    @property
    def test_start(self) -> dt.date:
        """First test day."""
        return self.train_end + dt.timedelta(days=self.delay_days)

    @property
    def test_end(self) -> dt.date:
        """The day after the last test day."""
        return self.test_start + dt.timedelta(days=self.test_days)

    def shifted(self, days: int) -> SplitSpec:
        """The same block moved by ``days`` (negative: back in time)."""
        return replace(self, train_start=self.train_start + dt.timedelta(days=days))


DEFAULT_SPLIT = SplitSpec(dt.date(2018, 7, 25))
VALIDATION_ANCHOR = DEFAULT_SPLIT.shifted(-(DEFAULT_SPLIT.delay_days + DEFAULT_SPLIT.test_days))


class Split(NamedTuple):
    """Training and test transactions of one :class:`SplitSpec`."""

    train: pl.DataFrame
    test: pl.DataFrame
    spec: SplitSpec


def _check_columns(df: pl.DataFrame, columns: Iterable[str]) -> None:
    missing = [name for name in columns if name not in df.columns]
    if missing:
        raise EvaluationError(f"missing columns: {', '.join(missing)}")


def _between(start: dt.date, end: dt.date) -> pl.Expr:
    return (pl.col(_DAY) >= start) & (pl.col(_DAY) < end)


def split_train_test(df: pl.DataFrame, spec: SplitSpec = DEFAULT_SPLIT) -> Split:
    """Cut ``df`` into training and test sets, known compromised cards removed from test.

    A test row is dropped when its customer had a fraud on a day ``f`` with
    ``spec.train_start <= f <= D - spec.delay_days - 1``, ``D`` being the row's day.

    Args:
        df: transactions with at least :data:`REQUIRED_COLUMNS` (and the features).
        spec: the block to cut.

    Raises:
        EvaluationError: a required column is missing, the data does not cover every day
            from ``spec.fit_start`` to the last test day, or the train or test set is empty.

    Example:
        >>> days = [dt.datetime(2018, 7, 25), dt.datetime(2018, 8, 8), dt.datetime(2018, 8, 14)]
        >>> df = pl.DataFrame({"TRANSACTION_ID": [0, 1, 2], "CUSTOMER_ID": [7, 7, 8],
        ...     "TX_FRAUD": [0, 0, 1], "TX_DATETIME": days})
        >>> [len(part) for part in split_train_test(df)[:2]]
        [1, 2]
    """
    _check_columns(df, REQUIRED_COLUMNS)
    dated = df.with_columns(pl.col("TX_DATETIME").dt.date().alias(_DAY))
    first, last = dated.get_column(_DAY).min(), dated.get_column(_DAY).max()
    needed_last = spec.test_end - dt.timedelta(days=1)
    if first is None or first > spec.fit_start or last < needed_last:  # type: ignore[operator]
        # A partly covered window would silently train or test on fewer days.
        raise EvaluationError(
            f"the data covers {first}..{last}; the split needs {spec.fit_start}..{needed_last}"
        )
    train = dated.filter(_between(spec.fit_start, spec.train_end)).drop(_DAY)
    test = _drop_known_compromised(dated.filter(_between(spec.test_start, spec.test_end)), dated, spec)
    if train.is_empty() or test.is_empty():
        raise EvaluationError(f"empty {'train' if train.is_empty() else 'test'} set for the split {spec}")
    return Split(train, test.drop(_DAY), spec)


def _drop_known_compromised(test: pl.DataFrame, labelled: pl.DataFrame, spec: SplitSpec) -> pl.DataFrame:
    # A customer is known on day D when ``labelled`` holds one of its frauds on a day f with
    # spec.train_start <= f <= D - delay - 1 (both frames carry a _DAY column). Comparing each
    # row's day with its customer's first fraud day since train_start does it in one join.
    lag = dt.timedelta(days=spec.delay_days + 1)
    first_fraud = (
        labelled.filter((pl.col(LABEL) == 1) & (pl.col(_DAY) >= spec.train_start))
        .group_by("CUSTOMER_ID")
        .agg(pl.col(_DAY).min().alias("_KNOWN_FROM"))
    )
    return (
        test.join(first_fraud, on="CUSTOMER_ID", how="left", maintain_order="left")
        .filter(pl.col("_KNOWN_FROM").is_null() | (pl.col("_KNOWN_FROM") > pl.col(_DAY) - lag))
        .drop("_KNOWN_FROM")
    )


def card_precision_per_day(test: pl.DataFrame, scores: np.ndarray, k: int = TOP_K) -> list[float]:
    """Card Precision@k of each test day, in day order (see the module docstring).

    Args:
        test: rows with ``TX_DATETIME``, ``CUSTOMER_ID`` and ``TX_FRAUD``.
        scores: one score per row of ``test``.
        k: cards investigated per day; the denominator is always ``k``.

    Example:
        >>> test = pl.DataFrame({"TX_DATETIME": [dt.datetime(2018, 8, 8)] * 3,
        ...     "CUSTOMER_ID": [1, 1, 2], "TX_FRAUD": [0, 1, 0]})
        >>> card_precision_per_day(test, np.array([0.1, 0.2, 0.9]), k=1)
        [0.0]
    """
    cards = (
        test.select(pl.col("TX_DATETIME").dt.date().alias(_DAY), "CUSTOMER_ID", LABEL)
        .with_columns(pl.Series(_SCORE, np.asarray(scores, dtype=np.float64)))
        .group_by(_DAY, "CUSTOMER_ID")
        .agg(pl.col(_SCORE).max(), pl.col(LABEL).max())
        .sort([_DAY, _SCORE, "CUSTOMER_ID"], descending=[False, True, False])
    )
    detected = pl.Series("CUSTOMER_ID", [], dtype=cards.schema["CUSTOMER_ID"])
    precisions = []
    # One iteration per test day (7), not per event: each day depends on the detections
    # of the days before it.
    for day in cards.get_column(_DAY).unique().sort():
        top = cards.filter((pl.col(_DAY) == day) & ~pl.col("CUSTOMER_ID").is_in(detected.implode())).head(k)
        frauds = top.filter(pl.col(LABEL) == 1).get_column("CUSTOMER_ID")
        precisions.append(len(frauds) / k)
        detected = pl.concat([detected, frauds])
    return precisions


def card_precision_at_k(test: pl.DataFrame, scores: np.ndarray, k: int = TOP_K) -> float:
    """Mean over the test days of :func:`card_precision_per_day`."""
    return float(np.mean(card_precision_per_day(test, scores, k)))


@dataclass(frozen=True)
class Metrics:
    """The handbook's three test metrics."""

    roc_auc: float
    average_precision: float
    card_precision_at_100: float

    def rounded(self, digits: int = 3) -> tuple[float, float, float]:
        """The three values rounded, in the handbook's table order (AUC, AP, CP@100)."""
        return (
            round(self.roc_auc, digits),
            round(self.average_precision, digits),
            round(self.card_precision_at_100, digits),
        )


def evaluate_scores(test: pl.DataFrame, scores: np.ndarray) -> Metrics:
    """ROC AUC, Average Precision and CP@100 of ``scores`` on the ``test`` rows.

    Example:
        >>> test = pl.DataFrame({"TX_DATETIME": [dt.datetime(2018, 8, 8)] * 2,
        ...     "CUSTOMER_ID": [1, 2], "TX_FRAUD": [0, 1]})
        >>> evaluate_scores(test, np.array([0.2, 0.8])).rounded()
        (1.0, 1.0, 0.01)
    """
    labels = test.get_column(LABEL).to_numpy()
    return Metrics(
        roc_auc=float(roc_auc_score(labels, scores)),
        average_precision=float(average_precision_score(labels, scores)),
        card_precision_at_100=card_precision_at_k(test, scores, TOP_K),
    )


def fit_and_evaluate(factory: ModelFactory, df: pl.DataFrame, spec: SplitSpec = DEFAULT_SPLIT) -> Metrics:
    """Build a fresh model, fit it on ``spec``'s training set and evaluate it on its test set.

    Example (a sketch; ``frame`` holds the handbook's July and August data):
        >>> from functools import partial
        >>> from models.fraud import make_model
        >>> factory = partial(make_model, "logistic_regression", seed=0)
        >>> fit_and_evaluate(factory, frame).rounded()  # doctest: +SKIP
        (0.87, 0.605, 0.291)
    """
    split = split_train_test(df, spec)
    model = factory().fit(split.train)
    return evaluate_scores(split.test, model.score(split.test))


def prequential_folds(
    anchor: SplitSpec = DEFAULT_SPLIT, n_folds: int = 4, step_days: int = 7
) -> list[SplitSpec]:
    """``anchor`` and its ``n_folds - 1`` predecessors, each ``step_days`` earlier."""
    return [anchor.shifted(-fold * step_days) for fold in range(n_folds)]


def evaluate_prequential(
    factory: ModelFactory,
    df: pl.DataFrame,
    anchor: SplitSpec = DEFAULT_SPLIT,
    n_folds: int = 4,
    on_fold: Callable[[int, SplitSpec, Metrics], None] | None = None,
) -> pl.DataFrame:
    """One row of metrics per fold (column ``fold``, 0 = the anchor), fresh model per fold.

    Args:
        factory: builds a fresh unfitted model.
        df: the labelled transactions.
        anchor: fold 0; fold ``i`` is ``anchor`` moved back ``i`` weeks.
        n_folds: how many folds.
        on_fold: called after each fold with its number, split and metrics (progress).
    """
    rows = []
    for fold, spec in enumerate(prequential_folds(anchor, n_folds)):
        metrics = fit_and_evaluate(factory, df, spec)
        if on_fold is not None:
            on_fold(fold, spec, metrics)
        rows.append({"fold": fold, "test_start": spec.test_start} | asdict(metrics))
    return pl.DataFrame(rows)


def mean_metrics(per_fold: pl.DataFrame) -> Metrics:
    """The mean of each metric over the rows of an :func:`evaluate_prequential` table."""
    return Metrics(**{name: float(per_fold.get_column(name).mean()) for name in METRIC_NAMES})


def select_model(
    candidates: Mapping[str, ModelFactory],
    df: pl.DataFrame,
    anchor: SplitSpec = VALIDATION_ANCHOR,
    n_folds: int = 4,
    metric: MetricName = "average_precision",
) -> pl.DataFrame:
    """Rank candidates by their mean validation ``metric`` over the prequential folds.

    Returns:
        One row per candidate (``candidate`` and the three mean metrics), best first.
    """
    rows = []
    for label, factory in candidates.items():
        means = mean_metrics(evaluate_prequential(factory, df, anchor, n_folds))
        rows.append({"candidate": label} | asdict(means))
    return pl.DataFrame(rows).sort(metric, "candidate", descending=[True, False])


_PUBLISHED: tuple[tuple[str, str, float, float, float], ...] = (
    ("logistic regression", "default split", 0.871, 0.606, 0.291),
    ("decision tree, depth 2", "default split", 0.763, 0.496, 0.241),
    ("random forest", "default split", 0.867, 0.658, 0.287),
    ("XGBoost", "default split", 0.862, 0.639, 0.273),
    ("random forest", "4 test folds", 0.870, 0.678, 0.299),
    ("XGBoost", "4 test folds", 0.869, 0.687, 0.303),
)


def published_results() -> pl.DataFrame:
    """The handbook's published test results (chapter 3 default split, chapter 5 folds).

    Example:
        >>> published_results().filter(pl.col("protocol") == "4 test folds")["average_precision"].max()
        0.687
    """
    return pl.DataFrame(
        list(_PUBLISHED), schema=["model", "protocol", *METRIC_NAMES], orient="row"
    )


def format_comparison(ours: pl.DataFrame, published: pl.DataFrame | None = None) -> str:
    """A text table of our results beside the published ones, grouped by protocol.

    Args:
        ours: rows with ``model``, ``protocol`` and the three metric columns.
        published: the reference rows; default :func:`published_results`.

    Example:
        >>> ours = pl.DataFrame({"model": ["hgb"], "protocol": ["4 test folds"],
        ...     "roc_auc": [0.9], "average_precision": [0.7], "card_precision_at_100": [0.31]})
        >>> print(format_comparison(ours).splitlines()[-1])
        4 test folds   eventray  hgb                      0.900  0.700   0.310
    """
    reference = published_results() if published is None else published
    rows = pl.concat(
        [
            reference.select("protocol", pl.lit("handbook").alias("source"), "model", *METRIC_NAMES),
            ours.select("protocol", pl.lit("eventray").alias("source"), "model", *METRIC_NAMES),
        ]
    ).with_row_index("_ROW")
    # Group by protocol, protocols in order of first appearance, rows in input order.
    rows = rows.sort(pl.col("_ROW").min().over("protocol"), "_ROW")
    width = max(25, *(len(name) + 2 for name in rows.get_column("model")))
    lines = [f"{'protocol':<15}{'source':<10}{'model':<{width}}{'AUC':>5}  {'AP':>5}  {'CP@100':>6}"]
    for row in rows.iter_rows(named=True):
        lines.append(
            f"{row['protocol']:<15}{row['source']:<10}{row['model']:<{width}}{row['roc_auc']:.3f}  "
            f"{row['average_precision']:.3f}   {row['card_precision_at_100']:.3f}"
        )
    return "\n".join(lines)


def read_handbook(directory: str | Path, months: Sequence[str] = ("2018-07", "2018-08")) -> pl.DataFrame:
    """The handbook's transactions of ``months`` joined with its published features.

    Args:
        directory: the folder holding ``transactions-YYYY-MM.parquet`` and
            ``features-YYYY-MM.parquet``.
        months: the months to read; features are published for 2018-07 and 2018-08 only.

    Example:
        >>> frame = read_handbook("../shared/data/fraud-handbook")  # doctest: +SKIP
        >>> frame.height  # doctest: +SKIP
        593487
    """
    folder = Path(directory)
    transactions = pl.concat([pl.read_parquet(folder / f"transactions-{m}.parquet") for m in months])
    features = pl.concat([pl.read_parquet(folder / f"features-{m}.parquet") for m in months])
    return transactions.join(features, on="TRANSACTION_ID", how="inner", maintain_order="left")
