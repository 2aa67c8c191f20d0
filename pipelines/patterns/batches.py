"""Patterns over batches: vectorised candidate selection, then the per-key matchers.

:class:`PatternSet` is the one engine the stream (:class:`pipelines.patterns.step.PatternStep`
in the keyed partitions) and ``eventray mine`` share. Per batch of envelope rows, each
key's rows in event-time order, and for each pattern:

1. with Polars, over the whole batch: the rows of the pattern's event types, their pattern
   key, their position in the key's stream, and every step's condition that needs only the
   current event;
2. only rows that passed one of those conditions (candidates) go, in order, to the
   pattern's matcher (:mod:`pipelines.patterns.engine`);
3. the batch's latest event time moves the patterns' clock: events reach a partition in
   event-time order behind the source's watermark, so no event older than that time
   follows, and absences and timeouts due before it fire.

:meth:`PatternSet.advance` moves the clock on a watermark the engine is told of, and
:meth:`PatternSet.finish` ends a bounded input: every pending absence and timeout fires.

Example:
    >>> from pipelines.patterns.spec import PatternSpec
    >>> spec = PatternSpec.model_validate({"name": "two", "steps": [
    ...     {"name": "a", "event_types": ["x"]}, {"name": "b", "event_types": ["x"]}],
    ...     "emit": "two.seen"})
    >>> patterns = PatternSet([spec])
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from pipelines.patterns.aggregates import VectorAggregate
from pipelines.patterns.engine import Candidate, Match, SequenceMatcher
from pipelines.patterns.expressions import Condition, parse_condition, payload_field
from pipelines.patterns.spec import PatternSpec
from pipelines.processing import PATTERN_COPY
from pipelines.routing import type_regex

__all__ = ["MATCHES_SCHEMA", "PatternSet", "matches_frame"]

_END = 2**62
_JSON = "__json"
#: The columns of ``matches.parquet`` (``eventray mine``) and of :func:`matches_frame`.
MATCHES_SCHEMA = {"pattern": pl.String, "key": pl.String, "event_ids": pl.List(pl.String),
                  "start": pl.Datetime("us", "UTC"), "end": pl.Datetime("us", "UTC")}


def _key_expr(key: str, typed: set[str]) -> pl.Expr:
    if key.startswith("data."):
        return payload_field(key[5:], typed).cast(pl.String)
    return pl.col(key).cast(pl.String)


def _typed_fields(frame: pl.DataFrame) -> set[str]:
    data = frame.schema.get("data")
    return {f.name for f in data.fields} - {"json"} if isinstance(data, pl.Struct) else set()


def _types_expr(types: Sequence[str]) -> pl.Expr:
    return pl.col("event_type").cast(pl.String).str.contains(type_regex(list(types)))


class _Prepared:
    """One pattern's vectorised plan: its slots' conditions and the fields its matcher needs."""

    def __init__(self, spec: PatternSpec, copied: bool = False) -> None:
        self.spec, self.copied = spec, copied
        self.types = _types_expr(spec.event_types)
        # per slot: its event types and its condition when it needs the current event only
        self.slots: list[tuple[pl.Expr, Condition | None]] = []
        self.fields: set[str] = set()
        self.needs_event = False
        if spec.aggregate is not None:
            aggregate = spec.aggregate
            where = parse_condition(aggregate.where) if aggregate.where else None
            self.slots.append((_types_expr(aggregate.event_types), where))
            self.matcher: SequenceMatcher | VectorAggregate = VectorAggregate(spec)
            return
        for step in spec.steps or []:
            condition = step.condition()
            if condition is not None and condition.steps:
                # a condition on earlier steps is judged in the NFA, on these fields
                self.needs_event = True
                self.fields |= set(condition.fields)
                for fields in condition.step_fields.values():
                    self.fields |= set(fields)
                condition = None
            self.slots.append((_types_expr(step.event_types), condition))
        self.matcher = SequenceMatcher(spec)

    def _slot_exprs(self, typed: set[str]) -> list[pl.Expr]:
        return [types if condition is None else types & condition.polars(typed)
                for types, condition in self.slots]

    def _value(self, typed: set[str]) -> pl.Expr | None:
        aggregate = self.spec.aggregate
        if aggregate is None or aggregate.field is None:
            return None
        return payload_field(aggregate.field, typed, numeric=aggregate.function == "sum")

    def candidates(self, frame: pl.DataFrame, positions: dict[str, int]) -> pl.DataFrame:
        """The batch's candidate rows of this pattern, with key, position, time and flags;
        ``positions`` (each key's next position) moves past every row of the pattern's types."""
        typed = _typed_fields(frame)
        key = pl.col("key") if self.copied else _key_expr(self.spec.key, typed)  # copies: keyed
        rows = frame.filter(self.types).with_columns(_pk=key) \
            .filter(pl.col("_pk").is_not_null())
        if rows.height == 0:
            return rows
        counts = rows.group_by("_pk", maintain_order=True).len()
        offsets = pl.DataFrame({"_pk": list(positions), "_offset": list(positions.values())},
                               schema={"_pk": pl.String, "_offset": pl.Int64})
        rows = rows.with_columns(_n=pl.int_range(pl.len()).over("_pk")).join(
            offsets, on="_pk", how="left", maintain_order="left")
        rows = rows.with_columns(
            _pos=pl.col("_n") + pl.col("_offset").fill_null(0),
            _time=pl.col("timestamp").dt.epoch("us"),
            **{f"_s{i}": slot for i, slot in enumerate(self._slot_exprs(typed))})
        value = self._value(typed)
        if value is not None:
            rows = rows.with_columns(_value=value)
        for key, count in counts.iter_rows():
            positions[key] = positions.get(key, 0) + count
        flags = [f"_s{i}" for i in range(len(self.slots))]
        return rows.filter(pl.any_horizontal(flags))

    def feed(self, rows: pl.DataFrame, out: list[Match]) -> None:
        """Hand the candidate rows to the matcher, in order."""
        if rows.height == 0:
            return
        if isinstance(self.matcher, VectorAggregate):
            out += self.matcher.feed(rows)
            return
        flags = [f"_s{i}" for i in range(len(self.slots))]
        columns: dict[str, Any] = {
            "k": rows["_pk"], "pos": rows["_pos"], "time": rows["_time"],
            "id": rows["event_id"].cast(pl.String), "cid": rows["correlation_id"].cast(pl.String),
            "flags": rows.select(pl.concat_list(flags)).to_series()}
        if "_value" in rows.columns:
            columns["value"] = rows["_value"]
        if self.needs_event:
            columns["event"] = rows.select(_event_struct(rows, self.fields)).to_series()
        plain = pl.DataFrame(columns)
        for row in plain.iter_rows(named=True):
            candidate = Candidate(row["pos"], row["time"], row["id"], row["cid"],
                                  tuple(row["flags"]), _normalised(row.get("event") or {}),
                                  row.get("value"))
            self.matcher.on_event(row["k"], candidate, out)


def _event_struct(rows: pl.DataFrame, fields: set[str]) -> pl.Expr:
    """The envelope fields and the payload fields a condition on earlier steps reads (an
    untyped payload's JSON text whole, in ``json``)."""
    typed = _typed_fields(rows)
    payload = [pl.col("data").struct.field(f).alias(f) for f in sorted(fields & typed)]
    data = rows.schema["data"]
    if fields - typed and isinstance(data, pl.Struct) and "json" in {f.name for f in data.fields}:
        payload.append(pl.col("data").struct.field("json").alias(_JSON))
    payload = payload or [pl.lit(None).alias(_JSON)]
    return pl.struct(pl.col("event_id"), pl.col("event_type"), pl.col("source"),
                     pl.col("correlation_id"), pl.col("key"), data=pl.struct(payload))


def _normalised(event: dict[str, Any]) -> dict[str, Any]:
    """An untyped payload's JSON parsed, every value plain JSON data (see :func:`_plain`)."""
    data = event.get("data")
    if not isinstance(data, dict):
        return event
    text = data.pop(_JSON, None)
    if text:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            data = {**parsed, **data}
    return {**event, "data": {k: _plain(v) for k, v in data.items()}}


def _plain(value: Any) -> Any:
    """A payload value as JSON data (what a checkpoint can hold), the same before and after
    a restore: datetimes as epoch microseconds, other non-JSON scalars as text."""
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1_000_000)
    return str(value)


def pattern_copies(specs: Sequence[PatternSpec], copied: Sequence[int],
                   *pieces: pa.Table) -> pa.Table:
    """The copies of the events in ``pieces`` that the ``copied`` patterns read: keyed by
    the pattern's key, with the pattern's index in :data:`~pipelines.processing.PATTERN_COPY`,
    in event-time order (each piece is; ties keep the pieces' order)."""
    frame = pl.from_arrow(pa.concat_tables(list(pieces)))
    assert isinstance(frame, pl.DataFrame)
    if frame.height == 0:
        return frame.to_arrow()
    typed = _typed_fields(frame)
    parts = []
    for index in copied:
        spec = specs[index]
        part = frame.filter(_types_expr(spec.event_types)).with_columns(
            key=_key_expr(spec.key, typed), **{PATTERN_COPY: pl.lit(index, pl.Int32)})
        parts.append(part.filter(pl.col("key").is_not_null()))
    copies = pl.concat(parts).with_row_index("_n").sort("timestamp", "_n").drop("_n")
    return copies.to_arrow()


class PatternSet:
    """Every pattern of a pipeline (or of a pattern file), over one partition's batches.

    Args:
        specs: the validated patterns.
    """

    def __init__(self, specs: Sequence[PatternSpec], copied: Sequence[int] = ()) -> None:
        self.plans = [_Prepared(s, i in copied) for i, s in enumerate(specs)]
        self.positions: list[dict[str, int]] = [{} for _ in self.plans]
        self.clocks: list[int | None] = [None for _ in self.plans]
        self.matches = 0

    def process(self, frame: pl.DataFrame) -> list[Match]:
        """Match a batch of envelope rows (each key's in event-time order)."""
        out: list[Match] = []
        if frame.height == 0:
            return out
        copies = frame[PATTERN_COPY] if PATTERN_COPY in frame.columns else None
        for index, (plan, positions) in enumerate(zip(self.plans, self.positions, strict=True)):
            mine = frame
            if copies is not None:  # a pattern reads its copies, or the events themselves
                mine = frame.filter(copies == index if plan.copied else copies.is_null())
            plan.feed(plan.candidates(mine, positions), out)
            # each pattern's own stream (its events, or its copies) is in event-time order
            latest = mine["timestamp"].dt.epoch("us").max() if mine.height else None
            if latest is not None:
                self._advance_plan(index, int(latest), out)  # type: ignore[arg-type]
        self.matches += sum(m.kind == "match" for m in out)
        return out

    def _advance_plan(self, index: int, now: int, out: list[Match]) -> None:
        clock = self.clocks[index]
        if clock is not None and now <= clock:
            return
        self.clocks[index] = now
        plan, positions = self.plans[index], self.positions[index]
        plan.matcher.advance(now, positions, out)
        held = plan.matcher.keys
        for key in [k for k in positions if k not in held]:
            del positions[key]  # a key with no partial match needs no position

    def advance(self, watermark_us: int) -> list[Match]:
        """Every event older than ``watermark_us`` has been seen: fire what is due before it."""
        out: list[Match] = []
        for index in range(len(self.plans)):
            self._advance_plan(index, watermark_us, out)
        self.matches += sum(m.kind == "match" for m in out)
        return out

    def finish(self) -> list[Match]:
        """The input has ended: the watermark passes every deadline."""
        return self.advance(_END)

    def stats(self) -> dict[str, int]:
        """``pattern_cap_hits``, ``pattern_max_partial`` (one key, one pattern) and
        ``pattern_active`` (partial matches held now)."""
        return {"pattern_cap_hits": sum(p.matcher.stats.cap_hits for p in self.plans),
                "pattern_max_partial": max((p.matcher.stats.max_partial for p in self.plans), default=0),
                "pattern_active": sum(p.matcher.active() for p in self.plans)}

    def snapshot(self) -> dict[str, Any]:
        return {"clocks": self.clocks, "positions": self.positions,
                "matchers": {p.spec.name: p.matcher.snapshot() for p in self.plans}}

    def restore(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.clocks = list(state.get("clocks", [None for _ in self.plans]))
        self.positions = [dict(p) for p in state.get("positions", [{} for _ in self.plans])]
        for plan in self.plans:
            plan.matcher.restore(state.get("matchers", {}).get(plan.spec.name))


def matches_frame(matches: Sequence[Match]) -> pl.DataFrame:
    """Matches (not timeouts) as rows of :data:`MATCHES_SCHEMA`."""
    found = [m for m in matches if m.kind == "match"]
    return pl.DataFrame({
        "pattern": [m.pattern for m in found], "key": [m.key for m in found],
        "event_ids": [list(m.event_ids) for m in found],
        "start": [m.start for m in found], "end": [m.end for m in found]},
        schema={**MATCHES_SCHEMA, "start": pl.Int64, "end": pl.Int64}).with_columns(
        pl.col("start", "end").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
