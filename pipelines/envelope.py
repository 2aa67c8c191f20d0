"""The event envelope: one row per event, whatever its source.

Columns (DESIGN.md): ``event_id``, ``event_type``, ``timestamp``, ``source``,
``correlation_id``, ``key``, ``data``, ``metadata``. The same shape exists twice: as the
pydantic model :class:`Envelope` (for one event, at the edges: HTTP, tests, docs) and as the
Arrow schema returned by :func:`envelope_schema` (for batches, everywhere else).

Payloads. Event types may register a payload schema (a pydantic model). ``data`` is an Arrow
struct whose fields are the union of the registered payload fields, plus ``json``: the JSON
text of payloads of unregistered types (null for typed ones). One struct for the whole
pipeline keeps every file of a table on one schema, so ``pl.scan_parquet`` reads the table
as a whole; typed fields stay typed to the store.

Versions. ``metadata.version`` is the payload's schema version, kept as text the way the
producer wrote it: a JSON integer (``1``, stored as ``"1"``) or a dotted string (``"1"``,
``"1.0"``, ``"2.1"``, ``"1.2.3"``, :data:`VERSION_PATTERN`). Only its major part selects the
payload schema: ``1.x`` events are schema version 1, a minor version being compatible by
definition. An event whose major version is older than its type's current version is brought
up to date by the upcasters registered for its type
(:meth:`PayloadRegistry.register_upcaster`), one major step at a time, per batch, and then
carries the current version (``"2"``); the producer's text stays in ``metadata.tags``.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from pipelines.errors import SchemaError

#: Dotted lower-case event type names: ``transaction.created``, ``iot.reading``.
EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
MAX_EVENT_TYPE_LENGTH = 128
JSON_FIELD = "json"
#: Versions as producers send them: a major number >= 1, then any dotted minor parts.
VERSION_PATTERN = r"^[1-9][0-9]*(\.[0-9]+)*$"

TIMESTAMP = pa.timestamp("us", tz="UTC")

METADATA_TYPE = pa.struct(
    [
        pa.field("version", pa.string(), nullable=False),  # "1", "1.0", "2.1.3"
        pa.field("region", pa.string()),
        pa.field("ingested_at", TIMESTAMP, nullable=False),
        pa.field("tags", pa.string()),  # JSON object text: free tags
    ]
)

#: Payload field types allowed in YAML payload schemas, by name.
SCALAR_TYPES: dict[str, type] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "datetime": dt.datetime,
    "date": dt.date,
}

_ARROW_OF_PYTHON: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bool: pa.bool_(),
    dt.datetime: TIMESTAMP,
    dt.date: pa.date32(),
}


class Metadata(BaseModel):
    """Envelope metadata of one event."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(default="1", pattern=VERSION_PATTERN)
    region: str | None = None
    ingested_at: dt.datetime

    @field_validator("version", mode="before")
    @classmethod
    def _integer_as_text(cls, value: Any) -> Any:
        """A JSON integer version (``1``) is the text ``"1"``; ``True`` is not a version."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    tags: dict[str, str] = Field(default_factory=dict)


class Envelope(BaseModel):
    """One event in the envelope every source is normalised into.

    Example:
        >>> import datetime as dt
        >>> now = dt.datetime(2018, 4, 1, tzinfo=dt.UTC)
        >>> e = Envelope(event_id="0b9c…", event_type="user.login", timestamp=now,
        ...              source="web", key="u1", data={"ok": True},
        ...              metadata=Metadata(ingested_at=now))
        >>> e.event_type
        'user.login'
    """

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(min_length=1, max_length=128)
    event_type: str = Field(pattern=EVENT_TYPE_PATTERN, max_length=MAX_EVENT_TYPE_LENGTH)
    timestamp: dt.datetime
    source: str
    correlation_id: str | None = None
    key: str
    data: dict[str, Any]
    metadata: Metadata


def arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """Map a pydantic field annotation to ``(arrow type, nullable)``.

    Supports ``int``, ``float``, ``str``, ``bool``, ``datetime`` (UTC), ``date``,
    ``X | None``, ``list[X]`` and nested pydantic models (structs).

    Example:
        >>> arrow_type(int | None)
        (DataType(int64), True)
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise SchemaError(f"only `X | None` unions are supported, not {annotation!r}")
        return arrow_type(args[0])[0], True
    if origin is list:
        (item,) = typing.get_args(annotation)
        return pa.list_(arrow_type(item)[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_struct(annotation), False
    if annotation in _ARROW_OF_PYTHON:
        return _ARROW_OF_PYTHON[annotation], False
    raise SchemaError(f"no Arrow type for payload annotation {annotation!r}")


def model_struct(model: type[BaseModel]) -> pa.StructType:
    """The Arrow struct of a pydantic payload model (field order kept)."""
    fields = []
    for name, info in model.model_fields.items():
        arrow, nullable = arrow_type(info.annotation)
        fields.append(pa.field(name, arrow, nullable=nullable or not info.is_required()))
    return pa.struct(fields)


def model_from_yaml(name: str, fields: Mapping[str, str]) -> type[BaseModel]:
    """Build a pydantic payload model from a YAML mapping ``field: type``.

    Types are the names of :data:`SCALAR_TYPES`; a trailing ``?`` makes the field optional.

    Example:
        >>> m = model_from_yaml("Tx", {"amount": "float", "note": "str?"})
        >>> sorted(m.model_fields)
        ['amount', 'note']
    """
    spec: dict[str, Any] = {}
    for field_name, type_name in fields.items():
        optional = type_name.endswith("?")
        base = SCALAR_TYPES.get(type_name.rstrip("?"))
        if base is None:
            raise SchemaError(
                f"payload {name}.{field_name}: unknown type {type_name!r}; "
                f"allowed: {', '.join(SCALAR_TYPES)} (optionally suffixed with '?')"
            )
        spec[field_name] = (base | None, None) if optional else (base, ...)
    model_name = "".join(part.title() for part in name.replace(".", "_").split("_"))
    return create_model(model_name or "Payload", **spec)


Upcaster = Callable[[pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class PayloadSchema:
    """A registered event type: its payload model, current version and key field."""

    event_type: str
    model: type[BaseModel] | None
    version: int = 1
    key: str | None = None
    region: str | None = None

    @property
    def struct(self) -> pa.StructType | None:
        return None if self.model is None else model_struct(self.model)


@dataclass
class PayloadRegistry:
    """Event types with their payload schemas and upcasters.

    The registry is built once from config (:func:`pipelines.spec.load_pipeline`) and then
    only read. ``default`` describes unregistered types: payload kept as JSON text.

    Example:
        >>> reg = PayloadRegistry()
        >>> reg.register(PayloadSchema("user.login", model_from_yaml("l", {"ok": "bool"})))
        >>> reg.data_type().names
        ['ok', 'json']
    """

    schemas: dict[str, PayloadSchema] = field(default_factory=dict)
    default: PayloadSchema = field(
        default_factory=lambda: PayloadSchema("*", None, version=1, key="correlation_id")
    )
    upcasters: dict[tuple[str, int], Upcaster] = field(default_factory=dict)

    def register(self, schema: PayloadSchema) -> None:
        """Add an event type; raises :class:`SchemaError` if its fields clash with others."""
        self.schemas[schema.event_type] = schema
        self.data_type()  # validates the union now, not at the first batch

    def register_upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register a function turning payloads of ``from_version`` into the next.

        The function takes and returns a ``polars.DataFrame`` of payload fields (typed
        types) or a one-column frame ``json`` (untyped types), for a whole batch.

        Example:
            >>> reg = PayloadRegistry()
            >>> @reg.register_upcaster("user.login", from_version=1)
            ... def add_channel(df):
            ...     return df.with_columns(channel=pl.lit("web"))
        """

        def decorate(fn: Upcaster) -> Upcaster:
            self.upcasters[(event_type, from_version)] = fn
            return fn

        return decorate

    def schema_for(self, event_type: str) -> PayloadSchema:
        return self.schemas.get(event_type, self.default)

    def data_type(self) -> pa.StructType:
        """The ``data`` struct: union of registered payload fields, then ``json``."""
        fields: dict[str, pa.Field] = {}
        for schema in self.schemas.values():
            struct = schema.struct
            for f in struct if struct is not None else ():
                seen = fields.get(f.name)
                if seen is not None and seen.type != f.type:
                    raise SchemaError(
                        f"payload field {f.name!r} is {seen.type} in one event type and "
                        f"{f.type} in {schema.event_type!r}; give them one type or two names"
                    )
                fields[f.name] = f.with_nullable(True)
        if JSON_FIELD in fields:
            raise SchemaError(f"payload field name {JSON_FIELD!r} is reserved for untyped payloads")
        return pa.struct([*fields.values(), pa.field(JSON_FIELD, pa.string())])


def envelope_schema(registry: PayloadRegistry | None = None) -> pa.Schema:
    """The Arrow schema of envelope batches for a registry's payload types."""
    data = (registry or PayloadRegistry()).data_type()
    return pa.schema(
        [
            pa.field("event_id", pa.string(), nullable=False),
            pa.field("event_type", pa.string(), nullable=False),
            pa.field("timestamp", TIMESTAMP, nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("correlation_id", pa.string()),
            pa.field("key", pa.string(), nullable=False),
            pa.field("data", data),
            pa.field("metadata", METADATA_TYPE, nullable=False),
        ]
    )


#: The ``event_type`` of dead letters whose claimed type is missing or not a valid name.
INVALID_EVENT_TYPE = "_invalid"

ReasonCode = Literal[
    "bad_encoding",
    "bad_json",
    "not_an_object",
    "missing_event_type",
    "bad_event_type",
    "missing_timestamp",
    "bad_timestamp",
    "bad_event_id",
    "missing_key",
    "missing_field",
    "bad_field",
    "payload_too_large",
    "bad_version",
    "upcast_failed",
    "duplicate_event_id",
    "processor_error",
]

DEADLETTER_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string()),
        pa.field("event_type", pa.string(), nullable=False),  # claimed if valid, else _invalid
        pa.field("claimed_event_type", pa.string()),  # as the producer gave it: may be anything
        pa.field("source", pa.string(), nullable=False),
        pa.field("part", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("raw", pa.binary()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("ingested_at", TIMESTAMP, nullable=False),
    ]
)
