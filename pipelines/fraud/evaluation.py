"""``eventray evaluate fraud``: the fraud handbook's protocol over the pipeline's features.

Each model recipe (:data:`models.fraud.MODEL_PRESETS`, or a bare factory name) is fitted and
tested on the handbook's default split (train 2018-07-25..07-31, 7 days of delay, test
08-08..08-14, known compromised cards removed) and, with ``folds``, on chapter 5's four
weekly test folds (test weeks starting 08-08, 08-01, 07-25, 07-18; the mean is reported).
The features come from the event store a fraud pipeline run wrote (the default) or, for a
parity cross-check and for development without a pipeline run, are computed offline from
the handbook's files (:mod:`pipelines.fraud.data`). The result is the handbook's published
table with our rows beside it (:func:`models.evaluation.format_comparison`) and a summary.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import polars as pl

from models.evaluation import (
    DEFAULT_SPLIT,
    METRIC_NAMES,
    VALIDATION_ANCHOR,
    Metrics,
    SplitSpec,
    evaluate_prequential,
    fit_and_evaluate,
    format_comparison,
    mean_metrics,
    prequential_folds,
    published_results,
)
from models.fraud import SHIPPED_RECIPE, ModelPreset, find_preset
from models.tuning import SEARCH_SPACE, select_presets
from pipelines.errors import ConfigError
from pipelines.fraud.data import (
    FeatureSource,
    compare_frames,
    feature_frame,
    load_frame,
    model_errors,
    offline_feature_frame,
)

#: The recipes evaluated when none are named: the handbook's baselines, our tuned ones on the
#: same 15 inputs (the comparable baseline) and, last, the shipped recipe on the 15 inputs plus
#: the history features.
DEFAULT_MODELS: tuple[str, ...] = ("logistic_regression", "random_forest", "hist_gradient_boosting",
                                   "hist_gradient_boosting_tuned", "random_forest_tuned", SHIPPED_RECIPE)
N_FOLDS = 4
Log = Callable[[str], None]


def data_range(models: Sequence[str], folds: bool) -> tuple[dt.date, dt.date]:
    """The days ``[first, end)`` the evaluation reads: every fit's history to the last test day.

    Example:
        >>> [day.isoformat() for day in data_range(["logistic_regression"], folds=True)]
        ['2018-07-04', '2018-08-15']
    """
    history = max(find_preset(name).history_days for name in models)
    anchor = replace(DEFAULT_SPLIT, history_days=history)
    splits = prequential_folds(anchor, N_FOLDS) if folds else [anchor]
    return min(spec.fit_start for spec in splits), DEFAULT_SPLIT.test_end


def evaluate_recipe(name: str, frame: pl.DataFrame, folds: bool, seed: int, log: Log) -> list[dict[str, Any]]:
    """Result rows (``model``, ``protocol``, metrics) of one recipe, per fold too."""
    preset = find_preset(name)
    anchor = replace(DEFAULT_SPLIT, history_days=preset.history_days)

    def factory() -> Any:
        return preset.build(seed=seed, parallel=True)

    started = time.perf_counter()

    def progress(fold: int, spec: SplitSpec, metrics: Metrics) -> None:
        log(f"{name}: fold {fold + 1}/{N_FOLDS} (test from {spec.test_start}) {_short(metrics)} "
            f"({time.perf_counter() - started:.1f} s)")

    if not folds:
        default = fit_and_evaluate(factory, frame, anchor)
        log(f"{name}: default split {_short(default)} ({time.perf_counter() - started:.1f} s)")
        return [{"model": name, "protocol": "default split"} | asdict(default)]
    # Fold 1 of the test folds is the default split itself: one fit serves both rows.
    per_fold = evaluate_prequential(factory, frame, anchor, N_FOLDS, on_fold=progress)
    default = per_fold.row(0, named=True)
    return [{"model": name, "protocol": "default split"} | {key: default[key] for key in METRIC_NAMES},
            {"model": name, "protocol": "4 test folds"} | asdict(mean_metrics(per_fold))
            | {"per_fold": per_fold.with_columns(pl.col("test_start").cast(pl.String)).to_dicts()}]


def _short(metrics: Metrics) -> str:
    auc, ap, cp = metrics.rounded()
    return f"AUC {auc:.3f} AP {ap:.3f} CP@100 {cp:.3f}"


def _beats(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per protocol: the best published AP and CP@100 and whether our best rows exceed them."""
    published = published_results()
    verdict = {}
    for protocol in dict.fromkeys(row["protocol"] for row in rows):
        reference = published.filter(pl.col("protocol") == protocol)
        ours = [row for row in rows if row["protocol"] == protocol]
        verdict[protocol] = {}
        for metric in ("average_precision", "card_precision_at_100"):
            best = max(ours, key=lambda row: row[metric])
            target = float(reference.get_column(metric).max())  # type: ignore[arg-type]
            verdict[protocol][metric] = {"published_best": target, "ours_best": round(best[metric], 4),
                                         "model": best["model"], "beaten": best[metric] > target}
    return verdict


