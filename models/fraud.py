"""Fraud classifiers on the fraud handbook's transaction features, and alert policies.

A :class:`FraudModel` wraps a scikit-learn pipeline (standardisation fitted on the training
set, then a classifier). It reads its feature columns from a ``polars.DataFrame`` and
``score`` returns one fraud probability in [0, 1] per row, for a whole batch at once.
Scoring is kept apart from deciding: an :class:`AlertPolicy` (a fixed threshold, or a
top-k budget per batch) turns scores into alerts.

Models are built by name through :func:`make_model`; the names are the keys of
:data:`MODEL_FACTORIES` and an unknown name raises :class:`UnknownModelError` listing them.
Every factory takes a ``seed``; the same data and seed give the same scores.

Exceptions of the ``models`` package (registry errors live in :mod:`models.registry`)::

    ModelError
    ├── UnknownModelError    a name is not in MODEL_FACTORIES (lists the allowed names)
    ├── FeatureError         input columns are missing, or the model is not fitted
    └── RegistryError        (models.registry) an artifact cannot be saved or loaded
        └── ModelNotFoundError  no such name or version in the registry

Example:
    >>> import polars as pl
    >>> rows = {name: [0.0, 1.0, 0.0, 1.0] for name in HANDBOOK_FEATURES}
    >>> train = pl.DataFrame(rows | {"TX_FRAUD": [0, 1, 0, 1]})
    >>> model = make_model("logistic_regression", seed=0).fit(train)
    >>> scores = model.score(train)
    >>> AlertThreshold(0.5).decide(scores).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

#: The handbook's 15 model inputs: the amount and its 14 engineered features (chapter 3).
HANDBOOK_FEATURES: tuple[str, ...] = (
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_7DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW",
    "TERMINAL_ID_RISK_1DAY_WINDOW",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW",
    "TERMINAL_ID_RISK_7DAY_WINDOW",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW",
    "TERMINAL_ID_RISK_30DAY_WINDOW",
)
#: The history features a fraud pipeline computes beside the handbook's 15 (see
#: ``pipelines.fraud.features``): the customer's amount against its 30-day history, the time
#: since its last transaction, how new the terminal is to the customer, and how long ago a
#: terminal's known frauds began and last happened.
HISTORY_FEATURES: tuple[str, ...] = (
    "CUSTOMER_ID_NB_TX_BEFORE_30DAY_WINDOW",
    "CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW",
    "CUSTOMER_ID_AMOUNT_ZSCORE_30DAY_WINDOW",
    "CUSTOMER_ID_HOURS_SINCE_LAST_TX",
    "CUSTOMER_TERMINAL_NB_TX_BEFORE_30DAY_WINDOW",
    "CUSTOMER_TERMINAL_DAYS_SINCE_LAST_TX",
    "TERMINAL_ID_RISK_7DAY_WINDOW_14DAY_BEFORE",
    "TERMINAL_ID_RISK_7DAY_WINDOW_21DAY_BEFORE",
    "TERMINAL_ID_RISK_7DAY_WINDOW_28DAY_BEFORE",
    "TERMINAL_ID_DAYS_SINCE_FIRST_KNOWN_FRAUD",
    "TERMINAL_ID_DAYS_SINCE_LAST_KNOWN_FRAUD",
)
#: The handbook's 15 inputs and the history features.
EXTENDED_FEATURES: tuple[str, ...] = (*HANDBOOK_FEATURES, *HISTORY_FEATURES)
LABEL = "TX_FRAUD"
ClassWeight = Literal["balanced"] | dict[int, float] | None


class ModelError(Exception):
    """Base class of every error raised by ``models``."""


class UnknownModelError(ModelError):
    """A model name is not registered.

    Attributes:
        name: the name that was given.
        allowed: the registered names, sorted.
    """

    def __init__(self, name: str, allowed: Sequence[str]) -> None:
        self.name, self.allowed = name, sorted(allowed)
        super().__init__(f"unknown model {name!r}; allowed: {', '.join(self.allowed)}")


class FeatureError(ModelError):
    """The input lacks feature columns, or a model is used before it is fitted."""


class FraudModel:
    """A named scikit-learn pipeline that scores transactions from feature columns.

    Args:
        name: the factory name (a key of :data:`MODEL_FACTORIES`).
        estimator: a scikit-learn pipeline with ``fit`` and ``predict_proba``.
        features: the input columns, in the order the estimator sees them.
        seed: the seed the estimator was built with (kept for the registry).
        params: the factory keyword arguments (kept for the registry).

    Example:
        >>> model = make_model("decision_tree", seed=3, max_depth=2)
        >>> (model.name, model.seed, model.params["max_depth"])
        ('decision_tree', 3, 2)
    """

    def __init__(
        self,
        name: str,
        estimator: Pipeline,
        features: Sequence[str] = HANDBOOK_FEATURES,
        seed: int = 0,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.estimator = estimator
        self.features = tuple(features)
        self.seed = seed
        self.params = dict(params or {})
        #: the estimator as arrays for small batches (:class:`TreeEnsemble`); ``False``:
        #: not a model it covers; ``None``: not looked at yet
        self._trees: TreeEnsemble | Literal[False] | None = None

    def __repr__(self) -> str:
        return f"FraudModel(name={self.name!r}, seed={self.seed}, params={self.params})"

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run (or a fitted estimator was loaded)."""
        return hasattr(self.estimator, "classes_")

    def fit(self, df: pl.DataFrame, label: str = LABEL) -> FraudModel:
        """Fit scaler and classifier on ``df``'s feature columns and its 0/1 ``label``.

        Returns:
            ``self``, fitted.
        """
        self.estimator.fit(self.feature_matrix(df), df.get_column(label).to_numpy())
        self._trees = None
        return self

    def score(self, df: pl.DataFrame | pa.Table) -> np.ndarray:
        """Fraud probabilities in [0, 1], one per row of ``df``, computed for the whole batch.

        Raises:
            FeatureError: the model is not fitted or ``df`` lacks a feature column.
        """
        if not self.is_fitted:
            raise FeatureError(f"model {self.name!r} is not fitted")
        matrix = self.feature_matrix(df)
        final = self.estimator[-1] if isinstance(self.estimator, Pipeline) else None
        if isinstance(final, LogisticRegression) and list(final.classes_) == [0, 1]:
            return _linear_probability(self.estimator[:-1].transform(matrix), final)
        if len(matrix) <= SMALL_BATCH_ROWS:
            if self._trees is None:
                self._trees = TreeEnsemble.of(self.estimator) or False
            if self._trees:
                return self._trees.probability(matrix)
        proba = self.estimator.predict_proba(matrix)
        return np.asarray(proba[:, list(self.estimator.classes_).index(1)], dtype=np.float64)

    def feature_matrix(self, df: pl.DataFrame | pa.Table) -> np.ndarray:
        """The feature columns of ``df`` as a float64 matrix, in :attr:`features` order
        (column-major, as Polars hands a frame over; nulls are NaN).

        An Arrow table's numeric columns are copied in with numpy, which casts them as
        Polars does, without a Polars query (a live batch is often one row).
        """
        names = df.column_names if isinstance(df, pa.Table) else df.columns
        missing = [name for name in self.features if name not in names]
        if missing:
            raise FeatureError(f"missing feature columns: {', '.join(missing)}")
        if not isinstance(df, pa.Table):
            return df.select(pl.col(name).cast(pl.Float64) for name in self.features).to_numpy()
        matrix = np.empty((df.num_rows, len(self.features)), order="F")
        for j, name in enumerate(self.features):
            column = df.column(name)
            if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                    or pa.types.is_boolean(column.type)):
                return self.feature_matrix(pl.from_arrow(df))  # type: ignore[arg-type]
            matrix[:, j] = column.to_numpy()
        return matrix


