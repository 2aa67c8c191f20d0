"""Normalisation: a source batch in, envelope events and dead letters out, per batch.

Every step is a Polars expression over the whole batch. Per-row Python runs only to find
which rows of a failing Arrow cast are at fault (bisection, :func:`invalid_utf8_rows`), and
for a live source's small batches (up to 64 JSON lines) of plainly valid events, which
:mod:`pipelines.normalise_small` builds without a plan (the plan's fixed cost is some 5 ms);
it declines anything less plain, and the plan decides.
Each rejected row gets one reason code (the first check it fails, in the order below) and
a message that says what was wrong:

1. decoding (JSON Lines only): ``bad_encoding``, ``payload_too_large``, ``bad_json``,
   ``not_an_object``;
   CSV only: ``malformed_row`` (wrong column count, broken quoting), ``bad_encoding``;
2. envelope: ``missing_event_type``, ``bad_event_type``, ``missing_timestamp``,
   ``bad_timestamp``, ``bad_event_id``, ``bad_version``, ``timestamp_out_of_range`` (after
   the clock's now plus ``source.max_future``, or outside what ``timestamp[us]`` and
   nanosecond arithmetic hold: 1677..2262), ``upcast_failed``;
3. payload: ``missing_field`` (null, absent or blank text), ``bad_field`` (unreadable, NaN,
   infinite or out of the type's range), ``payload_too_large``, then ``missing_key`` and
   ``bad_field`` for a partition key or correlation id over ``limits.max_key_length``.

Example:
    >>> from pipelines.spec import PipelineSpec
    >>> spec = PipelineSpec.model_validate({"name": "d",
    ...     "source": {"format": "parquet", "path": ["x"], "name": "demo"},
    ...     "mapping": {"event_type": {"value": "user.login"}, "timestamp": "t"},
    ...     "event_types": {"user.login": {"key": "user"}}})
    >>> raw = RawBatch("demo", "x.parquet", np.arange(2),
    ...                pa.record_batch({"t": ["2024-01-01T00:00:00Z", "?"], "user": ["a", "b"]}))
    >>> out = Normaliser(spec).normalise(raw)
    >>> out.events.num_rows, out.deadletters.column("reason").to_pylist()
    (1, ['bad_timestamp'])
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dedup import DuplicateFilter
from pipelines.envelope import (
    DEADLETTER_SCHEMA,
    EVENT_TYPE_PATTERN,
    INVALID_EVENT_TYPE,
    JSON_FIELD,
    MAX_EVENT_TYPE_LENGTH,
    TIMESTAMP,
    VERSION_PATTERN,
    PayloadRegistry,
    envelope_schema,
)
from pipelines.event_ids import derived_event_ids
from pipelines.kinds import reads_json_lines
from pipelines.normalise_small import SmallBatchNormaliser
from pipelines.payloads import cast_field, is_blank, representable
from pipelines.sources import (
    MALFORMED_MESSAGE,
    MALFORMED_RAW,
    MALFORMED_REASON,
    RawBatch,
    invalid_utf8_rows,
)
from pipelines.spec import ENVELOPE_KEY_FIELDS, Constant, JsonRef, PipelineSpec
from pipelines.tables import conform
from pipelines.timestamps import (
    MAX_TIME,
    epoch_micros,
    outside_representable_range,
    parse_timestamp,
)

Clock = Callable[[], dt.datetime]
_MALFORMED = (MALFORMED_REASON, MALFORMED_MESSAGE, MALFORMED_RAW)
#: JSON literals that a JSON path extraction turns into text: never a valid type or id.
_JSON_LITERALS = ["true", "false", "null"]


def utc_now() -> dt.datetime:
    """The default clock: ingestion time, UTC."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Normalised:
    """What one source batch became: ``read`` = ``events`` rows + ``deadletters`` rows."""

    events: pa.Table
    deadletters: pa.Table
    read: int


def _is_text(arrow: pa.DataType) -> bool:
    return pa.types.is_string(arrow) or pa.types.is_large_string(arrow)


def _kind(arrow: pa.DataType) -> str:
    """How a bad field's message names its type: numbers must also be finite and in range."""
    if pa.types.is_floating(arrow):
        return f"a finite {arrow}"
    if pa.types.is_integer(arrow):
        return f"{arrow} (a whole number in range)"
    if pa.types.is_timestamp(arrow):
        return "a timestamp between 1677 and 2262"
    return str(arrow)


