"""A batch of a few well-formed JSON events, normalised without a Polars plan.

A live source hands the run batches of a few events, and the normaliser's one Polars plan
(:meth:`pipelines.normalise.Normaliser._normalise_fused`) costs some 5 ms whatever the rows:
most of a small batch's time in the driver. This path reads such a batch with
:func:`json.loads` and builds the envelope in Arrow directly, but only where every event is
plainly valid: a JSON object, a registered typed event type, an ISO timestamp, payload
fields of their JSON types, a metadata object of plain strings and numbers, the current
version. Anything else, from a malformed line to a float literal that only a correctly
rounding parser reads the same, and the batch is *declined*: the Polars plan then
normalises it, checks and reasons and all. So this path never decides a rejection, and what
it accepts it produces exactly as the plan would (tested equal on generated batches, valid
and hostile, in ``tests/unit/test_small_batches.py``). Duplicates are found by the same
filter as the plan's, after everything else is known.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.deadletters import NONE as NO_DEAD_LETTERS
from pipelines.dedup import DuplicateFilter
from pipelines.envelope import (
    DEADLETTER_SCHEMA,
    EVENT_TYPE_PATTERN,
    JSON_FIELD,
    MAX_EVENT_TYPE_LENGTH,
    TIMESTAMP,
    VERSION_PATTERN,
)
from pipelines.event_ids import derived_event_ids
from pipelines.sources import RawBatch
from pipelines.spec import ENVELOPE_KEY_FIELDS, Constant, JsonRef
from pipelines.tables import conform
from pipelines.timestamps import MAX_TIME, MIN_TIME, epoch_micros

#: Batches of at most this many rows take this path (beyond it the plan's fixed cost is
#: spread over enough rows, and per-row Python would cost more).
SMALL_BATCH_ROWS = 64

_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(Z?)")
#: A float literal any parser reads to the same double: at most 15 significant digits and
#: a power of ten within 10**22 (exact by one correctly rounded operation).
_SAFE_FLOAT = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")
_EVENT_TYPE = re.compile(EVENT_TYPE_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_LEADING_DIGITS = re.compile(r"[0-9]+")
_JSON_LITERALS = frozenset({"true", "false", "null"})
_INT_RANGES = {pa.int8(): 7, pa.int16(): 15, pa.int32(): 31, pa.int64(): 63}
_MIN_US, _MAX_US = epoch_micros(MIN_TIME), epoch_micros(MAX_TIME)


class _Declined(Exception):
    """An event this path does not decide: the batch goes to the Polars plan."""


@dataclass(slots=True)
class _Row:
    """One event's envelope fields as read from its line. ``event_id`` is ``None`` until
    the batch's derived ids are known (the producer gave none), and so are the correlation
    id and key that default to it."""

    event_id: str | None
    event_type: str
    micros: int
    source: str | None
    correlation_id: str | None
    key: str | None
    values: dict[str, Any]
    version: str
    region: str | None
    tags: str | None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # which of two equal keys wins differs between parsers
        raise _Declined
    return out


def _safe_float(literal: str) -> float:
    match = _SAFE_FLOAT.fullmatch(literal)
    if match is None:
        raise _Declined
    whole, fraction, exponent = match.groups()
    digits = (whole + (fraction or "")).lstrip("0")
    if len(digits) > 15 or (exponent is not None and abs(int(exponent)) > 22):
        raise _Declined
    return float(literal)


def _refuse_constant(_: str) -> Any:
    raise _Declined  # NaN, Infinity: not JSON


def _plain(text: str) -> bool:
    """Text that serialises the same in any JSON writer (no escapes needed)."""
    return text.isprintable() and '"' not in text and "\\" not in text


def _iso_micros(text: Any) -> int:
    """Microseconds since the epoch of an ISO timestamp (naive or ``Z``: UTC)."""
    if not isinstance(text, str):
        raise _Declined
    match = _ISO.fullmatch(text)
    if match is None:
        raise _Declined
    year, month, day, hour, minute, second, fraction, _ = match.groups()
    try:
        moment = dt.datetime(int(year), int(month), int(day), int(hour), int(minute),
                             int(second), int((fraction or "0").ljust(6, "0")), tzinfo=dt.UTC)
    except ValueError:
        raise _Declined from None
    micros = epoch_micros(moment)
    if not _MIN_US <= micros <= _MAX_US:
        raise _Declined
    return micros


def _text(value: Any) -> str | None:
    """An optional text field: absent or null is ``None``; anything but a string declines."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Declined
    return value


class _TypePlan:
    """What one registered typed event type needs from its events."""

    def __init__(self, schema: Any, fields: list[pa.Field], max_key: int) -> None:
        struct = schema.struct
        self.having = {f.name: f for f in struct}
        self.fields = [(f.name, f.type, not struct.field(f.name).nullable)
                       for f in fields if f.name in self.having]
        self.version, self.region, self.key = schema.version, schema.region, schema.key
        self.max_key = max_key
        key_type = self.having[self.key].type if self.key in self.having else None
        self.supported = (self.key in ENVELOPE_KEY_FIELDS and self.key != "part") or (
            key_type is not None and (pa.types.is_integer(key_type) or pa.types.is_string(key_type)))
        self.supported &= all(_supported(t) for _, t, _ in self.fields)