def _linear_probability(scaled: np.ndarray, model: LogisticRegression) -> np.ndarray:
    """A binary logistic regression's P(fraud), the same for a row whatever batch it is in.

    ``predict_proba`` takes a matrix product, whose rounding may depend on the BLAS kernel,
    its threads and how it blocks the batch; here each row's sum runs over the features in
    one fixed order (a loop over the 15 columns, each step a vectorised operation over the
    batch), so a row's score is the same bits in any batch and any process. Equal to
    ``predict_proba`` up to rounding.
    """
    logit = np.full(scaled.shape[0], float(model.intercept_[0]))
    for j, weight in enumerate(model.coef_[0]):
        logit += scaled[:, j] * weight
    return np.asarray(expit(logit), dtype=np.float64)


#: Batches of up to this many rows are scored by :class:`TreeEnsemble` when the model is
#: one it covers: a live batch is a few rows, and scikit-learn's ``predict_proba`` costs
#: ~2.5 ms whatever the rows (input checks, then one call per tree); the arrays take ~0.3 ms.
#: Larger batches go to scikit-learn's compiled loop, which the arrays' work per row loses to.
SMALL_BATCH_ROWS = 32


@dataclass(frozen=True)
class TreeEnsemble:
    """A fitted ``StandardScaler`` + binary ``HistGradientBoostingClassifier`` pipeline as flat
    node arrays, evaluated for a batch in numpy: the same bits as ``predict_proba``.

    Every tree's nodes sit in one set of arrays (children as absolute indices). A batch walks
    all trees at once, one level per step (as many steps as the deepest tree), each row
    taking the branch scikit-learn takes: NaN goes where the split sent missing values,
    otherwise left when the value is ``<=`` the threshold. The leaves' values are then added
    to the baseline one tree after another, in the trees' order, as scikit-learn adds them,
    and turned into a probability by the same ``expit``.

    Example:
        >>> rows = {name: [0.0, 1.0] * 20 for name in HANDBOOK_FEATURES}
        >>> train = pl.DataFrame(rows | {"TX_FRAUD": [0, 1] * 20})
        >>> model = make_model("hist_gradient_boosting", seed=0, max_iter=5).fit(train)
        >>> trees = TreeEnsemble.of(model.estimator)
        >>> matrix = model.feature_matrix(train)
        >>> bool((trees.probability(matrix) == model.estimator.predict_proba(matrix)[:, 1]).all())
        True
    """

    mean: np.ndarray | None
    scale: np.ndarray | None
    baseline: float
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    leaf: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    depth: int

    @classmethod
    def of(cls, estimator: Any) -> TreeEnsemble | None:
        """The arrays of ``estimator``, or ``None`` when it is not a pipeline they cover
        (another classifier or scaler, more than two classes, a categorical split)."""
        if not isinstance(estimator, Pipeline) or len(estimator.steps) != 2:
            return None
        scaler, model = estimator[0], estimator[-1]
        if (type(scaler) is not StandardScaler or type(model) is not HistGradientBoostingClassifier
                or list(model.classes_) != [0, 1] or model.n_trees_per_iteration_ != 1):
            return None
        trees = [predictors[0].nodes for predictors in model._predictors]
        if not trees or any(nodes["is_categorical"].any() for nodes in trees):
            return None
        sizes = np.array([len(nodes) for nodes in trees])
        offsets = np.cumsum(sizes) - sizes
        nodes = np.concatenate(trees)
        shift = np.repeat(offsets, sizes)
        return cls(
            mean=np.asarray(scaler.mean_, np.float64) if scaler.with_mean else None,
            scale=np.asarray(scaler.scale_, np.float64) if scaler.with_std else None,
            baseline=float(np.asarray(model._baseline_prediction).ravel()[0]),
            roots=offsets.astype(np.int64),
            feature=nodes["feature_idx"].astype(np.int64),
            threshold=nodes["num_threshold"].astype(np.float64),
            missing_left=nodes["missing_go_to_left"].astype(bool),
            leaf=nodes["is_leaf"].astype(bool),
            left=nodes["left"].astype(np.int64) + shift,
            right=nodes["right"].astype(np.int64) + shift,
            value=nodes["value"].astype(np.float64),
            depth=int(nodes["depth"].max()),
        )

    def probability(self, matrix: np.ndarray) -> np.ndarray:
        """P(class 1) per row of ``matrix`` (unscaled features, float64, NaN for missing)."""
        scaled = np.array(matrix, dtype=np.float64)  # a copy, scaled in place as the scaler does
        if self.mean is not None:
            scaled -= self.mean
        if self.scale is not None:
            scaled /= self.scale
        rows = np.arange(len(scaled))[None, :]
        node = np.repeat(self.roots[:, None], len(scaled), axis=1)  # (trees, rows)
        for _ in range(self.depth):
            x = scaled[rows, self.feature[node]]
            go_left = np.where(np.isnan(x), self.missing_left[node], x <= self.threshold[node])
            node = np.where(self.leaf[node], node, np.where(go_left, self.left[node], self.right[node]))
        values = np.vstack([np.full((1, len(scaled)), self.baseline), self.value[node]])
        raw = np.add.accumulate(values, axis=0)[-1]  # tree by tree, as scikit-learn adds them
        return np.asarray(expit(raw), dtype=np.float64)