def producer_version(text: pl.Expr, number: pl.Expr) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(version text, major part, well formed) of ``metadata.version`` as a producer gave it.

    Args:
        text: the version's JSON text (a string's without quotes; null when absent).
        number: the same text where the version is a JSON number, else null.

    A JSON integer >= 1 and a string matching :data:`VERSION_PATTERN` are versions; anything
    else (``"abc"``, ``"1..2"``, ``0``, ``-1``, ``1.5``, ``true``, a list) is not. The major
    part is null where the version is not well formed or does not fit an ``Int32``.

    Example:
        >>> df = pl.DataFrame({"t": ["1.0", "2", "1.5", "x"], "n": [None, "2", "1.5", None]})
        >>> v, major, ok = producer_version(pl.col("t"), pl.col("n"))
        >>> df.select(v, major.alias("major"), ok=ok).rows()
        [('1.0', 1, True), ('2', 2, True), ('1.5', None, False), ('x', None, False)]
    """
    integer = r"^[1-9][0-9]*$"
    well_formed = (pl.when(number.is_not_null()).then(text.str.contains(integer))
                   .otherwise(text.str.contains(VERSION_PATTERN)))
    major = text.str.extract(r"^([0-9]+)", 1).cast(pl.Int32, strict=False)
    well_formed = well_formed.fill_null(False) & major.is_not_null()
    return text, pl.when(well_formed).then(major), well_formed


def _line_frame(lines: pa.Array) -> pl.DataFrame:
    """The lines as text (null where not UTF-8) and which were not UTF-8."""
    bad_encoding = invalid_utf8_rows(lines)
    if bad_encoding.any():
        lines = pa.array(np.where(bad_encoding, None, lines.to_numpy(zero_copy_only=False)),
                         pa.binary())
    return pl.DataFrame([pl.Series("__line", lines.cast(pa.string())),
                         pl.Series("__bad_encoding", bad_encoding)])


def _derived_ids(raw: RawBatch) -> pl.Series:
    """The ids a batch's events get where the source gives none (from their offsets)."""
    return pl.Series("__derived", derived_event_ids(raw.source, raw.part, raw.offsets))


def _reason(checks: list[tuple[pl.Expr, str, pl.Expr]]) -> tuple[pl.Expr, pl.Expr]:
    """(reason, message) expressions: the first failing check of each row wins."""
    if not checks:
        return pl.lit(None, pl.String), pl.lit(None, pl.String)
    reason = pl.when(checks[0][0]).then(pl.lit(checks[0][1]))
    message = pl.when(checks[0][0]).then(checks[0][2])
    for failed, code, text in checks[1:]:
        reason = reason.when(failed).then(pl.lit(code))
        message = message.when(failed).then(text)
    return reason.otherwise(None), message.otherwise(None)



#: Payload plans kept per normaliser (one per set of column types a source has shown).
_PLAN_CACHE_SIZE = 16


@dataclass(frozen=True)
class _PayloadPlan:
    """The typed-payload stage's expressions for one set of column types."""

    sources: list[pl.Expr]
    #: timestamp fields parsed once, into columns the casts read (an expression used twice
    #: in one, as a range check needs its value, is planned twice: 3 ms on a one-event batch)
    parses: list[pl.Expr]
    casts: list[pl.Expr]
    checks: list[tuple[pl.Expr, str, pl.Expr]]
    key: pl.Expr
    key_checks: list[tuple[pl.Expr, str, pl.Expr]]


@dataclass(frozen=True)
class _FusedPlan:
    """The passes of a batch in one plan (:meth:`Normaliser._normalise_fused`), the last
    of which gives each check's condition (``__check_i``)."""

    passes: list[dict[str, pl.Expr]]
    #: every check but the one against the clock's now, whose place is ``later_at``
    checks: list[tuple[pl.Expr, str, pl.Expr]]
    later_at: int


#: The envelope's columns in the fused plan's frame.
_OUT_COLUMNS = [("event_id", "__event_id"), ("event_type", "__event_type"),
                ("timestamp", "__timestamp"), ("source", "__source"),
                ("correlation_id", "__correlation_id"), ("key", "__key"),
                ("data", "__out_data")]
_DUPLICATE_CHECK = (pl.lit(False), "duplicate_event_id",
                    pl.format("event id {} was already stored", pl.col("__event_id")))


def _named(expressions: list[pl.Expr]) -> dict[str, pl.Expr]:
    return {e.meta.output_name(): e for e in expressions}


def _source_columns(raw: RawBatch) -> list[str]:
    return [c for c in raw.records.schema.names if c not in _MALFORMED]


