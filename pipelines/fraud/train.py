"""``eventray train``: fit a fraud model on the store's features over a time range, save it.

The training set is every labelled transaction with time in ``[start, end)`` (whole days),
read with :func:`pipelines.fraud.data.feature_frame` (or computed offline, for development).
When the data also holds the week that starts 7 days after the range (the labels of the
range's last days arrive 7 days late, so the handbook waits that long before testing), the
model is validated on it by the handbook's protocol (known compromised cards removed, ROC
AUC, Average Precision, CP@100); with ``--start 2018-07-25 --end 2018-08-01`` this is the
handbook's default split. The fitted model goes to a :class:`models.registry.ModelRegistry`
under ``name`` with its features, training range, metrics, parameters, seed, library
versions and version number.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from models.evaluation import EvaluationError, SplitSpec, evaluate_scores, split_train_test
from models.fraud import LABEL, FraudModel, find_preset
from models.registry import ModelRegistry, ModelVersion
from pipelines.errors import ConfigError
from pipelines.fraud.data import FeatureSource, ModelCommandError, load_frame, model_errors

VALIDATION_DELAY_DAYS = 7
VALIDATION_DAYS = 7
Log = Callable[[str], None]


def parse_params(text: str | None) -> dict[str, Any]:
    """``--params``: a JSON object of factory keyword arguments.

    Raises:
        ConfigError: not JSON, or not an object.

    Example:
        >>> parse_params('{"max_iter": 300, "learning_rate": 0.05}')
        {'max_iter': 300, 'learning_rate': 0.05}
    """
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"--params is not valid JSON: {error}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"--params must be a JSON object, got {type(params).__name__}")
    return params


def build_model(name: str, params: Mapping[str, Any], seed: int) -> FraudModel:
    """The recipe ``name`` (a preset or a factory name) with ``params`` overriding its own.

    Raises:
        ModelCommandError: unknown name (the message lists the allowed ones).
        ConfigError: a parameter the factory does not take.
    """
    with model_errors():
        preset = find_preset(name)
    try:
        return preset.build(seed=seed, parallel=True, **params)
    except TypeError as error:
        raise ConfigError(f"--params for {preset.model}: {error}") from None


def validation_spec(start: dt.date, end: dt.date) -> SplitSpec:
    """Train on ``[start, end)``, wait 7 days, validate on the next 7.

    Example:
        >>> validation_spec(dt.date(2018, 7, 25), dt.date(2018, 8, 1)).test_start
        datetime.date(2018, 8, 8)
    """
    return SplitSpec(start, train_days=(end - start).days, delay_days=VALIDATION_DELAY_DAYS,
                     test_days=VALIDATION_DAYS)


def _validate(model: FraudModel, frame: pl.DataFrame, spec: SplitSpec) -> dict[str, Any]:
    """Metrics on the validation week, or why there are none."""
    last_day = frame.get_column("TX_DATETIME").max()
    needed = spec.test_end - dt.timedelta(days=1)
    if last_day is None or last_day.date() < needed:  # type: ignore[union-attr]
        return {"status": "skipped", "reason": f"no labelled data up to {needed} (the week after the delay)"}
    try:
        split = split_train_test(frame, spec)
    except EvaluationError as error:
        return {"status": "skipped", "reason": str(error)}
    metrics = evaluate_scores(split.test, model.score(split.test))
    return {"status": "done", "test_start": spec.test_start.isoformat(),
            "test_end": spec.test_end.isoformat(), "rows": split.test.height,
            "frauds": int(split.test.get_column(LABEL).sum()), "metrics": asdict(metrics)}


def _training_set(frame: pl.DataFrame, start: dt.date, end: dt.date) -> pl.DataFrame:
    day = pl.col("TX_DATETIME").dt.date()
    train = frame.filter((day >= start) & (day < end))
    frauds = int(train.get_column(LABEL).sum()) if train.height else 0
    if train.height == 0 or frauds in (0, train.height):
        raise ModelCommandError(f"the range {start}..{end} holds {train.height} labelled transactions, "
                                f"{frauds} of them fraud: need both classes to train")
    return train


def train_model(
    *,
    model: str,
    start: dt.date,
    end: dt.date,
    registry: str | Path,
    name: str | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    source: FeatureSource = "store",
    store: str | Path | None = None,
    data: str | Path | None = None,
    created_at: dt.datetime | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Fit ``model`` on ``[start, end)``, validate it when the data allows, save it; the summary.

    Args:
        model: a preset or factory name (:func:`models.fraud.find_preset`); a preset's
            ``history_days`` does not apply here, the range is the training data.
        start: first training day.
        end: the day after the last training day.
        registry: the registry directory.
        name: the registry name (default: ``model``).
        params: factory arguments overriding the preset's.
        seed: the model's seed.
        source: ``store`` (the pipeline's features) or ``offline`` (computed from ``data``).
        store: the event store (``source="store"``).
        data: the folder of monthly transaction files (``source="offline"``).
        created_at: the time to record (default: now, UTC).
        log: progress messages.

    Raises:
        ConfigError: bad range, parameters or locations.
        StoreError: the store lacks the fraud step's scores or labels.
        ModelCommandError: unknown model, one-class training data, or a registry error.
    """
    if end <= start:
        raise ConfigError(f"--end {end} must be after --start {start}")
    fitted = build_model(model, params or {}, seed)
    with model_errors():
        ModelRegistry(registry).latest_version(name or model)  # a bad name fails before the fit
    spec = validation_spec(start, end)
    started = time.perf_counter()
    frame = load_frame(source, store=store, data=data, start=start, end=spec.test_end)
    train = _training_set(frame, start, end)
    log(f"training {model} on {train.height} transactions ({start}..{end - dt.timedelta(days=1)})")
    with model_errors():
        fitted.fit(train)
        validation = _validate(fitted, frame, spec)
        log(f"fitted in {time.perf_counter() - started:.1f} s; validation {validation['status']}: "
            f"{validation.get('metrics', validation.get('reason'))}")
        facts = {"recipe": model, "range": {"start": start.isoformat(), "end": end.isoformat()},
                 "features_source": source, "store": None if store is None else str(store),
                 "data": None if data is None else str(data), "rows": train.height,
                 "frauds": int(train.get_column(LABEL).sum()), "validation": validation}
        saved = _save(ModelRegistry(registry), fitted, train, name or model, facts, created_at)
    return {"name": saved.name, "version": saved.version, "path": str(saved.path), "model": fitted.name,
            "params": fitted.params, "seed": seed, "rows": facts["rows"], "frauds": facts["frauds"],
            "metrics": {key: round(value, 4) for key, value in validation.get("metrics", {}).items()},
            "validation": validation["status"]}


def _save(
    registry: ModelRegistry, model: FraudModel, train: pl.DataFrame, name: str,
    facts: dict[str, Any], created_at: dt.datetime | None,
) -> ModelVersion:
    """A new version of ``name``: the metrics are the validation's, the range the training rows'."""
    times = train.get_column("TX_DATETIME")
    version = registry.save(
        model, created_at=created_at or dt.datetime.now(dt.UTC), name=name,
        training_range=(times.min(), times.max()),  # type: ignore[arg-type]
        metrics=facts["validation"].get("metrics", {}), extra=facts)
    return ModelVersion(name, version, registry.root / name / str(version))
