"""Pipeline configuration: YAML in ``configs/``, validated once by frozen pydantic models.

A :class:`PipelineSpec` is an inert description: building one runs nothing. The entry
point (``eventray run``) loads it with :func:`pipelines.load_pipeline`, which also has each
plugin kind validate its own section; each component then gets only
its own small settings object (``spec.source``, ``spec.mapping``, ``spec.runtime``...).
A bad config fails here, at start-up, with a message naming the field.

Example:
    >>> spec = PipelineSpec.model_validate({
    ...     "name": "demo",
    ...     "source": {"format": "jsonl", "path": ["events.jsonl"]},
    ...     "mapping": {"event_type": "eventType", "timestamp": "timestamp"},
    ... })
    >>> spec.runtime.partitions
    2
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pipelines.action_rules import ActionsSpec
from pipelines.envelope import (
    EVENT_TYPE_PATTERN,
    PayloadRegistry,
    PayloadSchema,
    model_from_yaml,
)
from pipelines.errors import SchemaError
from pipelines.plugins import IMPORT_PATH
from pipelines.projection_spec import ProjectionSpec
from pipelines.timestamps import Duration

ENVELOPE_KEY_FIELDS = ("event_id", "event_type", "source", "correlation_id", "part")
#: Names of steps, routes, patterns and actions: ``big-orders``, ``card_testing``.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Constant(_Frozen):
    """A constant value in a field mapping: ``event_type: {value: transaction.created}``."""

    value: str


#: A mapped field: a source column (or JSON field) name, or a constant.
FieldRef = str | Constant



class PaceSpec(_Frozen):
    """Paced replay: release events by their timestamps, ``speedup`` times faster.

    ``linger_ms``: release what is due at most this often, so that a lightly loaded
    pipeline handles fewer, larger slices (see :class:`pipelines.pacing.Pacer`). The
    default, 100 ms, measured on the fraud pipeline at 20 % of its peak rate on 2 cores:
    p50 / p99 from arrival to score 131 / 390 ms, against 419 / 791 ms releasing every
    slice as soon as it is due (0).
    """

    speedup: float = Field(gt=0)
    linger_ms: float = Field(default=100.0, ge=0, le=10_000)


class _Open(BaseModel):
    """The common fields of a plugin's section; the kind's own model validates the rest."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def options(self) -> dict[str, Any]:
        """The fields only the kind knows (``model_extra``)."""
        return dict(self.model_extra or {})


class SourceSpec(_Open):
    """Where events come from: a source kind (``format``) and what it reads.

    ``format`` names a source kind: ``parquet``, ``csv``, ``jsonl``, one an installed package
    declares (entry-point group ``eventray.sources``) or an import path. Fields besides the
    common ones below belong to the kind, which validates them with its own model.

    ``max_future``: how far past the injected clock's now an event's time may lie; later
    events are dead letters (``timestamp_out_of_range``), so that one far-off timestamp
    never moves event time (windows, label release, pacing) years ahead.

    Event time (``ordering: event-time``, the default): the source's events reach the keyed
    operators in event-time order behind a watermark (:mod:`pipelines.event_time`); files
    of a Parquet or CSV source are merged by their timestamps, whatever order they are
    given in. ``lateness``: how far behind the stream's bulk an event may arrive and still
    be ordered in. ``late``: what happens to an event later than that: ``dead-letter``
    (reason ``late_event``) or ``process`` (it goes on, after the ordered events, flagged
    ``{"late": true}`` in ``metadata.tags``). ``order_ties_by``: a column or ``data.<field>``
    that orders events of equal time the same way whatever their arrival order.
    ``idle_timeout``: silence after which the watermark follows the clock. ``ordering:
    arrival`` keeps the source's own order (each file's row order is its keys' order).

    ``duplicates``: an event whose id was stored before (in this run, within
    ``dedup_horizon`` of event time, or of arrival time with ``ordering: arrival``, where a
    retry comes soon whatever the event's time; or by an earlier run into the same store) is
    skipped and counted (``skip``), or dead-lettered as ``duplicate_event_id``.
    """

    format: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    #: the files a file source reads; a live source (Redis, MQTT) reads none
    path: list[str] = Field(default_factory=list)
    pattern: str | None = None
    batch_size: int = Field(default=10_000, gt=0)
    pace: PaceSpec | None = None
    max_future: Duration = dt.timedelta(days=1)
    ordering: Literal["event-time", "arrival"] = "event-time"
    lateness: Duration = dt.timedelta(0)
    late: Literal["dead-letter", "process"] = "dead-letter"
    order_ties_by: str | None = Field(default=None, pattern=r"^(data\.)?[A-Za-z_][A-Za-z0-9_]*$")
    idle_timeout: Duration | None = None
    duplicates: Literal["skip", "dead-letter"] = "skip"
    dedup_horizon: Duration = dt.timedelta(days=7)

    @property
    def source_name(self) -> str:
        return self.name or self.format