class Normaliser:
    """Turns :class:`~pipelines.sources.RawBatch` es into envelope batches and dead letters.

    Pure and picklable: state is only the frozen spec; ``clock`` stamps ``ingested_at``.
    """

    def __init__(self, spec: PipelineSpec, clock: Clock = utc_now) -> None:
        self.spec = spec
        self.clock = clock
        self.registry: PayloadRegistry = spec.registry()
        self.schema = envelope_schema(self.registry)
        self.json_lines = reads_json_lines(spec.source, tuple(spec.search_path))
        #: Registered types with a payload model: their payloads are typed fields.
        self.typed = [n for n, schema in self.registry.schemas.items() if schema.model is not None]
        self._plans: dict[tuple, _PayloadPlan] = {}
        self._version_plans: dict[bool, tuple[dict[str, pl.Expr], list]] = {}
        self._fused_plans: dict[tuple, _FusedPlan] = {}
        self.small = SmallBatchNormaliser(self)

    def __getstate__(self) -> dict:
        # Payload models built from YAML are dynamic classes: rebuild them from the spec.
        return {"spec": self.spec, "clock": self.clock, "upcasters": self.registry.upcasters}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["clock"])
        self.registry.upcasters.update(state["upcasters"])

    # -- decoding -------------------------------------------------------------------------

    def _json_columns(self) -> dict[str, str]:
        """Column name -> JSON path of every field the mapping reads from a JSON line."""
        m = self.spec.mapping
        refs = [m.event_id, m.event_type, m.source, m.correlation_id]
        paths = {r: f"$.{r}" for r in refs if isinstance(r, str)}
        paths[m.timestamp] = f"$.{m.timestamp}"
        if isinstance(m.payload, JsonRef):
            paths[m.payload.json_] = f"$.{m.payload.json_}"
        if m.metadata is not None:
            root = m.metadata.json_
            paths |= {"__meta_version": f"$.{root}.version", "__meta_region": f"$.{root}.region",
                      "__meta_tags": f"$.{root}",
                      # Matches only where the version is a JSON number: a path match gives a
                      # string's text without its quotes, so "1.5" and 1.5 read the same.
                      "__meta_version_number": f"$.{root}[?(@.version >= 0)].version"}
        return paths

    def _decode_lines(self, lines: pa.Array) -> pl.DataFrame:
        """JSON Lines to columns (JSON text), with decoding failures in ``__reason``."""
        frame = _line_frame(lines)
        for columns in self._decode_passes():
            frame = frame.with_columns(**columns)
        return frame

    def _decode_passes(self) -> list[dict[str, pl.Expr]]:
        """The decoding failure of each line (``__reason``, ``__message``), then the JSON
        text of each field the mapping reads from the lines that decoded."""
        line, limit = pl.col("__line"), self.spec.limits.max_payload_bytes
        reason, message = _reason([
            (pl.col("__bad_encoding"), "bad_encoding", pl.lit("line is not valid UTF-8")),
            # The source cuts an over-long line short: its length says "more than", no more.
            (line.str.len_bytes() > limit, "payload_too_large",
             pl.lit(f"line of more than {limit} bytes exceeds limits.max_payload_bytes")),
            (line.str.json_path_match("$").is_null(), "bad_json", pl.lit("line is not valid JSON")),
            (~line.str.strip_chars_start().str.starts_with("{"), "not_an_object",
             pl.lit("line is JSON but not an object")),
        ])
        ok = pl.col("__reason").is_null()
        return [{"__reason": reason, "__message": message},
                {name: pl.when(ok).then(line.str.json_path_match(path))
                 for name, path in self._json_columns().items()}]

    # -- envelope fields ------------------------------------------------------------------

    def _ref(self, ref: str | Constant | None, frame: pl.DataFrame) -> pl.Expr | None:
        if ref is None:
            return None
        if isinstance(ref, Constant):
            return pl.lit(ref.value, pl.String)
        if ref not in frame.columns:
            return pl.lit(None, pl.String)
        return pl.col(ref).cast(pl.String)

    def _payload_json(self, frame: pl.DataFrame, source_columns: list[str]) -> pl.Expr:
        payload = self.spec.mapping.payload
        if isinstance(payload, JsonRef):
            return pl.col(payload.json_) if payload.json_ in frame.columns else pl.lit(None, pl.String)
        names = source_columns if payload.columns == "all" else payload.columns
        names = [c for c in names if c in frame.columns and c not in payload.exclude]
        return pl.struct(names).struct.json_encode() if names else pl.lit("{}")

    def _field_source(self, name: str, frame: pl.DataFrame) -> tuple[pl.Expr, pl.DataType]:
        """Where a payload field comes from: a column, or a JSON path into the payload."""
        if isinstance(self.spec.mapping.payload, JsonRef):
            return pl.col("__payload").str.json_path_match(f"$.{name}"), pl.String
        if name in frame.columns:
            return pl.col(name), frame.schema[name]
        return pl.lit(None, pl.String), pl.String

    # -- the batch ------------------------------------------------------------------------

    def normalise(self, raw: RawBatch, duplicates: DuplicateFilter | None = None,
                  dedup_by_arrival: bool = False) -> Normalised:
        """Normalise one source batch (see the module docstring for the checks).

        Args:
            raw: the source batch.
            duplicates: the run's duplicate filter; valid events whose id it has seen
                become ``duplicate_event_id`` dead letters (and it learns the others).
            dedup_by_arrival: the filter keeps ids by when they arrived (this batch's
                ``ingested_at``), not by their event time: a source without a watermark,
                where a client's retry comes seconds later whatever the event's time.
        """
        ingested_at = self.clock()
        arrived = int(ingested_at.timestamp() * 1e6) if dedup_by_arrival else None
        if isinstance(self.spec.mapping.payload, JsonRef):
            # a few plainly valid events: no plan (declined, the plan decides)
            small = self.small.normalise(raw, duplicates, arrived, ingested_at)
            if small is not None:
                return Normalised(*small, raw.num_rows)
            out = self._normalise_fused(raw, duplicates, arrived, ingested_at)
            if out is not None:
                return out
        return self._normalise_stepwise(raw, duplicates, arrived, ingested_at)

    def _normalise_stepwise(self, raw: RawBatch, duplicates: DuplicateFilter | None,
                            arrived: int | None, ingested_at: dt.datetime) -> Normalised:
        """The batch pass by pass: any mapping, upcasts included."""
        records = raw.records
        source_columns = _source_columns(raw)
        if self.json_lines:
            frame = self._decode_lines(records.column("line"))
        else:
            frame = pl.from_arrow(records)
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_columns(**self._malformed_columns(frame))
        frame = frame.with_columns(__offset=pl.Series(raw.offsets, dtype=pl.Int64),
                                   __part=pl.lit(raw.part))
        frame = self._envelope_columns(frame, raw, source_columns)
        frame = self._check_event_time(frame, ingested_at)
        frame = self._typed_payload(frame, source_columns)
        if duplicates is not None:
            frame = self._mark_duplicates(frame, duplicates, arrived)
        events = self._events(frame.filter(pl.col("__reason").is_null()), ingested_at)
        dead = self._deadletters(frame.filter(pl.col("__reason").is_not_null()), raw,
                                 source_columns, ingested_at)
        return Normalised(events, dead, records.num_rows)

    @staticmethod
    def _malformed_columns(frame: pl.DataFrame) -> dict[str, pl.Expr]:
        """The reason and message of the rows a tabular source could not parse."""
        malformed = MALFORMED_REASON in frame.columns
        return {"__reason": pl.col(MALFORMED_REASON) if malformed else pl.lit(None, pl.String),
                "__message": pl.col(MALFORMED_MESSAGE) if malformed else pl.lit(None, pl.String)}

    # -- the batch in one plan ------------------------------------------------------------

    def _normalise_fused(self, raw: RawBatch, duplicates: DuplicateFilter | None,
                         arrived: int | None, ingested_at: dt.datetime) -> Normalised | None:
        """The batch as one lazy plan (one collect) where the payload is one JSON field: the
        stepwise path's passes and checks, its conditions read out as flat booleans and the
        first failing check of each row found in numpy. A pass has a fixed cost that a batch
        of one event pays in full, and a live source sends such batches. ``None`` when an
        event needs an upcast (which splits the batch by version): the stepwise path then."""
        frame = self._fused_input(raw)
        plan = self._fused_plan(frame, raw)
        lazy = frame.lazy()
        for columns in plan.passes:
            lazy = lazy.with_columns(**columns)
        frame = lazy.collect()
        failed = self._fused_failed(frame, plan, ingested_at)
        pending = frame.get_column("__reason").to_arrow().is_null().to_numpy(zero_copy_only=False)
        envelope_ok = pending & ~failed[:, :plan.later_at + 1].any(axis=1)
        if (envelope_ok & frame.get_column("__old").to_numpy()).any():
            return None
        valid = pending & ~failed.any(axis=1)
        if duplicates is not None and valid.any():
            times = np.full(frame.height, arrived, np.int64) if arrived is not None \
                else pc.fill_null(frame.get_column("__ts_us").to_arrow(), 0).to_numpy()
            failed[:, -1] = duplicates.mark(frame.get_column("__eid").to_arrow(), times, keep=valid)
            valid &= ~failed[:, -1]
        events = self._fused_events(frame, valid, ingested_at)
        if valid.all():
            return Normalised(events, DEADLETTER_SCHEMA.empty_table(), frame.height)
        checks = [*plan.checks[:plan.later_at], self._time_checks(ingested_at)[1],
                  *plan.checks[plan.later_at:], _DUPLICATE_CHECK]
        reason, message = self._failures(frame, failed, pending, checks)
        dead = frame.with_columns(__reason=reason, __message=message).filter(pl.Series(~valid))
        return Normalised(events, self._deadletters(dead, raw, _source_columns(raw), ingested_at),
                          frame.height)

    def _fused_failed(self, frame: pl.DataFrame, plan: _FusedPlan,
                      now: dt.datetime) -> np.ndarray:
        """Which check each row fails (a column per check, in order; the last one, the
        duplicates', is left to fill). The check against the clock's now is made here, in
        Arrow, so that the plan needs no expression built per batch."""
        failed = np.zeros((frame.height, len(plan.checks) + 2), bool)
        columns = [i for i in range(failed.shape[1] - 1) if i != plan.later_at]
        for i, column in enumerate(columns):
            failed[:, column] = frame.get_column(f"__check_{i}").to_numpy()
        latest = min(now + self.spec.source.max_future, MAX_TIME)
        later = pc.greater(frame.get_column("__ts_us").to_arrow(), epoch_micros(latest))
        failed[:, plan.later_at] = pc.fill_null(later, False).to_numpy(zero_copy_only=False)
        return failed

    def _fused_input(self, raw: RawBatch) -> pl.DataFrame:
        """The batch's records (a JSON line's text), offsets and derived ids: no pass yet."""
        if self.json_lines:
            frame = _line_frame(raw.records.column("line"))
        else:
            frame = pl.from_arrow(raw.records)
            assert isinstance(frame, pl.DataFrame)
        return frame.hstack([pl.Series("__offset", raw.offsets, dtype=pl.Int64), _derived_ids(raw)])

    def _fused_plan(self, frame: pl.DataFrame, raw: RawBatch) -> _FusedPlan:
        """The passes and checks of :meth:`_normalise_fused`, built once per column types
        and source name."""
        signature = (tuple(frame.schema.items()), raw.source, tuple(_source_columns(raw)))
        plan = self._fused_plans.get(signature)
        if plan is None:
            if len(self._fused_plans) >= _PLAN_CACHE_SIZE:
                self._fused_plans.clear()
            plan = self._fused_plans[signature] = self._build_fused_plan(frame.clear(), raw)
        return plan

    def _build_fused_plan(self, empty: pl.DataFrame, raw: RawBatch) -> _FusedPlan:
        """The stepwise path's passes, in its order, run on ``empty`` (no rows) only to know
        each pass's columns and their types."""
        passes = self._decode_passes() if self.json_lines else [self._malformed_columns(empty)]
        for columns in passes:
            empty = empty.with_columns(**columns)
        envelope = self._envelope_passes(empty, raw.source, _source_columns(raw))
        meta = "__meta_version" in empty.columns
        if not meta:
            envelope.append({"__meta_version": pl.lit(None, pl.String),
                             "__meta_version_number": pl.lit(None, pl.String)})
        for columns in envelope:
            empty = empty.with_columns(**columns)
        version, envelope_checks = self._version_plan(meta)
        payload = self._payload_plan(empty.with_columns(**version))
        static = [*envelope_checks, self._time_checks(MAX_TIME)[0],
                  *payload.checks, *payload.key_checks]
        tail = {"__old": (pl.col("__major") < pl.col("__current_version")).fill_null(False),
                "__ts_us": pl.col("__timestamp").dt.epoch("us"),
                "__eid": pl.col("__event_id").fill_null(""),
                "__out_data": self._data_expr()}
        tail |= {f"__check_{i}": cond.fill_null(False) for i, (cond, _, _) in enumerate(static)}
        return _FusedPlan(
            passes=[*passes, *envelope, version, _named(payload.sources),
                    *([_named(payload.parses)] if payload.parses else []), _named(payload.casts),
                    {"__key": payload.key}, tail],
            checks=static, later_at=len(envelope_checks) + 1)

    def _envelope_columns(self, frame: pl.DataFrame, raw: RawBatch,
                          source_columns: list[str]) -> pl.DataFrame:
        frame = frame.hstack([_derived_ids(raw)])
        for columns in self._envelope_passes(frame, raw.source, source_columns):
            frame = frame.with_columns(**columns)
        return self._version_column(frame)

    def _envelope_passes(self, frame: pl.DataFrame, source: str,
                         source_columns: list[str]) -> list[dict[str, pl.Expr]]:
        """The envelope's columns, pass by pass (a pass reads the columns of those before).
        ``frame`` is only looked at for its columns and their types."""
        m = self.spec.mapping
        ts_dtype = frame.schema.get(m.timestamp, pl.String)
        ts_raw = pl.col(m.timestamp) if m.timestamp in frame.columns else pl.lit(None, pl.String)
        derived = pl.col("__derived")
        given = self._ref(m.event_id, frame)
        passes = [{"__event_id": derived if given is None else pl.coalesce(given, derived)}, {
            "__event_type": self._ref(m.event_type, frame),
            "__ts_raw": ts_raw.cast(pl.String) if ts_dtype == pl.Null else ts_raw,
            "__timestamp": parse_timestamp(ts_raw, ts_dtype, m.timestamp_unit),
            "__source": pl.coalesce(self._ref(m.source, frame), pl.lit(source))
            if m.source else pl.lit(source),
        }]
        given = self._ref(m.correlation_id, frame)
        correlation = pl.lit(None, pl.String) if given is None else given
        passes.append({"__correlation_id": pl.coalesce(correlation, pl.col("__event_id"))})
        if isinstance(m.payload, JsonRef):
            passes.append({"__payload": self._payload_json(frame, source_columns)})
        return passes

    def _version_column(self, frame: pl.DataFrame) -> pl.DataFrame:
        meta = "__meta_version" in frame.columns
        if not meta:
            frame = frame.with_columns(__meta_version=pl.lit(None, pl.String),
                                       __meta_version_number=pl.lit(None, pl.String))
        columns, checks = self._version_plan(meta)
        return self._apply_checks(frame.with_columns(**columns), checks)

    def _version_plan(self, meta: bool) -> tuple[dict[str, pl.Expr], list]:
        if meta not in self._version_plans:  # built once: they depend on the spec alone
            self._version_plans[meta] = self._build_version_plan(meta)
        return self._version_plans[meta]

    def _build_version_plan(self, meta: bool) -> tuple[dict[str, pl.Expr], list]:
        """The version columns and the envelope's checks, with or without metadata."""
        et = pl.col("__event_type")
        current = self._per_type(lambda s: pl.lit(s.version, pl.Int32))
        region = self._per_type(lambda s: pl.lit(s.region, pl.String))
        if meta:
            region = pl.coalesce(pl.col("__meta_region"), region)
            tags = pl.col("__meta_tags")
        else:
            tags = pl.lit(None, pl.String)
        given, major, well_formed = producer_version(pl.col("__meta_version"),
                                                     pl.col("__meta_version_number"))
        columns = {"__version": pl.coalesce(given, current.cast(pl.String)),
                   "__major": pl.when(given.is_null()).then(current).otherwise(major),
                   "__version_ok": given.is_null() | well_formed,
                   "__region": region, "__tags": tags, "__current_version": current}
        ts, eid, v = pl.col("__timestamp"), pl.col("__event_id"), pl.col("__version")
        checks = [
            (et.is_null() | (et == ""), "missing_event_type", pl.lit("event type is missing")),
            (~et.str.contains(EVENT_TYPE_PATTERN) | (et.str.len_chars() > MAX_EVENT_TYPE_LENGTH)
             | et.is_in(_JSON_LITERALS),
             "bad_event_type", pl.format("event type {} is not a dotted lower-case name", et)),
            (pl.col("__ts_raw").is_null(), "missing_timestamp", pl.lit("timestamp is missing")),
            (ts.is_null(), "bad_timestamp",
             pl.format("cannot read timestamp {}", pl.col("__ts_raw").cast(pl.String))),
            (eid.is_null() | ~eid.str.len_chars().is_between(1, 128) | eid.is_in(_JSON_LITERALS)
             | (self._json_valued(self.spec.mapping.event_id) & eid.str.contains(r"^[\[{]")), "bad_event_id",
             pl.lit("event id must be a string or number of 1 to 128 characters")),
            (~pl.col("__version_ok"), "bad_version", pl.format(
                "metadata.version {} is not a version: give an integer >= 1 or a dotted string "
                "such as \"1.0\" (a JSON number with a fraction is ambiguous: 1.10 reads as 1.1)",
                v)),
            (pl.col("__major") > pl.col("__current_version"), "bad_version",
             pl.format("metadata.version {} is newer than {}'s current version {}", v, et,
                       pl.col("__current_version"))),
        ]
        return columns, checks

    def _check_event_time(self, frame: pl.DataFrame, now: dt.datetime) -> pl.DataFrame:
        return self._apply_checks(frame, self._time_checks(now))

    def _time_checks(self, now: dt.datetime) -> list[tuple[pl.Expr, str, pl.Expr]]:
        """Event times past the clock's now plus ``source.max_future``, or past what can be
        represented, are ``timestamp_out_of_range``: one such event would otherwise move
        event time (windows, label release, pacing) years ahead. The distant past is left to
        the lateness rules."""
        max_future = self.spec.source.max_future
        latest = min(now + max_future, MAX_TIME)
        ts = pl.col("__timestamp")
        shown = pl.col("__ts_raw").cast(pl.String)
        return [
            (outside_representable_range(ts), "timestamp_out_of_range",
             pl.format("timestamp {} is outside the representable range 1677..2262", shown)),
            (ts > pl.lit(latest), "timestamp_out_of_range",
             pl.format(f"timestamp {{}} is later than now ({now.isoformat()}) plus "
                       f"source.max_future ({max_future})", shown)),
        ]

    def _json_valued(self, ref: str | Constant | None) -> pl.Expr:
        """Whether a field was read out of a JSON line (where objects arrive as their text)."""
        return pl.lit(self.json_lines and isinstance(ref, str))

    def _apply_checks(self, frame: pl.DataFrame, checks: list) -> pl.DataFrame:
        """Give each row that has not failed yet the reason and message of its first failing
        check. The conditions are one pass of flat booleans, and messages are made only for
        the rows that failed, usually none: a when/then chain over every check and message
        costs a batch of one event as much as a batch of thousands."""
        if not checks:
            return frame
        names = [f"__check_{i}" for i in range(len(checks))]
        failed = frame.with_columns(cond.fill_null(False).alias(name) for name, (cond, _, _)
                                    in zip(names, checks, strict=True)).select(names).to_numpy()
        pending = frame.get_column("__reason").is_null().to_numpy()
        if not (failed.any(axis=1) & pending).any():
            return frame
        reason, message = self._failures(frame, failed, pending, checks)
        return frame.with_columns(__reason=reason, __message=message)

    @staticmethod
    def _failures(frame: pl.DataFrame, failed: np.ndarray, pending: np.ndarray,
                  checks: list) -> tuple[pl.Series, pl.Series]:
        """(reason, message) of every row: its first failing check's (``failed``: a column
        per check) where it had none yet (``pending``), else the one it had."""
        hit = failed.any(axis=1) & pending
        rows = np.flatnonzero(hit)
        first = failed[rows].argmax(axis=1)
        codes = pl.Series([code for _, code, _ in checks], dtype=pl.String)
        reason = frame.get_column("__reason").cast(pl.String).clone()
        reason.scatter(rows, codes.gather(first))
        message = frame.get_column("__message").cast(pl.String).clone()
        for check in np.unique(first):
            at = rows[first == check]
            text = frame[at].with_columns(__text=checks[check][2].cast(pl.String))
            message.scatter(at, text.get_column("__text"))
        return reason, message

    def _per_type(self, value: Callable) -> pl.Expr:
        """An expression giving, per row, ``value(schema of the row's event type)``."""
        et = pl.col("__event_type")
        expr = pl.when(pl.lit(False)).then(value(self.registry.default))
        for name, schema in self.registry.schemas.items():
            expr = expr.when(et == name).then(value(schema))
        return expr.otherwise(value(self.registry.default))

    # -- versions, payloads, keys ---------------------------------------------------------

    def _payload_frame_columns(self, frame: pl.DataFrame, source_columns: list[str]) -> list[str]:
        if isinstance(self.spec.mapping.payload, JsonRef):
            return ["__payload"]
        return [c for c in frame.columns if not c.startswith("__")] or source_columns

    def _upcast(self, frame: pl.DataFrame, source_columns: list[str]) -> pl.DataFrame:
        """Bring payloads of older versions up to date with the registered upcasters."""
        old = pl.col("__reason").is_null() & (pl.col("__major") < pl.col("__current_version"))
        if frame.select(old.any()).item() is not True:
            return frame
        frame = frame.with_row_index("__row")
        groups = frame.filter(old).select("__event_type", "__major").unique().rows()
        payload_cols = self._payload_frame_columns(frame, source_columns)
        parts = [frame.filter(~old)]
        for event_type, version in sorted(groups):
            rows = frame.filter(old & (pl.col("__event_type") == event_type)
                                & (pl.col("__major") == version))
            parts.append(self._upcast_group(rows, event_type, version, payload_cols))
        return pl.concat(parts, how="diagonal_relaxed").sort("__row").drop("__row")

    def _upcast_group(self, rows: pl.DataFrame, event_type: str, version: int,
                      payload_cols: list[str]) -> pl.DataFrame:
        """Upcast one type's events of one major ``version`` to the type's current one."""
        current = self.registry.schema_for(event_type).version
        payload = rows.select(payload_cols).rename({"__payload": JSON_FIELD}, strict=False)
        for step in range(version, current):
            upcaster = self.registry.upcasters.get((event_type, step))
            if upcaster is None:
                return rows.with_columns(__reason=pl.lit("bad_version"), __message=pl.lit(
                    f"no upcaster registered for {event_type} from version {step}"))
            try:
                payload = upcaster(payload)
                if payload.height != rows.height:
                    raise ValueError(f"returned {payload.height} rows for {rows.height}")
            except Exception as exc:  # a user's upcaster: its failure is the events' reason
                return rows.with_columns(__reason=pl.lit("upcast_failed"), __message=pl.lit(
                    f"upcaster {event_type} v{step}: {type(exc).__name__}: {exc}"))
        payload = payload.rename({JSON_FIELD: "__payload"}, strict=False)
        kept = rows.drop([c for c in payload.columns if c in rows.columns])
        # The payload now has the current schema, so it carries the current version; the
        # producer's version stays in the metadata tags.
        return pl.concat([kept, payload], how="horizontal").with_columns(
            __version=pl.col("__current_version").cast(pl.String),
            __major=pl.col("__current_version"))

    def _typed_payload(self, frame: pl.DataFrame, source_columns: list[str]) -> pl.DataFrame:
        frame = self._upcast(frame, source_columns)
        et = pl.col("__event_type")
        if not isinstance(self.spec.mapping.payload, JsonRef):
            # The payload's JSON text is kept (and checked) for untyped event types only:
            # a batch of typed events skips encoding it.
            typed = frame.select((et.is_in(self.typed) | et.is_null()).all()).item()
            frame = frame.with_columns(__payload=pl.lit(None, pl.String) if typed
                                       else self._payload_json(frame, source_columns))
        plan = self._payload_plan(frame)
        # every field's source, then every field's cast: two passes over the batch whatever
        # the number of fields (a pass has a fixed cost, which a one-event batch pays in full)
        frame = frame.with_columns(plan.sources)
        if plan.parses:
            frame = frame.with_columns(plan.parses)
        frame = frame.with_columns(plan.casts)
        frame = self._apply_checks(frame, plan.checks)
        return self._apply_checks(frame.with_columns(__key=plan.key), plan.key_checks)

    def _payload_plan(self, frame: pl.DataFrame) -> _PayloadPlan:
        """The expressions that type the payload fields and check them and the key. They
        depend on the spec and, for a tabular source, on the types of its columns: built
        once per column types, not per batch (building them costs a one-event batch more
        than running them)."""
        tabular = not isinstance(self.spec.mapping.payload, JsonRef)
        signature = tuple(frame.schema.items()) if tabular else ()
        plan = self._plans.get(signature)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:  # a source whose column types keep changing
                self._plans.clear()
            plan = self._plans[signature] = self._build_payload_plan(frame)
        return plan

    def _build_payload_plan(self, frame: pl.DataFrame) -> _PayloadPlan:
        et = pl.col("__event_type")
        checks: list[tuple[pl.Expr, str, pl.Expr]] = []
        sources: list[pl.Expr] = []
        parses: list[pl.Expr] = []
        casts: list[pl.Expr] = []
        for field in self.registry.data_type():
            if field.name == JSON_FIELD:
                continue
            having = [n for n in self.typed if field.name in self.registry.schemas[n].struct.names]
            required = [n for n in having if not self.registry.schemas[n].struct.field(
                field.name).nullable]
            source, dtype = self._field_source(field.name, frame)
            src, out = pl.col(f"__src_{field.name}"), pl.col(f"__field_{field.name}")
            sources.append(source.alias(src.meta.output_name()))
            if pa.types.is_timestamp(field.type):
                parsed = pl.col(f"__parsed_{field.name}")
                parses.append(parse_timestamp(src, dtype).alias(parsed.meta.output_name()))
                value = representable(parsed)
            else:
                value = cast_field(src, dtype, field.type)
            casts.append(pl.when(et.is_in(having)).then(value).alias(out.meta.output_name()))
            # Blank text is a missing value for anything but a string field.
            absent = src.is_null() | (is_blank(src, dtype) if not _is_text(field.type)
                                      else pl.lit(False))
            checks += [
                (et.is_in(required) & absent, "missing_field",
                 pl.lit(f"payload field {field.name} is missing")),
                (et.is_in(having) & ~absent & out.is_null(), "bad_field",
                 pl.format(f"payload field {field.name}: cannot read {{}} as {_kind(field.type)}",
                           src.cast(pl.String))),
            ]
        size = pl.col("__payload").str.len_bytes()
        checks.append((~et.is_in(self.typed) & (size > self.spec.limits.max_payload_bytes),
                       "payload_too_large",
                       pl.format("payload of {} bytes exceeds limits.max_payload_bytes", size)))
        key, correlation = pl.col("__key"), pl.col("__correlation_id")
        longest = self.spec.limits.max_key_length
        return _PayloadPlan(sources, parses, casts, checks, self._per_type(self._key_expr), [
            (key.is_null() | (key == ""), "missing_key", self._per_type(
                lambda s: pl.lit(f"partition key {s.key} is missing"))),
            (key.str.len_chars() > longest, "bad_field", self._per_type(
                lambda s: pl.format(f"partition key {s.key} of {{}} characters exceeds "
                                    "limits.max_key_length", key.str.len_chars()))),
            # A correlation id defaulted to the event id is bounded as the event id is.
            ((correlation.str.len_chars() > longest) & (correlation != pl.col("__event_id")),
             "bad_field",
             pl.format("correlation id of {} characters exceeds limits.max_key_length",
                       correlation.str.len_chars())),
        ])

    def _key_expr(self, schema) -> pl.Expr:
        if schema.key in ENVELOPE_KEY_FIELDS:
            return pl.col(f"__{schema.key}").cast(pl.String)
        if schema.model is not None and schema.key in schema.struct.names:
            return pl.col(f"__field_{schema.key}").cast(pl.String)
        return pl.col("__payload").str.json_path_match(f"$.{schema.key}")

    def _mark_duplicates(self, frame: pl.DataFrame, duplicates: DuplicateFilter,
                         arrived_us: int | None) -> pl.DataFrame:
        valid = frame["__reason"].is_null().to_numpy()
        times = np.full(frame.height, arrived_us, np.int64) if arrived_us is not None \
            else frame["__timestamp"].dt.epoch("us").fill_null(0).to_numpy()
        repeat = duplicates.mark(frame["__event_id"].fill_null("").to_arrow(), times, keep=valid)
        return self._apply_checks(frame.with_columns(__duplicate=repeat), [(
            pl.col("__duplicate"), "duplicate_event_id",
            pl.format("event id {} was already stored", pl.col("__event_id")))])

    # -- outputs --------------------------------------------------------------------------

    def _events(self, frame: pl.DataFrame, ingested_at: dt.datetime) -> pa.Table:
        out = frame.select(
            event_id=pl.col("__event_id"),
            event_type=pl.col("__event_type"),
            timestamp=pl.col("__timestamp"),
            source=pl.col("__source"),
            correlation_id=pl.col("__correlation_id"),
            key=pl.col("__key"),
            data=self._data_expr(),
            metadata=self._metadata_expr(ingested_at),
        )
        return out.to_arrow().cast(self.schema)

    def _fused_events(self, frame: pl.DataFrame, valid: np.ndarray,
                      ingested_at: dt.datetime) -> pa.Table:
        """:meth:`_events` of the fused plan's frame (whose ``__out_data`` is the envelope's
        ``data``), made in Arrow: the ``valid`` rows."""
        columns = {name: frame.get_column(column).to_arrow() for name, column in _OUT_COLUMNS}
        metadata = {name: frame.get_column(f"__{name}").to_arrow()
                    for name in ("version", "region", "tags")}
        metadata["ingested_at"] = pa.array(np.full(frame.height, epoch_micros(ingested_at)), TIMESTAMP)
        columns["metadata"] = pa.StructArray.from_arrays(
            [metadata[name] for name in ("version", "region", "ingested_at", "tags")],
            names=["version", "region", "ingested_at", "tags"])
        table = pa.table(columns)
        return conform(table if valid.all() else table.filter(pa.array(valid)), self.schema)

    def _data_expr(self) -> pl.Expr:
        data = [pl.col(f"__field_{f.name}").alias(f.name)
                for f in self.registry.data_type() if f.name != JSON_FIELD]
        data.append(pl.when(~pl.col("__event_type").is_in(self.typed)).then(pl.col("__payload"))
                    .alias(JSON_FIELD))
        return pl.struct(data)

    @staticmethod
    def _metadata_expr(ingested_at: dt.datetime) -> pl.Expr:
        return pl.struct(
            version=pl.col("__version"),
            region=pl.col("__region"),
            ingested_at=pl.lit(ingested_at).dt.cast_time_unit("us"),
            tags=pl.col("__tags"),
        )

    def _deadletters(self, frame: pl.DataFrame, raw: RawBatch, source_columns: list[str],
                     ingested_at: dt.datetime) -> pa.Table:
        if self.json_lines:
            positions = np.searchsorted(raw.offsets, frame["__offset"].to_numpy())
            lines = raw.records.column("line").take(pa.array(positions))
            # An over-long line is kept up to the limit: enough to see what it was.
            raw_bytes = pl.Series(pc.binary_slice(lines, 0, self.spec.limits.max_payload_bytes))
        else:
            row = pl.struct(source_columns).struct.json_encode().cast(pl.Binary)
            if MALFORMED_RAW in frame.columns:  # a row the source could not parse: its line
                row = pl.coalesce(pl.col(MALFORMED_RAW), row)
            raw_bytes = frame.select(row).to_series()
        out = frame.select(
            event_id=pl.col("__event_id"),
            event_type=pl.when(pl.col("__event_type").str.contains(EVENT_TYPE_PATTERN)
                               & (pl.col("__event_type").str.len_chars() <= MAX_EVENT_TYPE_LENGTH))
            .then(pl.col("__event_type")).otherwise(pl.lit(INVALID_EVENT_TYPE)),
            claimed_event_type=pl.col("__event_type"),
            source=pl.lit(raw.source),
            part=pl.lit(raw.part),
            offset=pl.col("__offset"),
            raw=raw_bytes,
            reason=pl.col("__reason"),
            message=pl.col("__message"),
            ingested_at=pl.lit(ingested_at).dt.cast_time_unit("us"),
        )
        return out.to_arrow().cast(DEADLETTER_SCHEMA)
