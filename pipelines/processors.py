"""User processors: the seed's ``registerProcessor(eventType, processor)``.

The processor contract:

- A processor is a function, or an object with a ``process`` method, called with a
  ``pyarrow.Table`` of envelope rows (``event_id``, ``event_type``, ``timestamp``, ``source``,
  ``correlation_id``, ``key``, ``data``, ``metadata``) of its event types: one partition's
  share of a batch, each key's rows in order.
- It returns ``None``; or derived events, as a ``pyarrow.Table`` or a list of dicts, each
  with ``event_type``, ``timestamp`` and ``data`` required and ``key``, ``correlation_id``,
  ``source`` and ``event_id`` optional; or a :class:`~pipelines.processing.StepOutput`
  (rows for named store tables, and derived events in either form).
- A timestamp is a ``datetime`` (timezone-aware, or naive meaning UTC), an ISO-8601 string
  or an Arrow timestamp. A derived event without an id gets a deterministic one (a UUIDv5 of
  the processor's name and the event's content), so the same input gives the same ids. A
  derived event without a key takes its type's key field from ``data`` when it has one,
  else its correlation id, else its id.
- An object with ``snapshot()`` and ``restore(state)`` is stateful: its state (JSON data,
  or bytes) is checkpointed and restored with its partition. Every partition has its own
  instance.

Derived events are stored and routed again, under the routing hop limit. A processor that
raises, or returns events that break the contract, raises :class:`ProcessorError` naming
the processor; the partition then finds the events it raises on and dead-letters them as
``processor_error`` (:mod:`pipelines.poison`), applying the rest.

Example:
    >>> def big_orders(events):
    ...     return None
    >>> step = PythonStep.of("big-orders", ["order.*"], big_orders, StepContext(envelope_schema()))
    >>> step.name
    'big-orders'
"""

from __future__ import annotations

import base64
import datetime as dt
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.envelope import EVENT_TYPE_PATTERN, JSON_FIELD, TIMESTAMP, envelope_schema  # noqa: F401 (doctest)
from pipelines.errors import PipelineError
from pipelines.event_ids import uuid5_strings
from pipelines.plugins import import_path
from pipelines.processing import Step, StepContext, StepOutput, events_of_types
from pipelines.spec import ENVELOPE_KEY_FIELDS, PythonStepSpec

__all__ = ["ProcessorError", "PythonStep", "as_processor", "derived_events"]

#: The envelope columns a processor may give for a derived event.
_REQUIRED = ("event_type", "timestamp", "data")
_OPTIONAL = ("key", "correlation_id", "source", "event_id")


class ProcessorError(PipelineError):
    """A processor failed on a batch, or returned something the contract does not allow."""


def as_processor(target: Any) -> Callable[[pa.Table], Any]:
    """The callable behind a processor: an object's ``process`` method, or the function."""
    process = getattr(target, "process", None)
    if callable(process):
        return process
    if callable(target):
        return target
    raise ProcessorError(f"{target!r} is neither callable nor has a process method")