class JsonRef(_Frozen):
    """A JSON-object column: ``payload: {json: data}`` keeps ``data`` as a JSON object."""

    json_: str = Field(alias="json")


class ColumnsRef(_Frozen):
    """Payload taken from source columns: ``payload: {columns: all}`` or a list of names."""

    columns: Literal["all"] | list[str] = "all"
    exclude: list[str] = Field(default_factory=list)


class MappingSpec(_Frozen):
    """How a source's records become envelope fields.

    ``event_id`` absent means "derive a UUIDv5 from source, part and offset".
    ``source`` absent means the source's name. ``correlation_id`` absent means the event id.
    """

    event_id: FieldRef | None = None
    event_type: FieldRef
    timestamp: str
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"
    source: FieldRef | None = None
    correlation_id: FieldRef | None = None
    payload: JsonRef | ColumnsRef = Field(default_factory=ColumnsRef)
    metadata: JsonRef | None = None


class EventTypeSpec(_Frozen):
    """One event type: its partition key, payload schema and metadata defaults."""

    key: str = "correlation_id"
    version: int = Field(default=1, ge=1)
    region: str | None = None
    payload: dict[str, str] | None = None
    payload_model: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$")


#: The longest line a JSON Lines source buffers (:class:`pipelines.sources.JsonLinesSource`):
#: ``max_payload_bytes`` may not exceed it.
MAX_LINE_BYTES = 64 << 20


class LimitsSpec(_Frozen):
    """Size limits on input: larger payloads, keys and correlation ids are dead letters.

    ``max_key_length``: characters of an event's partition key and of its correlation id
    (``bad_field`` beyond it).
    """

    max_payload_bytes: int = Field(default=1 << 20, gt=0, le=MAX_LINE_BYTES)
    max_key_length: int = Field(default=256, gt=0)


class RuntimeSpec(_Frozen):
    """Settings of the Ray runtime (``cluster``)."""

    partitions: int = Field(default=2, ge=1, le=1024)
    readers: int = Field(
        default=0, ge=0, le=256,
        description="reader actors that ingest and route a bounded source's splits (0: the "
                    "driver does it itself)")
    max_in_flight: int = Field(default=4, ge=1)
    object_store_mb: int = Field(default=512, ge=64)
    checkpoint_every: int = Field(default=10, ge=1, description="source batches per checkpoint")
    max_queued_batches: int = Field(default=8, ge=1, description="per partition, in the driver")
    batch_timeout_s: float = Field(
        default=300.0, gt=0,
        description="seconds an actor may take to answer its oldest batch before it is "
                    "replaced as stalled")
    adaptive_batching: AdaptiveBatching | None = None
    checkpoint_interval: Duration = Field(
        default=dt.timedelta(seconds=10),
        description="eventray serve: time between checkpoints under load (an idle run "
                    "checkpoints after store.commit_interval); a checkpoint drains what is in "
                    "flight, so decisions wait behind it")
    chain: bool = Field(
        default=False,
        description="eventray serve: read the source, run the enrichment stages and apply the "
                    "partitions in one Ray actor (operator chaining: no hop between them, and "
                    "no event through the driver, which only coordinates); needs partitions: 1, "
                    "every enrich stage's partitions: 1 and readers: 0")


class EmitSpec(_Frozen):
    """A derived event emitted for every event a route takes (the seed's ``emit``).

    The derived event keeps its parent's key (so it is ordered after its parent), time,
    correlation id, payload and metadata; its id is a UUIDv5 of the parent's id and the
    route's name, so a replay derives the same event.
    """

    event_type: str = Field(pattern=EVENT_TYPE_PATTERN)


class RouteSpec(_Frozen):
    """Where events go: the first route whose event types and filter match takes an event.

    ``event_types`` are shell-style patterns (``transaction.*``); ``filter`` is a SQL
    expression over envelope columns that Polars compiles (``data.TX_AMOUNT > 200``,
    ``key IN ('42', '7')``); ``priority: high`` dispatches the route's events ahead of
    normal ones under load (never reordering one key).
    """

    name: str = Field(pattern=NAME_PATTERN)
    event_types: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    filter: str | None = None
    priority: Literal["high", "normal"] = "normal"
    drop: bool = False
    emit: EmitSpec | None = None


class RoutingSpec(_Frozen):
    """Routing rules; events that no route takes are stored (``unrouted: store``) or dropped."""

    routes: list[RouteSpec] = Field(default_factory=list)
    unrouted: Literal["store", "drop"] = "store"
    max_hops: int | None = Field(default=None, ge=1, le=64)