def _supported(arrow: pa.DataType) -> bool:
    return arrow in _INT_RANGES or arrow == pa.float64() or pa.types.is_string(arrow) \
        or (pa.types.is_timestamp(arrow) and arrow.unit == "us")


def _field(value: Any, arrow: pa.DataType) -> Any:
    """A present payload value as its field's type would read it, or declined."""
    if arrow in _INT_RANGES:
        bits = _INT_RANGES[arrow]
        if type(value) is not int or not -(1 << bits) <= value < (1 << bits):
            raise _Declined
        return value
    if arrow == pa.float64():
        if type(value) is float:
            return value
        if type(value) is int and abs(value) < (1 << 53):
            return float(value)
        raise _Declined
    if pa.types.is_string(arrow):
        if not isinstance(value, str) or not _plain(value):
            raise _Declined
        return value
    return _iso_micros(value)  # a timestamp field


class SmallBatchNormaliser:
    """The plainly valid events of a small JSON Lines batch, normalised in Python.

    Args:
        normaliser: the run's :class:`~pipelines.normalise.Normaliser` (its spec, registry
            and envelope schema).
    """

    def __init__(self, normaliser: Any) -> None:
        spec = normaliser.spec
        self.schema, self.max_future = normaliser.schema, spec.source.max_future
        m = spec.mapping
        self.refs = refs = [m.event_id, m.event_type, m.source, m.correlation_id]
        self.timestamp = m.timestamp
        self.payload = m.payload.json_ if isinstance(m.payload, JsonRef) else None
        self.metadata = m.metadata.json_ if m.metadata is not None else None
        registry = normaliser.registry
        self.data_type = registry.data_type()
        fields = [f for f in self.data_type if f.name != JSON_FIELD]
        limits = spec.limits
        self.max_line, self.max_key = limits.max_payload_bytes, limits.max_key_length
        self.types = {name: _TypePlan(schema, fields, self.max_key)
                      for name, schema in registry.schemas.items() if schema.model is not None}
        self.types = {n: p for n, p in self.types.items() if p.supported
                      and _EVENT_TYPE.fullmatch(n) and len(n) <= MAX_EVENT_TYPE_LENGTH}
        self.enabled = (normaliser.json_lines and self.payload is not None
                        and not any(isinstance(r, Constant) for r in refs)
                        and m.event_type is not None and bool(self.types))

    def normalise(self, raw: RawBatch, duplicates: DuplicateFilter | None, arrived: int | None,
                  ingested_at: dt.datetime) -> tuple[pa.Table, pa.Table] | None:
        """The batch's (events, dead letters: its duplicates), or ``None`` (declined)."""
        if not self.enabled or raw.num_rows > SMALL_BATCH_ROWS or raw.num_rows == 0:
            return None
        lines = raw.records.column("line").to_pylist()
        latest = min(ingested_at + self.max_future, MAX_TIME)
        latest_us = epoch_micros(latest)
        rows: list[_Row] = []
        try:
            for line in lines:
                rows.append(self._event(line, latest_us))
        except _Declined:
            return None
        if any(row.event_id is None for row in rows):
            derived = derived_event_ids(raw.source, raw.part, raw.offsets).to_pylist()
            for row, event_id in zip(rows, derived, strict=True):
                if row.event_id is None:
                    row.event_id = event_id
        for row in rows:
            if row.correlation_id is None:
                row.correlation_id = row.event_id  # the correlation id defaults to the event id
            elif len(row.correlation_id) > self.max_key and row.correlation_id != row.event_id:
                return None
            if row.key is None:  # keyed by the event id itself
                row.key = row.event_id
                if len(row.key) > self.max_key:
                    return None
        valid = np.ones(len(rows), bool)
        if duplicates is not None:
            times = np.full(len(rows), arrived, np.int64) if arrived is not None \
                else np.array([row.micros for row in rows], np.int64)
            ids = pa.array([row.event_id for row in rows], pa.string())
            valid = ~duplicates.mark(ids, times, keep=valid)
        ingested_us = epoch_micros(ingested_at)
        events = self._table(raw.source, [r for r, ok in zip(rows, valid, strict=True) if ok],
                             ingested_us)
        return events, _duplicates(raw, lines, rows, ingested_us, ~valid)

    def _event(self, line: bytes, latest_us: int) -> _Row:
        """One line's event, or declined."""
        if len(line) > self.max_line or b"\\u" in line:
            raise _Declined  # escapes: surrogates, and text two writers escape differently
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys, parse_float=_safe_float,
                             parse_constant=_refuse_constant)
        except ValueError:
            raise _Declined from None
        if type(obj) is not dict:
            raise _Declined
        id_ref, type_ref, source_ref, correlation_ref = self.refs
        event_id = _text(obj.get(id_ref)) if id_ref is not None else None
        if event_id is not None and (not 1 <= len(event_id) <= 128 or event_id in _JSON_LITERALS
                                     or event_id[:1] in "[{" or not _plain(event_id)):
            raise _Declined
        event_type = obj.get(type_ref)
        plan = self.types.get(event_type) if isinstance(event_type, str) else None
        if plan is None:
            raise _Declined
        micros = _iso_micros(obj.get(self.timestamp))
        if micros > latest_us:
            raise _Declined
        source = _text(obj.get(source_ref)) if source_ref is not None else None
        correlation = _text(obj.get(correlation_ref)) if correlation_ref is not None else None
        version, region, tags = self._metadata(obj, plan)
        data = obj.get(self.payload)
        if type(data) is not dict:
            raise _Declined
        values: dict[str, Any] = {}
        for name, arrow, required in plan.fields:
            value = data.get(name)
            if value is None:
                if required:
                    raise _Declined
                values[name] = None
            else:
                values[name] = _field(value, arrow)
        key = self._key(plan, values, event_id, event_type, source, correlation)
        return _Row(event_id, event_type, micros, source, correlation, key, values, version,
                    region, tags)

    def _metadata(self, obj: dict[str, Any], plan: _TypePlan) -> tuple[str, str | None, str | None]:
        meta = obj.get(self.metadata) if self.metadata is not None else None
        if meta is None:
            return str(plan.version), plan.region, None
        if type(meta) is not dict:
            raise _Declined
        for value in meta.values():
            if not ((type(value) is str and _plain(value)) or type(value) is int):
                raise _Declined
        version = meta.get("version")
        if version is None:
            text = str(plan.version)
        elif type(version) is int and version >= 1:
            text = str(version)
        elif type(version) is str and _VERSION.fullmatch(version):
            text = version
        else:
            raise _Declined
        major = _LEADING_DIGITS.match(text)
        if major is None or int(major.group()) != plan.version:  # older: upcast; newer: bad
            raise _Declined
        region = meta.get("region")
        if region is not None and type(region) is not str:
            raise _Declined
        tags = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
        return text, plan.region if region is None else region, tags

    def _key(self, plan: _TypePlan, values: dict[str, Any], event_id: str | None,
             event_type: str, source: str | None, correlation: str | None) -> str | None:
        """The partition key's text (``None``: the event id, known once ids are derived)."""
        if plan.key in plan.having:
            value = values[plan.key]
            key = None if value is None else str(value)
        elif plan.key == "event_id":
            return event_id
        elif plan.key == "correlation_id":
            if correlation is None:  # defaults to the event id
                return event_id
            key = correlation
        else:
            key = {"event_type": event_type, "source": source}[plan.key]
            if key is None:
                raise _Declined  # the source's name: left to the plan
        if not key or len(key) > plan.max_key:
            raise _Declined
        return key

    def _table(self, source: str, rows: list[_Row], ingested_us: int) -> pa.Table:
        """The envelope of ``rows`` (``source``: the source's name, where an event gives none)."""
        data = [pa.array([row.values.get(f.name) for row in rows], f.type)
                for f in self.data_type if f.name != JSON_FIELD]
        data.append(pa.nulls(len(rows), self.data_type.field(JSON_FIELD).type))
        metadata = pa.StructArray.from_arrays(
            [pa.array([row.version for row in rows], pa.string()),
             pa.array([row.region for row in rows], pa.string()),
             pa.array(np.full(len(rows), ingested_us), TIMESTAMP),
             pa.array([row.tags for row in rows], pa.string())],
            names=["version", "region", "ingested_at", "tags"])
        table = pa.table({
            "event_id": pa.array([row.event_id for row in rows], pa.string()),
            "event_type": pa.array([row.event_type for row in rows], pa.string()),
            "timestamp": pa.array([row.micros for row in rows], TIMESTAMP),
            "source": pa.array([source if row.source is None else row.source for row in rows],
                               pa.string()),
            "correlation_id": pa.array([row.correlation_id for row in rows], pa.string()),
            "key": pa.array([row.key for row in rows], pa.string()),
            "data": pa.StructArray.from_arrays(data, fields=list(self.data_type)),
            "metadata": metadata,
        })
        return conform(table, self.schema)


def _duplicates(raw: RawBatch, lines: list[bytes], rows: list[_Row], ingested_us: int,
                repeated: np.ndarray) -> pa.Table:
    """The dead letters of the ``repeated`` rows (ids already stored)."""
    at = np.flatnonzero(repeated)
    if not len(at):
        return NO_DEAD_LETTERS
    dead = [rows[i] for i in at]
    return pa.table({
        "event_id": [row.event_id for row in dead],
        "event_type": [row.event_type for row in dead],
        "claimed_event_type": [row.event_type for row in dead],
        "source": [raw.source] * len(at),
        "part": [raw.part] * len(at),
        "offset": pa.array(np.asarray(raw.offsets)[at], pa.int64()),
        "raw": pa.array([lines[i] for i in at], pa.binary()),
        "reason": ["duplicate_event_id"] * len(at),
        "message": [f"event id {row.event_id} was already stored" for row in dead],
        "ingested_at": pa.array(np.full(len(at), ingested_us), TIMESTAMP),
    }, schema=DEADLETTER_SCHEMA)
