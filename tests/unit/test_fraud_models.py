"""Unit tests for models.fraud (classifiers, alert policies) and models.registry (no Ray)."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import skops.io as sio
from threadpoolctl import threadpool_limits

from models import registry as registry_module
from models.fraud import (
    EXTENDED_FEATURES,
    HANDBOOK_FEATURES,
    HISTORY_FEATURES,
    MODEL_FACTORIES,
    MODEL_PRESETS,
    SHIPPED_RECIPE,
    AlertThreshold,
    FeatureError,
    FraudModel,
    ModelPreset,
    TopKAlerts,
    TreeEnsemble,
    UnknownModelError,
    find_preset,
    make_model,
)
from models.registry import ModelNotFoundError, ModelRegistry, RegistryError

ARTIFACT_FILES = ["metadata.json", "model.skops"]
CREATED = dt.datetime(2018, 8, 15, 12, 0, tzinfo=dt.UTC)
# Small settings so every model fits in well under a second.
FAST_PARAMS: dict[str, dict[str, object]] = {
    "logistic_regression": {},
    "decision_tree": {},
    "random_forest": {"n_estimators": 10, "max_depth": 6},
    "hist_gradient_boosting": {"max_iter": 20},
    "forest_and_boosting": {"forest": {"n_estimators": 10, "max_depth": 6}, "boosting": {"max_iter": 20}},
}


def synthetic_frame(n: int = 1500, seed: int = 0) -> pl.DataFrame:
    """Random features with a learnable fraud signal (about 10% positives)."""
    rng = np.random.default_rng(seed)
    columns = {name: rng.normal(size=n) for name in HANDBOOK_FEATURES}
    signal = 2.0 * columns["TERMINAL_ID_RISK_7DAY_WINDOW"] + columns["TX_AMOUNT"] - 2.5
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-signal))).astype(np.int64)
    return pl.DataFrame(columns | {"TX_FRAUD": labels})


@pytest.fixture(autouse=True)
def one_native_thread() -> Iterator[None]:
    # OpenMP (histogram gradient boosting) spins badly when the test machine is busy.
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return synthetic_frame()


@pytest.fixture(scope="module")
def fitted_tree(frame: pl.DataFrame) -> FraudModel:
    return make_model("decision_tree", seed=0).fit(frame)


# --- models -----------------------------------------------------------------------------


def test_registry_names_the_models() -> None:
    assert sorted(MODEL_FACTORIES) == [
        "decision_tree",
        "forest_and_boosting",
        "hist_gradient_boosting",
        "logistic_regression",
        "random_forest",
    ]


def test_unknown_model_lists_the_allowed_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        make_model("xgboost")
    assert info.value.allowed == sorted(MODEL_FACTORIES)
    assert "allowed: decision_tree, forest_and_boosting, hist_gradient_boosting" in str(info.value)


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_scores_are_probabilities_one_per_row(name: str, frame: pl.DataFrame) -> None:
    model = make_model(name, seed=0, **FAST_PARAMS[name]).fit(frame)
    scores = model.score(frame)
    assert scores.shape == (frame.height,) and scores.dtype == np.float64
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    labels = frame["TX_FRAUD"].to_numpy()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_same_seed_same_scores(name: str, frame: pl.DataFrame) -> None:
    first = make_model(name, seed=7, **FAST_PARAMS[name]).fit(frame).score(frame)
    second = make_model(name, seed=7, **FAST_PARAMS[name]).fit(frame).score(frame)
    np.testing.assert_array_equal(first, second)


def test_the_seed_matters_for_random_forests(frame: pl.DataFrame) -> None:
    first = make_model("random_forest", seed=1, **FAST_PARAMS["random_forest"]).fit(frame)
    second = make_model("random_forest", seed=2, **FAST_PARAMS["random_forest"]).fit(frame)
    assert not np.array_equal(first.score(frame), second.score(frame))


def test_scoring_is_pure_per_batch(fitted_tree: FraudModel, frame: pl.DataFrame) -> None:
    whole = fitted_tree.score(frame)
    halves = np.concatenate([fitted_tree.score(frame[:700]), fitted_tree.score(frame[700:])])
    np.testing.assert_array_equal(whole, halves)


def test_extra_columns_and_column_order_do_not_matter(fitted_tree: FraudModel, frame: pl.DataFrame) -> None:
    shuffled = frame.select(reversed(frame.columns)).with_columns(pl.lit("x").alias("event_id"))
    np.testing.assert_array_equal(fitted_tree.score(shuffled), fitted_tree.score(frame))


def test_missing_feature_and_unfitted_model_raise(fitted_tree: FraudModel, frame: pl.DataFrame) -> None:
    with pytest.raises(FeatureError, match="TERMINAL_ID_RISK_1DAY_WINDOW"):
        fitted_tree.score(frame.drop("TERMINAL_ID_RISK_1DAY_WINDOW"))
    with pytest.raises(FeatureError, match="not fitted"):
        make_model("logistic_regression").score(frame)


def test_constructor_arguments_are_attributes() -> None:
    model = make_model("hist_gradient_boosting", seed=5, learning_rate=0.05)
    assert (model.name, model.seed, model.features) == ("hist_gradient_boosting", 5, HANDBOOK_FEATURES)
    assert model.params["learning_rate"] == 0.05
    assert model.estimator[-1].random_state == 5
    assert [step for step, _ in model.estimator.steps] == ["scale", "classify"]


def test_alert_policies_decide_from_scores_only() -> None:
    scores = np.array([0.1, 0.7, 0.5, 0.7, 0.2])
    assert AlertThreshold(0.5).decide(scores).tolist() == [False, True, True, True, False]
    assert TopKAlerts(2).decide(scores).tolist() == [False, True, False, True, False]
    assert TopKAlerts(10).decide(scores).sum() == 5


def test_round_trip_keeps_scores_and_metadata(
    tmp_path: Path, fitted_tree: FraudModel, frame: pl.DataFrame
) -> None:
    registry = ModelRegistry(tmp_path)
    version = registry.save(
        fitted_tree,
        created_at=CREATED,
        name="fraud-tree",
        training_range=(dt.date(2018, 7, 25), dt.date(2018, 7, 31)),
        metrics={"average_precision": 0.5},
    )
    loaded = registry.load("fraud-tree")
    np.testing.assert_array_equal(loaded.model.score(frame), fitted_tree.score(frame))
    facts = loaded.metadata
    assert version == facts["version"] == 1
    assert facts["name"] == "fraud-tree" and facts["model"] == "decision_tree"
    assert facts["features"] == list(HANDBOOK_FEATURES) and facts["seed"] == 0
    assert facts["training_range"] == {"start": "2018-07-25", "end": "2018-07-31"}
    assert facts["metrics"] == {"average_precision": 0.5}
    assert facts["created_at"] == "2018-08-15T12:00:00+00:00"
    assert {"python", "scikit-learn", "numpy", "skops"} <= set(facts["library_versions"])
    assert facts["trusted_types"] == ["sklearn.tree._tree.Tree"]
    assert sorted(p.name for p in (tmp_path / "fraud-tree" / "1").iterdir()) == ARTIFACT_FILES


def test_versions_increase_and_latest_is_default(tmp_path: Path, fitted_tree: FraudModel) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.latest_version("decision_tree") is None and registry.list() == []
    versions = [registry.save(fitted_tree, created_at=CREATED, metrics={"run": i}) for i in range(3)]
    assert versions == [1, 2, 3]
    assert registry.latest_version("decision_tree") == 3
    assert registry.load("decision_tree").metadata["metrics"] == {"run": 2.0}
    assert registry.load("decision_tree", version=1).metadata["metrics"] == {"run": 0.0}
    assert [(v.name, v.version) for v in registry.list()] == [("decision_tree", n) for n in (1, 2, 3)]
    with pytest.raises(ModelNotFoundError):
        registry.load("decision_tree", version=4)
    with pytest.raises(ModelNotFoundError):
        registry.load("nothing-here")


def test_loading_never_uses_pickle(
    tmp_path: Path, fitted_tree: FraudModel, frame: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path)
    registry.save(fitted_tree, created_at=CREATED)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for attribute in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attribute, refuse)
    loaded = registry.load("decision_tree")
    np.testing.assert_array_equal(loaded.model.score(frame), fitted_tree.score(frame))


def test_untrusted_types_are_refused(tmp_path: Path, fitted_tree: FraudModel) -> None:
    registry = ModelRegistry(tmp_path)
    registry.save(fitted_tree, created_at=CREATED)
    path = tmp_path / "decision_tree" / "1" / "metadata.json"
    facts = json.loads(path.read_text())
    for tampered in (["builtins.eval"], ["os.system", "sklearn.tree._tree.Tree"]):
        path.write_text(json.dumps(facts | {"trusted_types": tampered}))
        with pytest.raises(RegistryError, match=f"refusing untrusted types: {tampered[0]}"):
            registry.load("decision_tree")
    path.write_text(json.dumps(facts | {"trusted_types": []}))  # trust comes from code
    assert registry.load("decision_tree").model.name == "decision_tree"


def test_a_tampered_registry_cannot_widen_what_loads(
    tmp_path: Path, fitted_tree: FraudModel
) -> None:
    # An artifact carrying a function from a trusted library (numpy.load can unpickle), with
    # metadata that lists it: only the types fixed in code may load.
    registry = ModelRegistry(tmp_path)
    registry.save(fitted_tree, created_at=CREATED)
    version = tmp_path / "decision_tree" / "1"
    estimator = sio.load(version / "model.skops", trusted=["sklearn.tree._tree.Tree"])
    estimator.loader = np.load
    sio.dump(estimator, version / "model.skops")
    needed = sio.get_untrusted_types(file=version / "model.skops")
    assert any("load" in name for name in needed)
    facts = json.loads((version / "metadata.json").read_text())
    (version / "metadata.json").write_text(json.dumps(facts | {"trusted_types": needed}))
    with pytest.raises(RegistryError, match="refusing untrusted types: .*load"):
        registry.load("decision_tree")


def test_save_rejects_bad_input(tmp_path: Path, fitted_tree: FraudModel) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError, match="timezone-aware"):
        registry.save(fitted_tree, created_at=dt.datetime(2018, 8, 15))
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.save(fitted_tree, created_at=CREATED, name="../escape")
    with pytest.raises(RegistryError, match="not fitted"):
        registry.save(make_model("decision_tree"), created_at=CREATED)
    assert registry.list() == []


def test_a_version_appears_complete_or_not_at_all(
    tmp_path: Path, fitted_tree: FraudModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path)
    registry.save(fitted_tree, created_at=CREATED)
    seen: list[tuple[int | None, list[str]]] = []
    real_rename = registry_module.os.rename

    def observing_rename(source: str, target: str) -> None:
        # Just before publication the files are complete but the version is not visible.
        files = sorted(p.name for p in Path(source).iterdir())
        seen.append((registry.latest_version("decision_tree"), files))
        real_rename(source, target)

    monkeypatch.setattr(registry_module.os, "rename", observing_rename)
    assert registry.save(fitted_tree, created_at=CREATED) == 2
    assert seen == [(1, ARTIFACT_FILES)]
    assert [p.name for p in (tmp_path / "decision_tree").iterdir() if p.name.startswith(".")] == []


def test_pollers_only_ever_load_complete_versions(tmp_path: Path, fitted_tree: FraudModel) -> None:
    registry = ModelRegistry(tmp_path)
    registry.save(fitted_tree, created_at=CREATED)
    errors: list[Exception] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                registry.load("decision_tree")
            except Exception as error:  # any failure is the finding
                errors.append(error)

    def save_four() -> None:
        for _ in range(4):
            registry.save(fitted_tree, created_at=CREATED)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        writers = [threading.Thread(target=save_four) for _ in range(2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    finally:
        stop.set()
        poller.join()
    assert errors == []
    assert [v.version for v in registry.list()] == list(range(1, 10))


# --- presets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds_its_model(name: str) -> None:
    preset = MODEL_PRESETS[name]
    model = preset.build(seed=4)
    assert (model.name, model.seed) == (preset.model, 4)
    assert {key: model.params[key] for key in preset.params} == dict(preset.params)
    assert preset.history_days >= 0 and preset.description


def test_find_preset_takes_factory_names_and_lists_both_kinds() -> None:
    assert find_preset("decision_tree") == MODEL_PRESETS["decision_tree"]
    assert find_preset("random_forest").build(n_estimators=3).params["n_estimators"] == 3
    with pytest.raises(UnknownModelError) as info:
        find_preset("xgboost")
    assert set(MODEL_PRESETS) | set(MODEL_FACTORIES) == set(info.value.allowed)


def test_parallel_changes_a_forest_s_cores_not_its_parameters() -> None:
    forest = ModelPreset("random_forest", {"n_estimators": 5}).build(parallel=True)
    assert forest.estimator[-1].n_jobs == -1 and "n_jobs" not in forest.params
    logistic = ModelPreset("logistic_regression").build(parallel=True)
    assert logistic.params == make_model("logistic_regression").params


def test_logistic_scores_do_not_depend_on_the_batch() -> None:
    """A row's score is the same bits alone, in a small batch or in a large one."""
    rng = np.random.default_rng(5)
    rows = {name: rng.normal(size=3000) for name in HANDBOOK_FEATURES}
    frame = pl.DataFrame(rows | {"TX_FRAUD": (rng.random(3000) < 0.1).astype(int)})
    model = make_model("logistic_regression", seed=0).fit(frame)
    whole = model.score(frame)
    parts = np.concatenate([model.score(frame.slice(0, 1)), model.score(frame.slice(1, 17)),
                            model.score(frame.slice(18, 1000)), model.score(frame.slice(1018))])
    assert np.array_equal(whole, parts)
    reference = model.estimator.predict_proba(model.feature_matrix(frame))[:, 1]
    assert np.allclose(whole, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("params", [{"max_iter": 30}, {"max_iter": 15, "max_leaf_nodes": 63, "max_depth": 12},
                                    {"max_iter": 10, "learning_rate": 0.3, "l2_regularization": 1.0}])
def test_small_batches_of_boosted_trees_score_the_same_bits_as_scikit_learn(params: dict) -> None:
    """The small-batch evaluator (:class:`TreeEnsemble`) takes every branch scikit-learn
    takes, missing values and values on a threshold included, and sums the trees in its
    order: a row's score is the same bits in a batch of one, of a few, or of thousands."""
    rng = np.random.default_rng(11)
    n = 4000
    rows = {name: rng.normal(size=n) for name in HANDBOOK_FEATURES}
    rows["TX_AMOUNT"] = np.where(rng.random(n) < 0.1, np.nan, rows["TX_AMOUNT"])  # missing seen in training
    signal = 2.0 * rows["TERMINAL_ID_RISK_7DAY_WINDOW"] + np.nan_to_num(rows["TX_AMOUNT"], nan=1.5) - 2.5
    frame = pl.DataFrame(rows | {"TX_FRAUD": (rng.random(n) < 1 / (1 + np.exp(-signal))).astype(int)})
    model = make_model("hist_gradient_boosting", seed=0, **params).fit(frame)
    trees = TreeEnsemble.of(model.estimator)
    assert trees is not None and trees.depth > 1
    probe = model.feature_matrix(frame)[:600].copy()
    probe[rng.random(probe.shape) < 0.05] = np.nan  # missing in any feature, seen in training or not
    scaler = model.estimator[0]
    splits = np.flatnonzero(~trees.leaf)
    for row, node in enumerate(rng.choice(splits, 200)):  # exactly on a split's threshold
        feature = trees.feature[node]
        probe[row, feature] = trees.threshold[node] * scaler.scale_[feature] + scaler.mean_[feature]
    reference = model.estimator.predict_proba(probe)[:, 1]
    assert np.array_equal(trees.probability(probe), reference)
    alone = np.concatenate([model.score(pl.DataFrame(probe[i:i + 1], schema=list(HANDBOOK_FEATURES)))
                            for i in range(40)])
    few = np.concatenate([model.score(pl.DataFrame(probe[i:i + 7], schema=list(HANDBOOK_FEATURES)))
                          for i in range(0, 600, 7)])
    assert np.array_equal(alone, reference[:40]) and np.array_equal(few, reference)
    assert np.array_equal(model.score(pl.DataFrame(probe, schema=list(HANDBOOK_FEATURES))), reference)


def test_other_models_are_scored_by_scikit_learn_in_small_batches_too(frame: pl.DataFrame) -> None:
    for name in ("random_forest", "decision_tree", "forest_and_boosting"):
        model = make_model(name, seed=0, **FAST_PARAMS[name]).fit(frame)
        assert TreeEnsemble.of(model.estimator) is None
        head = frame.head(5)
        reference = model.estimator.predict_proba(model.feature_matrix(head))[:, 1]
        assert np.array_equal(model.score(head), reference)
    multi = make_model("hist_gradient_boosting", seed=0, max_iter=5).fit(
        frame.with_columns(TX_FRAUD=pl.int_range(pl.len()) % 3))
    assert TreeEnsemble.of(multi.estimator) is None  # three classes


def test_a_preset_s_features_are_its_model_s_inputs() -> None:
    shipped = MODEL_PRESETS[SHIPPED_RECIPE]
    assert shipped.features == EXTENDED_FEATURES == (*HANDBOOK_FEATURES, *HISTORY_FEATURES)
    model = shipped.build(seed=1, max_iter=5)
    assert model.features == EXTENDED_FEATURES
    rng = np.random.default_rng(0)
    train = pl.DataFrame({name: rng.normal(size=400) for name in EXTENDED_FEATURES}
                         | {"TX_FRAUD": rng.integers(0, 2, 400)})
    assert model.fit(train).score(train).shape == (400,)
    with pytest.raises(FeatureError, match="CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW"):
        model.score(train.select(HANDBOOK_FEATURES))  # a store without the history features
    assert MODEL_PRESETS["hist_gradient_boosting_tuned"].build().features == HANDBOOK_FEATURES