def _pipeline(classifier: Any) -> Pipeline:
    # Standardisation is fitted with the classifier, on the training set only; trees are
    # indifferent to it but keeping it everywhere makes every artifact the same shape.
    return Pipeline([("scale", StandardScaler()), ("classify", classifier)])


def logistic_regression(
    seed: int = 0, *, C: float = 1.0, class_weight: ClassWeight = None, max_iter: int = 1000
) -> FraudModel:
    """Logistic regression (the handbook's chapter 3 baseline uses ``C=1``).

    Example:
        >>> logistic_regression(seed=1, C=0.1).estimator[-1].C
        0.1
    """
    params = {"C": C, "class_weight": class_weight, "max_iter": max_iter}
    classifier = LogisticRegression(random_state=seed, **params)
    return FraudModel("logistic_regression", _pipeline(classifier), seed=seed, params=params)


def decision_tree(
    seed: int = 0, *, max_depth: int | None = 2, class_weight: ClassWeight = None
) -> FraudModel:
    """A decision tree, depth 2 by default (the handbook's chapter 3 tree).

    Example:
        >>> decision_tree().estimator[-1].max_depth
        2
    """
    params = {"max_depth": max_depth, "class_weight": class_weight}
    classifier = DecisionTreeClassifier(random_state=seed, **params)
    return FraudModel("decision_tree", _pipeline(classifier), seed=seed, params=params)


