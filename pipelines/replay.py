"""Replay: a store's source events fed again, in event-time order, through a pipeline.

The ``store`` source kind reads the ``events`` table of a store (optionally as it stood at a
commit time, between two event times, of some event types) and yields its rows as raw
records: the payload fields as columns, the envelope fields under ``_er_*`` names.
:func:`replay_spec` turns a pipeline's config into one that reads them: the source becomes
the store, the mapping takes every envelope field from the record (so events keep their
ids, and what the pipeline derives from them, labels, alerts, scores, gets the same ids),
everything else (steps, labels, routing, runtime) stays.

Only source events are fed again. Events the pipeline derives itself are derived again:
those a step, a processor or a route emitted (``source`` ``step:*``, ``processor:*``,
``route:*``) and the label feed's type (``labels.event_type``).

The rows are sorted by event time, then the config's ``order_ties_by`` field, then event id:
the same store gives the same batches on every replay.

Example:
    >>> from pipelines.pipeline import load_pipeline
    >>> spec = replay_spec(load_pipeline("configs/fraud.yaml"), "store/fraud")
    >>> spec.source.format, spec.source.path
    ('store', ['store/fraud'])
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipelines.envelope import JSON_FIELD
from pipelines.errors import ConfigError, StoreError
from pipelines.sources import RawBatch, Source, SourceReader
from pipelines.spec import JsonRef, LimitsSpec, PipelineSpec, SourceSpec
from pipelines.store import EventStore

#: Where a replayed record carries each envelope field.
ENVELOPE_COLUMNS = {"event_id": "_er_event_id", "event_type": "_er_event_type",
                    "timestamp": "_er_timestamp", "source": "_er_source",
                    "correlation_id": "_er_correlation_id"}
METADATA_COLUMN = "_er_metadata"
#: ``source`` prefixes of events the pipeline derived (steps, processors, routes' emits).
DERIVED_SOURCES = ("step:", "processor:", "route:")


class StoreSourceOptions(BaseModel):
    """The ``store`` kind's own fields of the ``source`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_types: list[str] | None = Field(default=None, description="only these types")
    exclude_types: list[str] = Field(default_factory=list, description="never these types")
    start: dt.datetime | None = Field(default=None, description="event time >= start")
    end: dt.datetime | None = Field(default=None, description="event time < end")
    as_of: dt.datetime | None = Field(default=None, description="the store at this commit time")
    payload_fields: list[str] = Field(default_factory=list, description="typed payload columns")
    json_column: str | None = Field(default=None, description="untyped payloads as this column")
    metadata: bool = False
    order_ties_by: str | None = None


class StoreSource(Source):
    """The source events of a store, as one part (``events``) in event-time order."""

    def __init__(self, name: str, root: str | Path, options: StoreSourceOptions,
                 batch_size: int) -> None:
        self.name, self.root, self.options, self.batch_size = name, str(root), options, batch_size

    def list_parts(self) -> list[str]:
        return ["events"]

    def open_part(self, part: str, start: int = 0) -> SourceReader:
        if part != "events":
            raise StoreError(f"a store source has one part, 'events', not {part!r}")
        return _TableReader(self.name, part, self.records(), start, self.batch_size)

    def records(self) -> pa.Table:
        """Every record the replay feeds, in order."""
        store = EventStore(self.root)
        options = self.options
        view = store.as_of(options.as_of) if options.as_of is not None else store
        if not view.files("events", options.event_types):
            return pa.table({})
        frame = view.scan("events", options.event_types, options.start, options.end).filter(
            ~pl.col("source").str.starts_with(DERIVED_SOURCES[0])
            & ~pl.col("source").str.starts_with(DERIVED_SOURCES[1])
            & ~pl.col("source").str.starts_with(DERIVED_SOURCES[2])
            & ~pl.col("event_type").is_in(options.exclude_types))
        data = pl.col("data")
        columns = [data.struct.field(name) for name in options.payload_fields]
        if options.json_column is not None:
            columns.append(data.struct.field(JSON_FIELD).alias(options.json_column))
        if options.metadata:
            metadata = pl.col("metadata").struct
            columns.append(pl.struct(metadata.field("version"), metadata.field("region"))
                           .struct.json_encode().alias(METADATA_COLUMN))
        columns += [pl.col(field).alias(column) for field, column in ENVELOPE_COLUMNS.items()]
        ties = [options.order_ties_by.removeprefix("data.")] if options.order_ties_by else []
        ordered = frame.select(columns).sort(
            ["_er_timestamp", *ties, "_er_event_id"], maintain_order=True).collect()
        return ordered.to_arrow()

    def __repr__(self) -> str:
        return f"StoreSource({self.root!r}, {self.options!r})"


