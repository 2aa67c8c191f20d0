"""An alert's evidence chain, from the store alone: ``eventray explain``.

For one alert id: the alert (score, threshold, step), the event that raised it, the model
inputs of its ``scores`` row under their own names, the model as ``name:version`` with its
training range (from the ``models`` table the step writes when it loads a version, else
from the registry), the label events that later arrived for the same event (same
correlation id, not derived by a step), and the actions taken with their delivery status
(rows of the ``actions*`` tables that name the alert or its event), or none.

Example:
    >>> evidence = explain_alert(EventStore("demo-store"), "5d0c...")  # doctest: +SKIP
    >>> evidence["model"], len(evidence["inputs"])  # doctest: +SKIP
    ('fraud:1', 15)
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl

from pipelines.errors import StoreError
from pipelines.replay import DERIVED_SOURCES
from pipelines.store import EventStore

#: ``scores`` columns that are not model inputs.
SCORE_COLUMNS = ("event_id", "event_type", "timestamp", "key", "step", "model", "score", "value",
                 "date")
#: Columns through which an action row names what triggered it.
ACTION_LINKS = ("alert_id", "event_id", "trigger_event_id", "trigger_id", "parent_event_id")


def _one(frame: pl.DataFrame, what: str) -> dict[str, Any]:
    if frame.height == 0:
        raise StoreError(f"no {what} in the store")
    return frame.row(0, named=True)


def _instant(store: EventStore, table: str, column: str, value: str, at: dt.datetime,
             **filters: str) -> pl.DataFrame:
    """Rows of ``table`` with ``column == value`` at event time ``at`` (one date folder)."""
    if not store.files(table):
        return pl.DataFrame()
    frame = store.scan(table, start=at, end=at + dt.timedelta(microseconds=1)).filter(
        pl.col(column) == value)
    for name, wanted in filters.items():
        frame = frame.filter(pl.col(name) == wanted)
    return frame.collect()


def model_inputs(score: dict[str, Any], features: list[str] | None) -> dict[str, Any]:
    """The model's inputs from a ``scores`` row: ``features`` in order when the model's
    card names them, else every column that is not bookkeeping."""
    names = features or [c for c in score if c not in SCORE_COLUMNS]
    return {name: score.get(name) for name in names}


def model_card(store: EventStore, label: str, step: str) -> dict[str, Any]:
    """What the store (``models`` table), or else the registry, says of a model version."""
    card: dict[str, Any] = {"model": label}
    if store.files("models"):
        rows = store.scan("models").filter(pl.col("model") == label, pl.col("step") == step) \
            .sort("timestamp").collect()
        if rows.height:
            card.update({k: v for k, v in rows.row(-1, named=True).items()
                         if k not in ("event_type", "timestamp", "date")})
    name, _, version = label.partition(":")
    registry = card.get("registry")
    if registry and version.isdigit():
        from models.registry import ModelRegistry, RegistryError

        try:
            facts = ModelRegistry(registry).metadata(name, int(version))
        except RegistryError as exc:  # a moved registry leaves the store's facts
            card["registry_error"] = str(exc)
        else:
            trained = facts.get("training_range") or {}
            card.setdefault("features", facts.get("features"))
            card["trained_from"] = card.get("trained_from") or trained.get("start")
            card["trained_to"] = card.get("trained_to") or trained.get("end")
    return card


def label_events(store: EventStore, event: dict[str, Any]) -> list[dict[str, Any]]:
    """Events that arrived later about ``event``: same correlation id, not derived by a step."""
    frame = store.scan("events", start=event["timestamp"]).filter(
        pl.col("correlation_id") == event["correlation_id"],
        pl.col("event_id") != event["event_id"])
    for prefix in DERIVED_SOURCES:
        frame = frame.filter(~pl.col("source").str.starts_with(prefix))
    return [{"event_id": row["event_id"], "event_type": row["event_type"],
             "timestamp": row["timestamp"], "data": _present(row["data"])}
            for row in frame.sort("timestamp").collect().iter_rows(named=True)]


def actions_taken(store: EventStore, ids: list[str]) -> list[dict[str, Any]]:
    """Rows of the store's ``actions*`` tables that name one of ``ids``."""
    found: list[dict[str, Any]] = []
    tables = sorted(p.name for p in store.root.glob("actions*") if p.is_dir())
    for table in tables:
        if not store.files(table):
            continue
        frame = store.scan(table)
        links = [c for c in ACTION_LINKS if c in frame.collect_schema().names()]
        if not links:
            continue
        match = pl.any_horizontal([pl.col(c).cast(pl.String).is_in(ids) for c in links])
        found += [{"table": table, **row} for row in frame.filter(match).collect().iter_rows(named=True)]
    return found


def explain_alert(store: EventStore, alert_id: str) -> dict[str, Any]:
    """The evidence chain of one alert (see the module's docstring).

    Raises:
        StoreError: no such alert, or the event or scores row it names is missing.
    """
    alerts = store.scan("alerts").filter(pl.col("alert_id") == alert_id).collect() \
        if store.files("alerts") else pl.DataFrame()
    alert = _one(alerts, f"alert {alert_id!r}")
    at = alert["timestamp"]
    event = _one(_instant(store, "events", "event_id", alert["event_id"], at),
                 f"event {alert['event_id']!r}")
    score = _one(_instant(store, "scores", "event_id", alert["event_id"], at, step=alert["step"]),
                 f"scores row of {alert['event_id']!r}")
    card = model_card(store, score["model"], alert["step"])
    return {
        "alert_id": alert_id, "event_id": alert["event_id"], "step": alert["step"],
        "alert_type": alert["event_type"], "timestamp": at, "key": alert["key"],
        "score": alert["score"], "threshold": alert["threshold"], "model": score["model"],
        "training_range": {"start": card.get("trained_from"), "end": card.get("trained_to")},
        "event": {k: (_present(v) if k == "data" else v) for k, v in event.items() if k != "date"},
        "inputs": model_inputs(score, card.get("features")),
        "labels": label_events(store, event),
        "actions": actions_taken(store, [alert_id, alert["event_id"]]),
    }


def _present(value: Any) -> Any:
    """A payload without its empty fields (the ``data`` struct is every type's union)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value