class PythonStep(Step):
    """Runs a user's processor on the rows of its event types, in per-key order."""

    spec_class = PythonStepSpec

    def __init__(self, spec: PythonStepSpec, context: StepContext) -> None:
        self.spec, self.name, self.context = spec, spec.name, context
        target = context.objects.get(spec.name)
        if target is None:
            target = import_path(spec.function, context.search_path)
        if inspect.isclass(target):
            target = target(**spec.params)
        elif spec.params:
            raise ProcessorError(f"step {spec.name!r}: params are given, but "
                                 f"{spec.function} is not a class to instantiate")
        self.target, self.call = target, as_processor(target)

    @classmethod
    def of(cls, name: str, event_types: Sequence[str], processor: Any,
           context: StepContext) -> PythonStep:
        """A step for a processor object given in Python (``register_processor``)."""
        spec = PythonStepSpec(kind="python", name=name, event_types=list(event_types),
                              function="__registered__:processor")
        return cls(spec, StepContext(context.envelope, context.registry, context.search_path,
                                     {**context.objects, name: processor}))

    def process(self, events: pa.Table) -> StepOutput:
        envelope = [c for c in events.column_names if not c.startswith("_")]
        mine = events_of_types(events.select(envelope), self.spec.event_types)
        if mine.height == 0:
            return StepOutput()
        try:
            result = self.call(mine.to_arrow().cast(self.context.envelope))
        except Exception as exc:
            raise ProcessorError(f"processor {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        return self._output(result, mine)

    def _output(self, result: Any, mine: pl.DataFrame) -> StepOutput:
        if result is None:
            return StepOutput()
        tables: dict[str, pa.Table] = {}
        derived = result
        if isinstance(result, StepOutput):
            tables, derived = result.tables, result.derived
            for table, rows in tables.items():
                missing = {"event_type", "timestamp"} - set(rows.column_names)
                if missing:
                    raise ProcessorError(f"processor {self.name!r}: table {table!r} lacks "
                                         f"columns {sorted(missing)}")
        ingested = mine["metadata"].struct.field("ingested_at").max()
        events = derived_events(derived, self.name, self.context, ingested) \
            if derived is not None else None
        return StepOutput(tables=tables, derived=events)

    def snapshot(self) -> Any:
        snapshot = getattr(self.target, "snapshot", None)
        if not callable(snapshot):
            return None
        state = snapshot()
        if isinstance(state, bytes | bytearray):
            return {"bytes": base64.b64encode(state).decode()}
        return {"data": state}

    def restore(self, state: Any) -> None:
        restore = getattr(self.target, "restore", None)
        if state is None or not callable(restore):
            return
        restore(base64.b64decode(state["bytes"]) if "bytes" in state else state["data"])


def derived_events(events: pa.Table | Sequence[dict[str, Any]], step: str,
                   context: StepContext, ingested_at: dt.datetime | None = None) -> pa.Table:
    """A processor's derived events as envelope rows (ids, keys and metadata filled in).

    Args:
        events: a table or a list of dicts with at least ``event_type``, ``timestamp``, ``data``.
        step: the processor's name (part of derived ids, and the default ``source``).
        context: the pipeline's envelope schema and payload registry.
        ingested_at: when the events that caused these entered the pipeline.

    Raises:
        ProcessorError: a required field is missing, or a value does not fit its column.
    """
    table = _as_table(events, step)
    if table.num_rows == 0:
        return context.envelope.empty_table()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(
        timestamp=_utc_timestamps(frame["timestamp"], step),
        data_json=_data_json(frame["data"]),
        **{c: pl.lit(None, pl.String) for c in _OPTIONAL if c not in frame.columns})
    bad = frame.filter(~pl.col("event_type").cast(pl.String).str.contains(EVENT_TYPE_PATTERN)
                       | pl.col("timestamp").is_null())
    if bad.height:
        raise ProcessorError(f"processor {step!r} returned {bad.height} events with an invalid "
                             f"event_type or timestamp, e.g. {bad.row(0, named=True)!r}")
    registry = context.registry
    frame = frame.with_columns(
        source=pl.col("source").cast(pl.String).fill_null(f"processor:{step}"),
        event_id=pl.col("event_id").cast(pl.String).fill_null(_content_ids(frame, step)))
    frame = frame.with_columns(
        correlation_id=pl.col("correlation_id").cast(pl.String).fill_null(pl.col("event_id")),
        key=pl.col("key").cast(pl.String).fill_null(_type_keys(frame, registry)))
    frame = frame.with_columns(key=pl.col("key").fill_null(pl.col("correlation_id")))
    return _envelope(frame, context, ingested_at)


def _as_table(events: pa.Table | Sequence[dict[str, Any]], step: str) -> pa.Table:
    if isinstance(events, pa.RecordBatch):
        events = pa.Table.from_batches([events])
    if not isinstance(events, pa.Table):
        try:
            events = pa.Table.from_pylist(list(events))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ProcessorError(f"processor {step!r} returned events Arrow cannot read: {exc}") from exc
    missing = [c for c in _REQUIRED if c not in events.column_names]
    if events.num_rows and missing:
        raise ProcessorError(f"processor {step!r} returned events without {missing}")
    return events


def _utc_timestamps(values: pl.Series, step: str) -> pl.Series:
    """Datetimes (naive means UTC), ISO-8601 strings or Arrow timestamps, as UTC microseconds."""
    if values.dtype == pl.String:
        values = values.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
    elif not isinstance(values.dtype, pl.Datetime):
        raise ProcessorError(f"processor {step!r}: timestamp must be a datetime, an ISO-8601 "
                             f"string or an Arrow timestamp, got {values.dtype}")
    elif values.dtype.time_zone is None:  # type: ignore[union-attr]
        values = values.dt.replace_time_zone("UTC")
    return values.dt.convert_time_zone("UTC").dt.cast_time_unit("us")


def _data_json(data: pl.Series) -> pl.Series:
    if data.dtype == pl.String:
        return data
    if isinstance(data.dtype, pl.Struct):
        return data.struct.json_encode()
    return data.cast(pl.String)


def _content_ids(frame: pl.DataFrame, step: str) -> pl.Series:
    """UUIDv5 of (processor, type, time, key, correlation id, data, occurrence): the same
    derived event gets the same id in any batch, two equal ones in a batch two ids."""
    content = pl.concat_str([
        pl.lit(step), pl.col("event_type").cast(pl.String),
        pl.col("timestamp").dt.epoch("us").cast(pl.String),
        pl.col("key").cast(pl.String).fill_null(""),
        pl.col("correlation_id").cast(pl.String).fill_null(""),
        pl.col("data_json").fill_null("")], separator="\x1f")
    named = frame.select(content.alias("c")).with_columns(
        n=pl.int_range(pl.len()).over("c").cast(pl.String))
    return pl.Series(uuid5_strings(named.select(pl.concat_str("c", "n", separator="\x1e"))
                                   .to_series().to_arrow()), dtype=pl.String)


def _type_keys(frame: pl.DataFrame, registry: Any) -> pl.Expr:
    """Each event's key by its type's key field, where ``data`` carries it."""
    if registry is None or not isinstance(frame.schema["data"], pl.Struct):
        return pl.lit(None, pl.String)
    fields = {f.name for f in frame.schema["data"].fields}  # type: ignore[union-attr]
    key = pl.lit(None, pl.String)
    for event_type in frame["event_type"].unique().to_list():
        field = registry.schema_for(event_type).key
        if field in fields and field not in ENVELOPE_KEY_FIELDS:
            key = pl.when(pl.col("event_type") == event_type).then(
                pl.col("data").struct.field(field).cast(pl.String)).otherwise(key)
    return key


def _envelope(frame: pl.DataFrame, context: StepContext, ingested_at: dt.datetime | None) -> pa.Table:
    """The derived rows in the envelope schema: typed payload fields for registered types,
    JSON text for the others; metadata with the type's version and ``ingested_at``."""
    schema, registry = context.envelope, context.registry
    data_type = schema.field("data").type
    given = frame.schema["data"]
    given_fields = {f.name for f in given.fields} if isinstance(given, pl.Struct) else set()
    typed = [n for n, s in registry.schemas.items() if s.model is not None] if registry else []
    is_typed = pl.col("event_type").is_in(typed)
    parts = []
    for field in data_type:
        if field.name == JSON_FIELD:
            parts.append(pl.when(is_typed).then(None).otherwise(pl.col("data_json")).alias(field.name))
        elif field.name in given_fields:
            parts.append(pl.when(is_typed).then(pl.col("data").struct.field(field.name))
                         .otherwise(None).alias(field.name))
        else:
            parts.append(pl.lit(None).alias(field.name))
    types = frame["event_type"].unique().to_list()
    versions = {t: str(registry.schema_for(t).version) if registry else "1" for t in types}
    table = frame.select(
        *schema.names[:6], data=pl.struct(parts),
        version=pl.col("event_type").replace_strict(versions, return_dtype=pl.String)).to_arrow()
    try:
        data = pa.StructArray.from_arrays(
            [pc.cast(table.column("data").combine_chunks().field(f.name), f.type) for f in data_type],
            fields=list(data_type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ProcessorError(f"derived payloads do not fit their registered types: {exc}") from exc
    n, metadata_type = table.num_rows, schema.field("metadata").type
    stamped = pa.scalar(ingested_at or dt.datetime.now(dt.UTC), TIMESTAMP).value
    metadata = pa.StructArray.from_arrays([
        pc.cast(table.column("version").combine_chunks(), metadata_type.field("version").type),
        pa.nulls(n, pa.string()), pa.array(np.full(n, stamped), TIMESTAMP),
        pa.nulls(n, pa.string())], fields=list(metadata_type))
    columns = [table.column(c) for c in schema.names[:6]] + [data, metadata]
    return pa.table(columns, names=schema.names).cast(schema)
