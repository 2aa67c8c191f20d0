"""How the tuned fraud recipes were chosen: candidates ranked on the validation folds only.

Selection follows the handbook's chapter 5 as :mod:`models.evaluation` reads it: every
candidate (:class:`~models.fraud.ModelPreset`: a model, its parameters and its extra
history days) is fitted on each of the 4 validation folds anchored at
:data:`~models.evaluation.VALIDATION_ANCHOR` (test weeks starting 07-25, 07-18, 07-11 and
07-04) and ranked by its mean validation Average Precision, ties by CP@100. No test week of
the default split or of the 4 test folds that start after 07-31 is seen by the selection.
The winners are :data:`models.fraud.MODEL_PRESETS` entries named ``*_tuned``; the test
numbers are computed only afterwards (``eventray evaluate fraud --folds``).

:data:`SEARCH_SPACE` is the last round of the search (earlier, coarser rounds went the same
way and are summarised in the docstrings of the tuned presets); ``eventray evaluate fraud
--select`` runs it again and prints the ranking.

Example:
    >>> sorted({preset.model for preset in SEARCH_SPACE.values()})
    ['hist_gradient_boosting', 'random_forest']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial

import polars as pl

from models.evaluation import VALIDATION_ANCHOR, MetricName, select_model
from models.fraud import ModelPreset

#: The candidates of the last search round, by label.
SEARCH_SPACE: dict[str, ModelPreset] = {
    "rf default": ModelPreset("random_forest"),
    "hgb lr=0.03 it=300 leaves=15 leaf=100 l2=1 h=21": ModelPreset(
        "hist_gradient_boosting",
        {"learning_rate": 0.03, "max_iter": 300, "max_leaf_nodes": 15, "min_samples_leaf": 100,
         "l2_regularization": 1.0}, history_days=21),
}


def select_presets(
    frame: pl.DataFrame,
    candidates: Mapping[str, ModelPreset] = SEARCH_SPACE,
    metric: MetricName = "average_precision",
    seed: int = 0,
    on_candidate: Callable[[str, dict[str, float]], None] | None = None,
) -> pl.DataFrame:
    """Rank ``candidates`` by mean validation ``metric`` (ties: CP@100, then label), best first.

    Each candidate goes through :func:`models.evaluation.select_model` with the validation
    anchor given its own ``history_days``; the test set of a fold does not depend on it.

    Args:
        frame: labelled transactions covering the validation folds (and their history).
        candidates: label -> recipe.
        metric: the ranking metric.
        seed: every candidate's seed.
        on_candidate: called with each label and its mean metrics (progress).

    Returns:
        One row per candidate: ``candidate``, ``history_days`` and the three mean metrics.
    """
    rows = []
    for label, preset in candidates.items():
        anchor = replace(VALIDATION_ANCHOR, history_days=preset.history_days)
        factory = partial(preset.build, seed, parallel=True)
        ranked = select_model({label: factory}, frame, anchor, metric=metric)
        row = ranked.with_columns(pl.lit(preset.history_days).alias("history_days"))
        if on_candidate is not None:
            on_candidate(label, row.drop("candidate", "history_days").row(0, named=True))
        rows.append(row)
    order = [*dict.fromkeys([metric, "card_precision_at_100"]), "candidate"]
    return pl.concat(rows).sort(order, descending=[True] * (len(order) - 1) + [False])
