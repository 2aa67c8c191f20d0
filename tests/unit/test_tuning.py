"""models.tuning: candidates ranked on the validation folds, which never reach a test week."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from models.evaluation import VALIDATION_ANCHOR, EvaluationError
from models.fraud import HANDBOOK_FEATURES, MODEL_PRESETS, ModelPreset
from models.tuning import SEARCH_SPACE, select_presets


def validation_history(first: dt.date, last: dt.date, per_day: int = 120, seed: int = 0) -> pl.DataFrame:
    """Random features with a fraud signal, ``per_day`` transactions a day from first to last."""
    rng = np.random.default_rng(seed)
    n_days = (last - first).days + 1
    n = n_days * per_day
    columns = {name: rng.normal(size=n) for name in HANDBOOK_FEATURES}
    signal = 2.5 * columns["TERMINAL_ID_RISK_7DAY_WINDOW"] + columns["TX_AMOUNT"] - 3.0
    times = [dt.datetime.combine(first, dt.time(12)) + dt.timedelta(days=d) for d in range(n_days)]
    return pl.DataFrame(columns | {
        "TRANSACTION_ID": np.arange(n),
        "TX_DATETIME": np.repeat(np.array(times, dtype="datetime64[us]"), per_day),
        "CUSTOMER_ID": rng.integers(0, 800, n),
        "TX_FRAUD": (rng.random(n) < 1.0 / (1.0 + np.exp(-signal))).astype(np.int64),
    })


CANDIDATES = {
    "logistic": ModelPreset("logistic_regression"),
    "stump, more history": ModelPreset("decision_tree", {"max_depth": 1}, history_days=5),
}


def test_candidates_are_ranked_on_the_validation_folds() -> None:
    # The data ends with the last validation week: a test week is not needed, nor read.
    frame = validation_history(dt.date(2018, 6, 10), VALIDATION_ANCHOR.test_end - dt.timedelta(days=1))
    progress: list[str] = []
    ranking = select_presets(frame, CANDIDATES, on_candidate=lambda label, means: progress.append(label))
    assert ranking.columns == ["candidate", "roc_auc", "average_precision", "card_precision_at_100",
                               "history_days"]
    assert ranking["candidate"].to_list() == ["logistic", "stump, more history"]
    assert ranking["history_days"].to_list() == [0, 5]
    assert progress == list(CANDIDATES)


def test_history_beyond_the_data_is_refused() -> None:
    frame = validation_history(dt.date(2018, 6, 18), VALIDATION_ANCHOR.test_end - dt.timedelta(days=1))
    with pytest.raises(EvaluationError, match="the split needs 2018-06-15"):
        select_presets(frame, {"stump": CANDIDATES["stump, more history"]})



def test_the_tuned_presets_come_from_the_search_space() -> None:
    tuned = {name: preset for name, preset in MODEL_PRESETS.items() if name.endswith("_tuned")}
    assert tuned and all(preset in SEARCH_SPACE.values() for preset in tuned.values())


def test_the_shipped_recipe_is_a_history_candidate() -> None:
    from models.fraud import SHIPPED_RECIPE
    from models.tuning import HISTORY_SEARCH_SPACE

    assert MODEL_PRESETS[SHIPPED_RECIPE] in HISTORY_SEARCH_SPACE.values()