class _TableReader(SourceReader):
    """Batches of ``batch_size`` rows of a table, from row ``start``."""

    def __init__(self, source: str, part: str, table: pa.Table, start: int, batch_size: int) -> None:
        self.source, self.part, self.table = source, part, table
        self.position, self.batch_size = start, batch_size

    def next_batch(self) -> RawBatch | None:
        if self.position >= self.table.num_rows:
            return None
        rows = self.table.slice(self.position, self.batch_size).combine_chunks()
        offsets = np.arange(self.position, self.position + rows.num_rows, dtype=np.int64)
        self.position += rows.num_rows
        batch = rows.to_batches()[0] if rows.num_rows else pa.record_batch([], schema=rows.schema)
        return RawBatch(self.source, self.part, offsets, batch)

    def snapshot(self) -> int:
        return self.position

    def close(self) -> None:
        self.table = self.table.slice(0, 0)


def build_store_source(spec: SourceSpec, paths: list[str], options: StoreSourceOptions,
                       limits: LimitsSpec) -> Source:
    """The ``store`` source kind: ``path`` is the store's root."""
    if len(paths) != 1:
        raise ConfigError(f"source.path: a store source reads one store, got {paths}")
    return StoreSource(spec.source_name, paths[0], options, spec.batch_size)


def derived_types(spec: PipelineSpec) -> list[str]:
    """The event types the pipeline derives without a step's ``source`` mark: the labels."""
    return [spec.labels.event_type] if spec.labels is not None else []


def _payload_columns(spec: PipelineSpec, types: list[str] | None) -> tuple[list[str], str | None]:
    """The typed payload fields and the JSON column a record of ``spec`` carries."""
    registry = spec.registry()
    mapping = spec.mapping.payload
    if isinstance(mapping, JsonRef):
        return [], mapping.json_
    names = types if types is not None else list(spec.event_types)
    fields: list[str] = []
    for name in names:
        struct = registry.schema_for(name).struct
        fields += [f.name for f in struct or () if f.name not in fields]
    return fields, None


def replay_spec(spec: PipelineSpec, store: str | Path, *, start: dt.datetime | None = None,
                end: dt.datetime | None = None, event_types: list[str] | None = None,
                as_of: dt.datetime | None = None) -> PipelineSpec:
    """``spec`` reading the source events of ``store`` instead of its own source.

    Raises:
            ConfigError: the config's payload mapping cannot be replayed.
    """
    fields, json_column = _payload_columns(spec, event_types)
    source = {**spec.source.model_dump(include={"name", "batch_size", "ordering", "lateness",
                                                "late", "order_ties_by", "duplicates",
                                                "dedup_horizon", "max_future"}),
              "format": "store", "path": [str(store)], "name": spec.source.source_name,
              "event_types": event_types, "exclude_types": derived_types(spec),
              "start": start, "end": end, "as_of": as_of, "payload_fields": fields,
              "json_column": json_column, "metadata": spec.mapping.metadata is not None,
              "order_ties_by": spec.source.order_ties_by}
    mapping = {**ENVELOPE_COLUMNS, "timestamp_unit": "auto",
               "payload": {"columns": fields} if json_column is None else {"json": json_column}}
    if spec.mapping.metadata is not None:
        mapping["metadata"] = {"json": METADATA_COLUMN}
    return PipelineSpec.model_validate({**spec.model_dump(by_alias=True, exclude_none=True),
                                        "source": source, "mapping": mapping})