class AdaptiveBatching(_Frozen):
    """Coalesce queued pieces of a partition into one call under load, up to the rows that
    the partition processes within ``target_latency_ms`` (measured as the run goes)."""

    target_latency_ms: float = Field(default=100.0, gt=0)
    min_rows: int = Field(default=1_000, ge=1)
    max_rows: int = Field(default=200_000, ge=1)


class StepSpec(_Open):
    """A processing step in the keyed partitions: its kind, name and event types.

    ``kind`` names a step kind: ``anomaly``, ``python`` (a user's processor), one an installed
    package declares (entry-point group ``eventray.processors``) or an import path. The
    kind's own model (its class's ``spec_class``) validates the whole section at start-up.
    """

    kind: str = Field(min_length=1)
    name: str = Field(pattern=NAME_PATTERN)
    #: absent: the kind's own default (its model's), so that a dumped spec reloads the same
    event_types: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_kind(cls, values: Any) -> Any:
        if isinstance(values, dict) and "name" not in values and isinstance(values.get("kind"), str):
            return {**values, "name": values["kind"]}
        return values


class AnomalyStepSpec(StepSpec):
    """Score a numeric payload field with a streaming per-key anomaly detector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["anomaly"]
    name: str = Field(default="anomaly", pattern=NAME_PATTERN)
    detector: str = "best"
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    value: str = Field(description="payload field holding the value")
    event_types: list[str] = Field(min_length=1, description="types scored (not its alerts)")
    threshold: float = Field(default=0.5, ge=0, le=1)
    alert_type: str = Field(default="anomaly.detected", pattern=EVENT_TYPE_PATTERN)
    emit_alerts: bool = True


class PythonStepSpec(StepSpec):
    """A user's processor: ``function`` is ``package.module:attribute``, resolved on
    ``sys.path`` with the config's folder and the working directory first.

    The attribute is a processor (a function, or an object with ``process``), or a class
    that is instantiated with ``params`` (one instance per partition).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["python"]
    event_types: list[str] = Field(min_length=1)
    function: str = Field(pattern=IMPORT_PATH)
    params: dict[str, Any] = Field(default_factory=dict)


class LabelFeedSpec(_Frozen):
    """Labels as their own events: for every event of type ``of``, an event ``event_type``
    carrying ``fields`` (the label among them) is released ``delay_days`` after it, merged
    into the stream in event-time order (a label never arrives before its delay has passed).
    Replays of recorded data use it to play back a feed that arrives separately in real
    life (a card network's fraud reports, a carrier's delivery confirmations)."""

    of: str = Field(pattern=EVENT_TYPE_PATTERN)
    event_type: str = Field(pattern=EVENT_TYPE_PATTERN)
    label: str
    fields: list[str] = Field(min_length=1)
    delay_days: float = Field(gt=0)


class EnrichSpec(_Open):
    """A keyed stage that runs before routing, partitioned by its own key (a payload field),
    adding columns to the events it sees; its actors are named ``<name>-<i>``.

    ``kind`` names a stage kind (entry-point group ``eventray.stages``, or an import path);
    fields besides these belong to the kind.

    ``placement``: ``actors`` (the default) runs each partition in a Ray actor of its own;
    ``driver`` runs the stage's partitions in the run's driver process, as the ``local``
    runner does: no actor hop to the stage and back, for a live run whose stage is light
    and whose latency counts on a small machine. Its state is checkpointed and restored
    with the run's; it does not spread over the nodes, so reader actors
    (``runtime.readers``) refuse it.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: str = Field(min_length=1)
    key: str = Field(description="payload field the stage is partitioned by")
    partitions: int = Field(default=2, ge=1, le=1024)
    event_types: list[str] = Field(min_length=1)
    placement: Literal["actors", "driver"] = "actors"


class MatchPayload(BaseModel):
    """The typed payload of a pattern's match event: the pattern, the matched events' ids
    in match order, and the first and last matched events' times."""

    pattern: str
    event_ids: list[str]
    start: dt.datetime
    end: dt.datetime


class StoreSpec(_Frozen):
    """Where the event store is, how often its files are committed, how long rows are kept.

    ``commit_interval``: a partition writes the batches it applied as one file per
    (table, event type, date) at least this often, and whenever it holds ``commit_rows``
    rows; ``eventray serve`` also takes its checkpoints this often (a checkpoint commits
    what is pending first). Decisions do not wait for it: they leave with each batch.

    ``retention``: ``max_age`` per table (``events: 400d``) or per table and event type
    (``events/fraud.reported: 30d``), applied by ``eventray compact``; the more specific wins.
    """

    path: str = "store"
    commit_interval: Duration = dt.timedelta(seconds=1)
    commit_rows: int = Field(default=500_000, gt=0)
    retention: dict[str, Duration] = Field(default_factory=dict)


