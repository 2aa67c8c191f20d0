"""What a projection is, as configuration: a declared fold of event types into a state table.

A projection keeps one row of state per partition key (the envelope's ``key``), folded
from the events of the types its fields name. Each field is one fold:

======== ================================================================ ==========
op        the field's value per key                                        type
======== ================================================================ ==========
count     how many events matched                                          Int64
sum       the sum of ``value`` over them (0 before any), exact to 6 places  Decimal
min/max   the least / greatest ``value``                                   Float64
last      ``value`` of the latest matching event (by event time, then      ``value``'s
          event id: a last-writer-wins register, so the arrival order
          of equal-time events does not matter); nulls are skipped
set       members (``value`` as text) added by the field's events and      List(String)
          removed by the events of ``remove``; a member is in the set when
          its latest add-or-remove event (same order as ``last``) is an add
          (removes are remembered ``remember_removes``, default 90 days)
======== ================================================================ ==========

``value`` and ``where`` are SQL expressions over the envelope's columns (``data.TX_AMOUNT``,
``correlation_id``, ``CASE WHEN event_type = 'card.blocked' THEN 'blocked' END``), compiled
by Polars from a checked subset (:func:`safe_value_sql`), as route filters are. ``default``
is a field's value for a key with no matching event yet.

The pipeline config declares projections under ``projections:``; each one (``online: true``,
the default) also runs in the stream as a step of kind ``projection`` in the keyed
partitions (:mod:`pipelines.projections`), and can be rebuilt offline from the store.

Example:
    >>> spec = ProjectionSpec.model_validate({"name": "spend", "fields": [
    ...     {"name": "total", "op": "sum", "event_types": ["tx.*"], "value": "data.amount"}]})
    >>> spec.event_types()
    ['tx.*']
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import sqlglot
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlglot import exp

from pipelines.timestamps import parse_duration

#: Names of projections and of their fields (columns of the state table).
PROJECTION_NAME = r"^[a-z][a-z0-9_]{0,62}$"
#: Expression nodes a ``value`` or ``where`` may use: column references (``key``,
#: ``data.amount``), literals, operators, ``CASE``, ``CAST`` and a few scalar functions.
_VALUE_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column, exp.Dot, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Paren,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.And, exp.Or, exp.Not, exp.Neg,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.In, exp.Is, exp.Like, exp.ILike,
    exp.Between, exp.Cast, exp.DataType, exp.Case, exp.If, exp.Lower, exp.Upper, exp.Length,
    exp.Abs, exp.Coalesce, exp.StartsWith, exp.EndsWith,
)


def safe_value_sql(text: str) -> str:
    """``text`` written back from its parsed tree, if every node is in the safe subset.

    Raises:
        ValueError: it does not parse, or it uses a function, a subquery or a table.

    Example:
        >>> safe_value_sql("case when event_type = 'card.blocked' then 'blocked' end")
        "CASE WHEN event_type = 'card.blocked' THEN 'blocked' END"
        >>> safe_value_sql("read_parquet('x')")
        Traceback (most recent call last):
        ...
        ValueError: READ_PARQUET('x') is not allowed in a projection expression
    """
    try:
        tree = sqlglot.parse_one(text, read="postgres")
    except sqlglot.errors.SqlglotError as exc:
        raise ValueError(f"not a SQL expression: {exc}") from None
    for node in tree.walk():
        if not isinstance(node, _VALUE_NODES) or (isinstance(node, exp.In) and node.args.get("query")):
            raise ValueError(f"{node.sql(dialect='postgres')} is not allowed in a projection expression")
    return tree.sql(dialect="postgres")


def _duration(value: Any, info: ValidationInfo) -> dt.timedelta:
    return parse_duration(value, info.field_name or "duration")


#: A duration (``30d``, ``12h``, seconds), dumped as seconds (as :mod:`pipelines.spec` does).
Duration = Annotated[dt.timedelta, BeforeValidator(_duration),
                     PlainSerializer(lambda v: v.total_seconds(), return_type=float, when_used="json")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventMatch(_Frozen):
    """Which events a fold takes (``event_types``, shell-style, and an optional ``where``)
    and what it takes from each (``value``)."""

    event_types: list[str] = Field(min_length=1)
    where: str | None = None
    value: str | None = None

    @field_validator("event_types")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not re.fullmatch(r"[a-z0-9_.*?-]+", pattern):
                raise ValueError(f"event type pattern {pattern!r}: lower-case names, '.', '*' and '?'")
        return value

    @field_validator("where", "value")
    @classmethod
    def _safe(cls, value: str | None) -> str | None:
        return None if value is None else safe_value_sql(value)


class FieldSpec(EventMatch):
    """One column of the state table and the fold that computes it (see the module)."""

    name: str = Field(pattern=PROJECTION_NAME)
    op: Literal["count", "sum", "min", "max", "last", "set"]
    remove: EventMatch | None = None
    default: str | float | int | bool | None = None
    #: A set remembers a removed member this long behind its key's latest event (event
    #: time), so an add arriving after a later remove of the same member stays removed.
    #: Online, derived events (alerts) are folded when they come back from routing, behind
    #: what the partitions have queued: on the 61-day demo run up to 38 days of event time
    #: after their parent. Longer than that lag, shorter than the history kept in memory.
    remember_removes: Duration = dt.timedelta(days=90)

    @model_validator(mode="after")
    def _value_where_needed(self) -> FieldSpec:
        if self.op != "count" and self.value is None:
            raise ValueError(f"field {self.name!r}: op {self.op!r} needs a value expression")
        if self.remove is not None and self.op != "set":
            raise ValueError(f"field {self.name!r}: only a set has remove events")
        if self.remove is not None and self.remove.value is None:
            raise ValueError(f"field {self.name!r}: remove needs a value expression")
        return self


class ProjectionSpec(_Frozen):
    """A projection: its name (also its state table's), fields, and snapshot interval.

    ``online``: also fold it in the stream (a step in the keyed partitions that writes the
    changed keys' states to the table ``name`` with every batch). ``snapshot_every``: an
    offline rebuild stores a snapshot every this many events (in event-time order).
    """

    name: str = Field(pattern=PROJECTION_NAME)
    fields: list[FieldSpec] = Field(min_length=1)
    online: bool = True
    snapshot_every: int = Field(default=100_000, ge=1)

    @field_validator("name")
    @classmethod
    def _not_a_store_table(cls, value: str) -> str:
        if value in ("events", "scores", "alerts", "actions", "deadletter"):
            raise ValueError(f"{value!r} is a table of the store; a projection writes its own")
        return value

    @field_validator("fields")
    @classmethod
    def _unique(cls, value: list[FieldSpec]) -> list[FieldSpec]:
        names = [f.name for f in value]
        reserved = {"key", "event_type", "timestamp", "event_id", "events"} & set(names)
        if len(set(names)) != len(names) or reserved:
            raise ValueError(f"field names must be unique and not {sorted(reserved)}: {names}")
        return value

    def event_types(self) -> list[str]:
        """Every event-type pattern some field folds (adds and removes), in order."""
        found: list[str] = []
        for field in self.fields:
            for pattern in [*field.event_types, *(field.remove.event_types if field.remove else [])]:
                if pattern not in found:
                    found.append(pattern)
        return found


#: The customer profile of the fraud flow: transactions, spend, last terminal, open alerts
#: and card status per customer. An alert (``fraud.suspected``, whose correlation id is its
#: transaction's event id) stays open until that transaction's label arrives
#: (``fraud.reported`` carries the same correlation id: the card network settled the case,
#: fraud or not) or an analyst closes it (an ``alert.closed`` event with that correlation
#: id). Status follows ``card.blocked`` / ``card.unblocked`` events.
CUSTOMER_PROFILE = ProjectionSpec(name="customer_profile", fields=[
    FieldSpec(name="transactions", op="count", event_types=["transaction.created"]),
    FieldSpec(name="total_spend", op="sum", event_types=["transaction.created"],
              value="data.TX_AMOUNT"),
    FieldSpec(name="last_terminal", op="last", event_types=["transaction.created"],
              value="data.TERMINAL_ID"),
    FieldSpec(name="open_alerts", op="set", event_types=["fraud.suspected"], value="correlation_id",
              remove=EventMatch(event_types=["fraud.reported", "alert.closed"], value="correlation_id")),
    FieldSpec(name="status", op="last", event_types=["card.blocked", "card.unblocked"],
              value="CASE WHEN event_type = 'card.blocked' THEN 'blocked' ELSE 'active' END",
              default="active"),
])