def random_forest(
    seed: int = 0,
    *,
    n_estimators: int = 100,
    max_depth: int | None = None,
    min_samples_leaf: int = 1,
    max_features: float | str | None = "sqrt",
    class_weight: ClassWeight | Literal["balanced_subsample"] = None,
    n_jobs: int | None = None,
) -> FraudModel:
    """A random forest; ``n_jobs`` changes speed, never the scores.

    Example:
        >>> random_forest(seed=2, n_estimators=10).estimator[-1].n_estimators
        10
    """
    params = {
        "n_estimators": n_estimators,
        "max_depth": max_depth,
        "min_samples_leaf": min_samples_leaf,
        "max_features": max_features,
        "class_weight": class_weight,
    }
    classifier = RandomForestClassifier(random_state=seed, n_jobs=n_jobs, **params)
    return FraudModel("random_forest", _pipeline(classifier), seed=seed, params=params)


def hist_gradient_boosting(
    seed: int = 0,
    *,
    learning_rate: float = 0.1,
    max_iter: int = 100,
    max_leaf_nodes: int | None = 31,
    max_depth: int | None = None,
    min_samples_leaf: int = 20,
    l2_regularization: float = 0.0,
    class_weight: ClassWeight = None,
) -> FraudModel:
    """Histogram gradient boosting, a fixed number of iterations (no early stopping).

    Early stopping is off so that the fit uses all the training rows and depends on the
    seed only through the estimator's own randomness.

    Example:
        >>> hist_gradient_boosting(seed=0, max_iter=50).estimator[-1].max_iter
        50
    """
    params = {
        "learning_rate": learning_rate,
        "max_iter": max_iter,
        "max_leaf_nodes": max_leaf_nodes,
        "max_depth": max_depth,
        "min_samples_leaf": min_samples_leaf,
        "l2_regularization": l2_regularization,
        "class_weight": class_weight,
    }
    classifier = HistGradientBoostingClassifier(random_state=seed, early_stopping=False, **params)
    return FraudModel("hist_gradient_boosting", _pipeline(classifier), seed=seed, params=params)


