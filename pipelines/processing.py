"""Processing steps that run inside a partition, on each batch it applies.

A step is keyed, stateful logic (a detector, a feature operator, a model, a user's
processor) with a small surface: :meth:`Step.process` takes the partition's batch of
envelope events, in per-key order, and returns a :class:`StepOutput`: rows for named store
tables (``scores``, ``alerts``, or a table of the step's own) and derived events (routed
again by the driver); :meth:`Step.snapshot` / :meth:`Step.restore` carry its state through
checkpoints. A step kind is a :class:`Step` subclass whose ``spec_class`` validates its
config section; kinds are looked up by name in :mod:`pipelines.kinds`.

An enrichment stage is a :class:`Step` too, run in actors keyed by its own key before
routing: its input rows carry :data:`ROW_POSITION`, and its ``derived`` output is that
column plus the columns it adds (``columns``), which the driver joins back by position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from models.anomaly import ThresholdPolicy, make_detector
from pipelines.envelope import TIMESTAMP
from pipelines.event_ids import uuid5_strings
from pipelines.routing import type_regex
from pipelines.spec import AnomalyStepSpec, StepSpec

#: The transit column of an enrichment stage's input: each row's position in its slice.
ROW_POSITION = "_pos"
#: The transit column of a pattern's copy of an event (the pattern's index; null on the
#: events themselves): a copy is keyed by the pattern's key, seen only by steps with
#: ``sees_copies``, and never stored.
PATTERN_COPY = "_pattern"

SCORES_SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("timestamp", TIMESTAMP, nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("step", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("score", pa.float64(), nullable=False),
])

ALERTS_SCHEMA = pa.schema([
    pa.field("alert_id", pa.string(), nullable=False),
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),  # the alert's type
    pa.field("timestamp", TIMESTAMP, nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("step", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("threshold", pa.float64(), nullable=False),
])


@dataclass
class StepOutput:
    """Rows a step produced for one batch: store tables by name, and derived events.

    ``tables`` maps a store table name (``scores``, ``alerts``, or one of the step's own:
    letters, digits, ``_``, ``-``) to rows; the rows need an ``event_type`` and a
    ``timestamp`` column (UTC), which partition the table's files as they do ``events``.
    ``derived`` are envelope events to store and route again.

    Example:
        >>> StepOutput(tables={"order_totals": pa.table({"n": [1]})}).derived is None
        True
    """

    tables: dict[str, pa.Table] = field(default_factory=dict)
    derived: pa.Table | None = None
    #: Counters for the run's summary (added up over batches and partitions; a name that
    #: starts with ``max_`` keeps the largest value instead).
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """What a step is built with besides its own spec.

    Attributes:
        envelope: the envelope schema of the pipeline's batches.
        registry: the pipeline's payload registry (event types, keys, versions).
        search_path: folders searched first for import paths.
        objects: processors registered in Python (by step name), each partition's own copy.
    """

    envelope: pa.Schema
    registry: Any = None
    search_path: tuple[str, ...] = ()
    objects: dict[str, Any] = field(default_factory=dict)


def alert_version_of(context: StepContext | None, alert_type: str) -> str:
    """The schema version alert events of ``alert_type`` carry (their type's current one)."""
    if context is None or context.registry is None:
        return "1"
    return str(context.registry.schema_for(alert_type).version)


#: Schema metadata of a zero-row batch that carries a watermark to the steps (see
#: :meth:`Step.on_watermark`): ``{"watermark": µs or null, "final": bool}`` as JSON.
WATERMARK_METADATA = b"eventray.watermark"


def watermark_batch(schema: pa.Schema, watermark_us: int | None, final: bool) -> pa.Table:
    """A zero-row batch telling a partition's steps where the watermark stands."""
    import json

    mark = json.dumps({"watermark": watermark_us, "final": final}).encode()
    return schema.empty_table().replace_schema_metadata(
        {**(schema.metadata or {}), WATERMARK_METADATA: mark})


def without_copies(events: pa.Table) -> pa.Table:
    """``events`` less the patterns' copies (:data:`PATTERN_COPY`)."""
    if PATTERN_COPY not in events.column_names:
        return events
    copies = events.column(PATTERN_COPY)
    if copies.null_count == len(copies):
        return events
    import pyarrow.compute as pc

    return events.filter(pc.is_null(copies))


def watermark_of(events: pa.Table) -> tuple[int | None, bool] | None:
    """(watermark, final) when ``events`` is a watermark batch, else ``None``."""
    import json

    metadata = events.schema.metadata or {}
    if events.num_rows or WATERMARK_METADATA not in metadata:
        return None
    mark = json.loads(metadata[WATERMARK_METADATA])
    return mark["watermark"], bool(mark["final"])


class Step(ABC):
    """A processing step inside a partition (or a partition of an enrichment stage)."""

    #: The model that validates this kind's config section.
    spec_class: type[StepSpec] = StepSpec
    name: str
    #: Transit columns an enrichment stage adds to the batch (none for a partition's steps).
    columns: tuple[str, ...] = ()
    #: Payload fields an enrichment stage reads besides its key: the driver sends it only
    #: ``event_id``, ``event_type``, ``timestamp``, ``key`` and these (``None``: the whole envelope).
    reads: tuple[str, ...] | None = None

    @abstractmethod
    def process(self, events: pa.Table) -> StepOutput: ...

    #: Whether the step wants :meth:`on_watermark` calls (the driver then sends them).
    watermarks: bool = False
    #: Whether the step sees the events' copies of :data:`PATTERN_COPY` (the others never do).
    sees_copies: bool = False

    def on_watermark(self, watermark_us: int | None, final: bool) -> StepOutput | None:
        """Every event of the partition older than ``watermark_us`` (epoch µs, ``None``:
        unknown) has been processed; ``final``: the input has ended, nothing follows.
        Deadlines (absences, timeouts, windows) fire here. Called in order with the
        batches, at checkpoints and at the end of the input, for steps with ``watermarks``."""
        return None

    @abstractmethod
    def snapshot(self) -> Any:
        """The step's state as plain data (JSON-compatible)."""

    @abstractmethod
    def restore(self, state: Any) -> None:
        """Replace the step's state with a snapshot's (``None``: start empty)."""


class AnomalyStep(Step):
    """Scores a payload field per key with a streaming detector; alerts over a threshold.

    Example:
        >>> from pipelines.envelope import envelope_schema
        >>> spec = AnomalyStepSpec(kind="anomaly", value="v", detector="robust_zscore",
        ...                        event_types=["reading"])
        >>> AnomalyStep(spec, StepContext(envelope_schema())).name
        'anomaly'
    """

    spec_class = AnomalyStepSpec

    def __init__(self, spec: AnomalyStepSpec, context: StepContext) -> None:
        self.spec, self.name, self.envelope = spec, spec.name, context.envelope
        self.alert_version = alert_version_of(context, spec.alert_type)
        self.detector = make_detector(spec.detector, **spec.params)
        self.policy = ThresholdPolicy(spec.threshold)
        self.model = self.detector.name  # the registered name ("best" resolves to one)

    def process(self, events: pa.Table) -> StepOutput:
        mine = events_of_types(events, self.spec.event_types)
        if mine.height == 0:
            return StepOutput()
        value = mine["data"].struct.field(self.spec.value).cast(pl.Float64)
        scores = self.detector.score(pl.DataFrame({
            "key": mine["key"], "value": value.fill_null(np.nan), "timestamp": mine["timestamp"]}))
        scored = mine.select("event_id", "event_type", "timestamp", "key").with_columns(
            step=pl.lit(self.name), model=pl.lit(self.model), value=value,
            score=pl.Series(scores, dtype=pl.Float64))
        flagged = pl.Series(self.policy.alerts(scores))
        alerts = alert_rows(scored.filter(flagged), self.name, self.spec.alert_type,
                            self.spec.threshold)
        derived = alert_events(alerts, mine.filter(flagged), self.envelope, self.name,
                               self.alert_version) \
            if self.spec.emit_alerts else None
        return StepOutput(tables={
            "scores": scored.to_arrow().cast(SCORES_SCHEMA),
            "alerts": alerts.to_arrow().cast(ALERTS_SCHEMA),
        }, derived=derived)

    def snapshot(self) -> Any:
        return self.detector.snapshot()

    def restore(self, state: Any) -> None:
        self.detector.restore(state)


def events_of_types(events: pa.Table, patterns: list[str]) -> pl.DataFrame:
    """The batch's events whose type matches one of the shell-style ``patterns``, in order."""
    frame = pl.from_arrow(rows_of_types(events, patterns))
    assert isinstance(frame, pl.DataFrame)
    return frame


def rows_of_types(events: pa.Table, patterns: list[str]) -> pa.Table:
    """:func:`events_of_types` as an Arrow table, the batch itself when every event matches
    (the usual case: no copy, no Polars frame). The pattern's regular expression (escaped
    literals, ``.*`` and ``.``) means the same to Arrow's RE2 as to Polars' regex crate."""
    import pyarrow.compute as pc

    matches = pc.fill_null(pc.match_substring_regex(events.column("event_type"), type_regex(patterns)), False)
    if pc.all(matches).as_py() is not False:  # all match (or no rows)
        return events
    return events.filter(matches)


def alert_rows(flagged: pl.DataFrame, step: str, alert_type: str, threshold: float) -> pl.DataFrame:
    """Rows of the ``alerts`` table for scored rows over the threshold (ids derived)."""
    ids = uuid5_strings((flagged["event_id"] + f"/{step}").to_arrow())
    return flagged.select(
        alert_id=pl.Series(ids, dtype=pl.String), event_id="event_id",
        event_type=pl.lit(alert_type), timestamp="timestamp", key="key",
        step=pl.lit(step), score="score", threshold=pl.lit(threshold))


def alert_events(alerts: pl.DataFrame, parents: pl.DataFrame, envelope: pa.Schema | None,
                 step: str, version: str = "1") -> pa.Table | None:
    """Alerts as envelope events (same key and time as the events that raised them).

    The pipeline is their producer: ``metadata.version`` is the alert type's current version
    (``version``), the rest of the metadata the parent's.
    """
    if envelope is None or alerts.height == 0:
        return None
    data_type = pl.from_arrow(pa.array([], envelope.field("data").type)).dtype
    body = alerts.select(pl.struct("event_id", "step", "score", "threshold")
                         .struct.json_encode()).to_series()
    events = parents.select(
        event_id=alerts["alert_id"], event_type=alerts["event_type"],
        timestamp="timestamp", source=pl.lit(f"step:{step}"),
        correlation_id="correlation_id", key="key",
        data=pl.struct(json=body).cast(data_type, strict=False),
        metadata=pl.col("metadata").struct.with_fields(version=pl.lit(version, pl.String)))
    return events.to_arrow().cast(envelope)