class PipelineSpec(_Frozen):
    """A whole pipeline: source, mapping, event types, limits, runtime and store."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceSpec
    mapping: MappingSpec
    event_types: dict[str, EventTypeSpec] = Field(default_factory=dict)
    default_event_type: EventTypeSpec = Field(default_factory=EventTypeSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    labels: LabelFeedSpec | None = None
    enrich: list[EnrichSpec] = Field(default_factory=list)
    steps: list[StepSpec] = Field(default_factory=list)
    #: Event-sourced projections (:mod:`pipelines.projection_spec`); each online one also
    #: runs as a ``projection`` step, appended to ``steps``.
    projections: list[ProjectionSpec] = Field(default_factory=list)
    #: Complex-event patterns matched per key in the keyed partitions, each a mapping in
    #: the syntax of :class:`pipelines.patterns.PatternSpec`, which validates it at start-up
    #: (:func:`pipelines.patterns.spec.pattern_specs`); a match is an event of its ``emit`` type.
    patterns: list[dict[str, Any]] = Field(default_factory=list)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    #: Action rules: webhooks, notifications, workflows and updates set off by decisions
    #: (:mod:`pipelines.actions`).
    actions: ActionsSpec | None = None
    #: Folders searched first for import paths (``module:attr``): the config's folder and
    #: the working directory, filled in by :func:`pipelines.load_pipeline`.
    search_path: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _projection_steps(cls, values: Any) -> Any:
        """Every online projection runs as a ``projection`` step named after it (once: a
        dumped spec already has the step; another step of that name is a duplicate)."""
        if not isinstance(values, dict) or not values.get("projections"):
            return values
        steps = list(values.get("steps") or [])
        made = {s.get("name") if isinstance(s, dict) else getattr(s, "name", None) for s in steps
                if (s.get("kind") if isinstance(s, dict) else getattr(s, "kind", None)) == "projection"}
        for projection in values["projections"]:
            body = projection.model_dump() if isinstance(projection, BaseModel) else projection
            if isinstance(body, dict) and body.get("online", True) and body.get("name") not in made:
                steps.append({"kind": "projection", "name": body.get("name"), "projection": body})
        return {**values, "steps": steps}

    @model_validator(mode="after")
    def _chain_is_one_process(self) -> PipelineSpec:
        """``runtime.chain`` runs every keyed operator in one actor: one partition each."""
        if not self.runtime.chain:
            return self
        spread = [f"runtime.partitions: {self.runtime.partitions}"] if self.runtime.partitions != 1 else []
        spread += [f"enrich.{stage.name}.partitions: {stage.partitions}"
                   for stage in self.enrich if stage.partitions != 1]
        spread += [f"runtime.readers: {self.runtime.readers}"] if self.runtime.readers else []
        if spread:
            raise ValueError(f"runtime.chain runs the source, the stages and the partitions in one "
                             f"actor, which needs one partition each and no readers: "
                             f"{', '.join(spread)} (set them to 1 and 0, or runtime.chain: false)")
        return self

    @field_validator("steps")
    @classmethod
    def _unique_step_names(cls, value: list[StepSpec]) -> list[StepSpec]:
        names = [step.name for step in value]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        return value

    @field_validator("event_types")
    @classmethod
    def _event_type_names(cls, value: dict[str, EventTypeSpec]) -> dict[str, EventTypeSpec]:
        for name in value:
            if not re.match(EVENT_TYPE_PATTERN, name):
                raise ValueError(f"event type {name!r} is not a dotted lower-case name")
        return value

    def registry(self) -> PayloadRegistry:
        """The payload registry these event types describe; a pattern's match types not
        declared in ``event_types`` get the typed match payload (:class:`MatchPayload`)."""
        registry = PayloadRegistry(default=_payload_schema("*", self.default_event_type))
        for name, spec in self.event_types.items():
            registry.register(_payload_schema(name, spec))
        for pattern in self.patterns:
            for name in (pattern.get("emit"), pattern.get("on_timeout")):
                if isinstance(name, str) and re.match(EVENT_TYPE_PATTERN, name) \
                        and name not in self.event_types:
                    registry.register(PayloadSchema(name, MatchPayload, key="correlation_id"))
        return registry


def _payload_schema(name: str, spec: EventTypeSpec) -> PayloadSchema:
    if spec.payload is not None and spec.payload_model is not None:
        raise SchemaError(f"event_types.{name}: give payload or payload_model, not both")
    model = None
    if spec.payload is not None:
        model = model_from_yaml(name, spec.payload)
    elif spec.payload_model is not None:
        module, _, attr = spec.payload_model.partition(":")
        try:
            model = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise SchemaError(f"event_types.{name}.payload_model: cannot import: {exc}") from exc
    return PayloadSchema(name, model, version=spec.version, key=spec.key, region=spec.region)