def forest_and_boosting(
    seed: int = 0,
    *,
    forest: Mapping[str, Any] | None = None,
    boosting: Mapping[str, Any] | None = None,
    forest_weight: float = 0.5,
    n_jobs: int | None = None,
) -> FraudModel:
    """The weighted mean of a random forest's and a gradient boosting's fraud probabilities.

    Args:
        seed: both members' seed.
        forest: :func:`random_forest` parameters.
        boosting: :func:`hist_gradient_boosting` parameters.
        forest_weight: the forest's weight in [0, 1]; the boosting gets the rest.
        n_jobs: the forest's cores (speed only).

    Example:
        >>> model = forest_and_boosting(forest={"n_estimators": 5}, boosting={"max_iter": 5})
        >>> [name for name, _ in model.estimator[-1].estimators]
        ['forest', 'boosting']
    """
    if not 0.0 <= forest_weight <= 1.0:
        raise ValueError(f"forest_weight must be in [0, 1], got {forest_weight}")
    members = (random_forest(seed, n_jobs=n_jobs, **(forest or {})),
               hist_gradient_boosting(seed, **(boosting or {})))
    params = {"forest": members[0].params, "boosting": members[1].params, "forest_weight": forest_weight}
    classifier = VotingClassifier(
        [("forest", members[0].estimator[-1]), ("boosting", members[1].estimator[-1])],
        voting="soft", weights=[forest_weight, 1.0 - forest_weight])
    return FraudModel("forest_and_boosting", _pipeline(classifier), seed=seed, params=params)


#: Model name -> factory ``(seed, **params) -> FraudModel``.
MODEL_FACTORIES: dict[str, Callable[..., FraudModel]] = {
    "logistic_regression": logistic_regression,
    "decision_tree": decision_tree,
    "random_forest": random_forest,
    "hist_gradient_boosting": hist_gradient_boosting,
    "forest_and_boosting": forest_and_boosting,
}


def make_model(name: str, seed: int = 0, **params: Any) -> FraudModel:
    """Build an unfitted model by name.

    Raises:
        UnknownModelError: ``name`` is not a key of :data:`MODEL_FACTORIES`.

    Example:
        >>> make_model("random_forest", seed=1, n_estimators=5).params["n_estimators"]
        5
        >>> try:
        ...     make_model("xgb")
        ... except UnknownModelError as error:
        ...     print(error.allowed[:2])
        ['decision_tree', 'forest_and_boosting']
    """
    factory = MODEL_FACTORIES.get(name)
    if factory is None:
        raise UnknownModelError(name, list(MODEL_FACTORIES))
    return factory(seed, **params)


@dataclass(frozen=True)
class ModelPreset:
    """A named training recipe: a factory name, its parameters and how much history to fit on.

    Attributes:
        model: a key of :data:`MODEL_FACTORIES`.
        params: the factory's keyword arguments.
        history_days: labelled days before the protocol's 7-day training week that the
            model is also fitted on (:attr:`models.evaluation.SplitSpec.history_days`); the
            test set is the same whatever this is.
        features: the input columns (the handbook's 15, or :data:`EXTENDED_FEATURES`).
        description: where the parameters come from.

    Example:
        >>> MODEL_PRESETS["logistic_regression"].build(seed=1).params["C"]
        1.0
    """

    model: str
    params: Mapping[str, Any] = field(default_factory=dict)
    history_days: int = 0
    features: tuple[str, ...] = HANDBOOK_FEATURES
    description: str = field(default="", compare=False)

    def build(self, seed: int = 0, *, parallel: bool = False, **overrides: Any) -> FraudModel:
        """An unfitted model of this recipe; ``overrides`` replace parameters.

        ``parallel`` lets a random forest grow its trees on every core (the scores are the
        same; histogram gradient boosting always uses the cores OpenMP gives it).
        """
        params = dict(self.params) | overrides
        if parallel and self.model in ("random_forest", "forest_and_boosting"):
            params.setdefault("n_jobs", -1)
        model = make_model(self.model, seed=seed, **params)
        model.features = tuple(self.features)
        return model