def parity_check(
    store: str | Path | None, data: str | Path | None, start: dt.date, end: dt.date
) -> dict[str, int]:
    """How many of the store's feature rows differ from the same rows computed offline.

    Raises:
        ConfigError: ``store`` or ``data`` is missing.
    """
    if store is None or data is None:
        raise ConfigError("--parity needs both --store and --data")
    return compare_frames(feature_frame(store, start, end), offline_feature_frame(data, start, end))


def evaluate_fraud(
    *,
    source: FeatureSource = "store",
    store: str | Path | None = None,
    data: str | Path | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    folds: bool = False,
    parity: bool = False,
    seed: int = 0,
    log: Log = print,
) -> tuple[str, dict[str, Any]]:
    """Evaluate ``models`` by the handbook protocol; returns the comparison table and a summary.

    Raises:
        ConfigError: a location is missing, or a recipe name is unknown.
        StoreError: the store lacks the fraud step's scores or labels.
        ModelCommandError: the data cannot support the protocol's splits.
    """
    with model_errors():
        for name in models:
            find_preset(name)
        start, end = data_range(models, folds)
        started = time.perf_counter()
        frame = load_frame(source, store=store, data=data, start=start, end=end)
        log(f"read {frame.height} labelled transactions ({source}, {start}..{end - dt.timedelta(days=1)}) "
            f"in {time.perf_counter() - started:.1f} s")
        rows = [row for name in models for row in evaluate_recipe(name, frame, folds, seed, log)]
    table = format_comparison(pl.DataFrame([{k: row[k] for k in ("model", "protocol", *METRIC_NAMES)}
                                            for row in rows]))
    summary: dict[str, Any] = {
        "features": source, "store": None if store is None else str(store),
        "rows": frame.height, "frauds": int(frame.get_column("TX_FRAUD").sum()), "seed": seed,
        "results": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
        "versus_published": _beats(rows),
    }
    shipped = {row["protocol"]: {k: round(row[k], 4) for k in METRIC_NAMES} for row in rows
               if row["model"] == SHIPPED_RECIPE}
    if shipped:
        summary["shipped"] = {"model": SHIPPED_RECIPE} | shipped
    if parity:
        summary["parity"] = parity_check(store, data, start, end)
    return table, summary


def select_recipes(
    *,
    source: FeatureSource = "store",
    store: str | Path | None = None,
    data: str | Path | None = None,
    candidates: Mapping[str, ModelPreset] = SEARCH_SPACE,
    seed: int = 0,
    log: Log = print,
) -> tuple[str, dict[str, Any]]:
    """Rank ``candidates`` on the validation folds; the ranking as text and a summary.

    Only transactions before the end of the last validation week (2018-08-01) are read, so
    the selection cannot see a test week of the default split.
    """
    history = max(preset.history_days for preset in candidates.values())
    folds = prequential_folds(replace(VALIDATION_ANCHOR, history_days=history), N_FOLDS)
    start, end = min(spec.fit_start for spec in folds), VALIDATION_ANCHOR.test_end
    with model_errors():
        frame = load_frame(source, store=store, data=data, start=start, end=end)
        log(f"selecting among {len(candidates)} candidates on {frame.height} transactions "
            f"({start}..{end - dt.timedelta(days=1)})")
        started = time.perf_counter()

        def progress(label: str, means: dict[str, float]) -> None:
            log(f"{label}: validation {_short(Metrics(**means))} ({time.perf_counter() - started:.0f} s)")

        ranking = select_presets(frame, candidates, seed=seed, on_candidate=progress)
    rows = ranking.to_dicts()
    width = max(len("candidate"), *(len(row["candidate"]) for row in rows)) + 2
    lines = [f"{'candidate':<{width}}{'AUC':>5}  {'AP':>5}  {'CP@100':>6}   (validation folds)"]
    lines += [f"{row['candidate']:<{width}}{row['roc_auc']:.3f}  {row['average_precision']:.3f}   "
              f"{row['card_precision_at_100']:.3f}" for row in rows]
    summary = {"selection": "validation folds", "metric": "average_precision", "read_until": str(end),
               "rows": frame.height, "last_transaction": str(frame.get_column("TX_DATETIME").max()),
               "ranking": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                           for row in rows], "chosen": rows[0]["candidate"]}
    return "\n".join(lines), summary
