"""Pipeline configuration: YAML in ``configs/``, validated once by frozen pydantic models.

A :class:`PipelineSpec` is an inert description: building one runs nothing. The entry
point (``eventray run``) loads it with :func:`load_pipeline`; each component then gets only
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

import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines.envelope import (
    EVENT_TYPE_PATTERN,
    PayloadRegistry,
    PayloadSchema,
    model_from_yaml,
)
from pipelines.errors import ConfigError, SchemaError

ENVELOPE_KEY_FIELDS = ("event_id", "event_type", "source", "correlation_id", "part")


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


class SimulateIfMissing(_Frozen):
    """Generate the source's files with the simulator when its path does not exist."""

    n_days: int = Field(default=61, gt=0)
    n_customers: int = Field(default=5000, gt=0)
    n_terminals: int = Field(default=10000, gt=0)
    start_date: str = "2018-04-01"
    seed: int = 0


class SourceSpec(_Frozen):
    """Where events come from."""

    format: Literal["parquet", "csv", "jsonl"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    path: list[str] = Field(min_length=1)
    pattern: str | None = None
    batch_size: int = Field(default=10_000, gt=0)
    pace: PaceSpec | None = None
    simulate_if_missing: SimulateIfMissing | None = None

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


class LimitsSpec(_Frozen):
    max_payload_bytes: int = Field(default=1 << 20, gt=0)


class RuntimeSpec(_Frozen):
    """Settings of the Ray runtime (``cluster``)."""

    partitions: int = Field(default=2, ge=1, le=1024)
    max_in_flight: int = Field(default=4, ge=1)
    object_store_mb: int = Field(default=512, ge=64)
    checkpoint_every: int = Field(default=10, ge=1, description="source batches per checkpoint")
    max_queued_batches: int = Field(default=8, ge=1, description="per partition, in the driver")
    batch_timeout_s: float = Field(
        default=300.0, gt=0,
        description="seconds an actor may take to answer its oldest batch before it is "
                    "replaced as stalled")
    adaptive_batching: AdaptiveBatching | None = None


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

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
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


class AnomalyStepSpec(_Frozen):
    """Score a numeric payload field with a streaming per-key anomaly detector."""

    kind: Literal["anomaly"]
    name: str = Field(default="anomaly", pattern=r"^[a-z0-9_]+$")
    detector: str = "best"
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    value: str = Field(description="payload field holding the value")
    event_types: list[str] = Field(min_length=1, description="types scored (not its alerts)")
    threshold: float = Field(default=0.5, ge=0, le=1)
    alert_type: str = Field(default="anomaly.detected", pattern=EVENT_TYPE_PATTERN)
    emit_alerts: bool = True


class ModelRef(_Frozen):
    """A model in the registry: ``latest`` follows new versions while the pipeline runs."""

    registry: str = Field(description="the registry directory")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: int | Literal["latest"] = "latest"
    reload_every: int = Field(default=10, ge=1, description="batches between checks for a new version")


class FraudStepSpec(_Frozen):
    """The fraud handbook's 15 inputs per transaction (customer windows computed here,
    terminal windows from the ``terminal`` enrichment stage), scored by a registry model."""

    kind: Literal["fraud"]
    name: str = Field(default="fraud", pattern=r"^[a-z0-9_]+$")
    event_types: list[str] = Field(default_factory=lambda: ["transaction.created"], min_length=1)
    model: ModelRef | None = Field(default=None, description="absent: features only, no score")
    threshold: float = Field(default=0.5, ge=0, le=1)
    alert_type: str = Field(default="fraud.suspected", pattern=EVENT_TYPE_PATTERN)
    emit_alerts: bool = True


StepSpec = Annotated[AnomalyStepSpec | FraudStepSpec, Field(discriminator="kind")]


class LabelFeedSpec(_Frozen):
    """Labels as their own events: for every event of type ``of``, an event ``event_type``
    carrying ``fields`` (the label among them) is released ``delay_days`` after it, merged
    into the stream in event-time order (a label never arrives before its delay has passed).
    Replays of recorded data (the handbook, the simulator) use it to play the label feed
    that a card network delivers separately."""

    of: str = Field(default="transaction.created", pattern=EVENT_TYPE_PATTERN)
    event_type: str = Field(default="fraud.reported", pattern=EVENT_TYPE_PATTERN)
    label: str = "TX_FRAUD"
    fields: list[str] = Field(default_factory=lambda: [
        "TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID", "TX_DATETIME", "TX_FRAUD"])
    delay_days: float = Field(default=7.0, gt=0)


class EnrichSpec(_Frozen):
    """A keyed stage that runs before routing, partitioned by its own key (a payload field),
    adding columns to the events it sees; its actors are named ``<name>-<i>``."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["handbook_terminal"]
    key: str = Field(description="payload field the stage is partitioned by")
    partitions: int = Field(default=2, ge=1, le=1024)
    event_types: list[str] = Field(default_factory=lambda: ["transaction.created", "fraud.reported"])


class StoreSpec(_Frozen):
    path: str = "store"


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
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)

    @field_validator("event_types")
    @classmethod
    def _event_type_names(cls, value: dict[str, EventTypeSpec]) -> dict[str, EventTypeSpec]:
        for name in value:
            if not re.match(EVENT_TYPE_PATTERN, name):
                raise ValueError(f"event type {name!r} is not a dotted lower-case name")
        return value

    def registry(self) -> PayloadRegistry:
        """The payload registry these event types describe."""
        registry = PayloadRegistry(default=_payload_schema("*", self.default_event_type))
        for name, spec in self.event_types.items():
            registry.register(_payload_schema(name, spec))
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


def _format_validation_error(path: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid pipeline config"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Read, validate and freeze a pipeline config; raise :class:`ConfigError` naming fields.

    Args:
        path: the YAML file.
        overrides: top-level sections to update before validation, e.g.
            ``{"source": {"path": ["in/"]}}`` (merged one level deep).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline config is a YAML mapping")
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    try:
        spec = PipelineSpec.model_validate(raw)
        spec.registry()
        from pipelines.routing import Router  # routing needs the spec's envelope schema

        Router(spec)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None
    except SchemaError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return spec