#: Recipes by name: the handbook's baselines (library defaults, which reproduce its chapter 3
#: numbers), the ``*_tuned`` recipes on the same 15 inputs and the ``*_history`` recipes on
#: :data:`EXTENDED_FEATURES`, chosen on the validation folds only (how: :mod:`models.tuning`).
MODEL_PRESETS: dict[str, ModelPreset] = {
    "logistic_regression": ModelPreset("logistic_regression", description="handbook chapter 3 (C=1)"),
    "decision_tree": ModelPreset("decision_tree", {"max_depth": 2}, description="handbook chapter 3"),
    "random_forest": ModelPreset("random_forest", description="handbook chapter 3 (100 trees)"),
    "hist_gradient_boosting": ModelPreset("hist_gradient_boosting", description="scikit-learn defaults"),
    "random_forest_tuned": ModelPreset(
        "random_forest", {"min_samples_leaf": 5, "max_features": 0.5}, history_days=28,
        description="best mean validation AP of models.tuning.SEARCH_SPACE"),
    "hist_gradient_boosting_tuned": ModelPreset(
        "hist_gradient_boosting",
        {"learning_rate": 0.03, "max_iter": 300, "max_leaf_nodes": 15, "min_samples_leaf": 100,
         "l2_regularization": 1.0}, history_days=21,
        description="best mean validation AP of the boosting candidates of models.tuning.SEARCH_SPACE"),
    "hist_gradient_boosting_history": ModelPreset(
        "hist_gradient_boosting",
        {"learning_rate": 0.03, "max_iter": 300, "max_leaf_nodes": 15, "min_samples_leaf": 100,
         "l2_regularization": 1.0}, history_days=21, features=EXTENDED_FEATURES,
        description="best validation CP@100 of the boosting in models.tuning.HISTORY_SEARCH_SPACE"),
}
#: The recipe a fraud pipeline ships (``eventray evaluate fraud`` prints it beside the baselines).
SHIPPED_RECIPE = "hist_gradient_boosting_history"


def find_preset(name: str) -> ModelPreset:
    """The preset ``name``; a bare factory name without a preset gets its default parameters.

    Raises:
        UnknownModelError: ``name`` is neither a preset nor a factory (lists both).

    Example:
        >>> find_preset("decision_tree").params
        {'max_depth': 2}
    """
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if name in MODEL_FACTORIES:
        return ModelPreset(name)
    raise UnknownModelError(name, sorted(set(MODEL_PRESETS) | set(MODEL_FACTORIES)))


class AlertPolicy(Protocol):
    """Turns a batch of scores into alert flags; never looks at features or labels."""

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """One boolean per score: raise an alert or not."""
        ...


@dataclass(frozen=True)
class AlertThreshold:
    """Alert on every score at or above ``threshold``.

    Example:
        >>> AlertThreshold(0.3).decide(np.array([0.1, 0.3, 0.9])).tolist()
        [False, True, True]
    """

    threshold: float = 0.5

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Flags ``scores >= threshold``."""
        return np.asarray(scores) >= self.threshold


@dataclass(frozen=True)
class TopKAlerts:
    """Alert on the ``k`` highest scores of a batch (an investigators' daily budget).

    Ties at the k-th score are broken by position (earlier rows first), so exactly
    ``min(k, len(scores))`` alerts are raised.

    Example:
        >>> TopKAlerts(2).decide(np.array([0.2, 0.9, 0.5, 0.1])).tolist()
        [False, True, True, False]
    """

    k: int = 100

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Flags the top ``k`` scores."""
        scores = np.asarray(scores)
        flags = np.zeros(scores.shape[0], dtype=bool)
        flags[np.argsort(-scores, kind="stable")[: self.k]] = True
        return flags
