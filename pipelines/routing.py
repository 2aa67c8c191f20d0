"""Routing: which events are kept, in which priority lane, and which derive new events.

Routes are tried in order; the first whose event-type patterns and filter match takes an
event (a filter is a SQL expression that Polars compiles to an expression over the
envelope's columns). A filter is parsed first (sqlglot) and only a safe subset compiles:
column references (``key``, ``data.amount``), literals, comparison, boolean and arithmetic
operators, ``IN`` lists, ``IS [NOT] NULL``, ``LIKE``, ``BETWEEN``, ``CAST`` and the scalar
functions of :data:`FILTER_FUNCTIONS`. Anything else (``read_parquet``, ``read_csv``, any
table function, a subquery, an unknown function) is refused at start-up, and Polars
compiles the checked tree as sqlglot writes it back, never the raw text, so both parsers
agree on what runs. Routing is per batch: every route is one vectorised mask. Events a
route drops, or that no route takes when ``unrouted: drop``, are counted as filtered.

Priority lanes never reorder one key: when a key has a high-priority event in a batch,
its earlier events of that batch are promoted with it (the dispatcher does the same for
pieces still queued from earlier batches, see :mod:`pipelines.lanes`).

Derived events (``emit``) re-enter routing, one hop at a time, up to ``max_hops``; routes
whose emitted types can reach themselves are rejected at start-up unless ``max_hops``
bounds them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

from pipelines.envelope import envelope_schema
from pipelines.errors import ConfigError
from pipelines.event_ids import uuid5_strings
from pipelines.route_filters import compile_filter
from pipelines.spec import PipelineSpec, RouteSpec

#: Batches up to this many rows are routed by Arrow compute when every filter compiles to
#: it (its calls cost microseconds each, whatever the rows; Polars' query costs a
#: millisecond or more for a live batch, and is faster per row on large ones).
ARROW_ROUTING_ROWS = 4_096

#: Scalar functions a route filter may call (Polars SQL supports each of them).
FILTER_FUNCTIONS: tuple[type[exp.Expression], ...] = (
    exp.Lower, exp.Upper, exp.Length, exp.Abs, exp.Coalesce, exp.StartsWith, exp.EndsWith,
)
_FILTER_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column, exp.Dot, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Paren,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.And, exp.Or, exp.Not, exp.Neg,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.In, exp.Is, exp.Like, exp.ILike,
    exp.Between, exp.Cast, exp.DataType, *FILTER_FUNCTIONS,
)


def safe_filter_sql(text: str) -> str:
    """The filter ``text`` rewritten from its parsed tree, if every part of it is allowed.

    Raises:
        ValueError: it does not parse, or names the first part outside the safe subset.

    Example:
        >>> safe_filter_sql("lower(key) IN ('a', 'b') AND data.amount > 1")
        "LOWER(key) IN ('a', 'b') AND data.amount > 1"
        >>> safe_filter_sql("read_csv('/etc/passwd') IS NULL")
        Traceback (most recent call last):
        ...
        ValueError: function READ_CSV is not allowed in a filter: READ_CSV('/etc/passwd')
    """
    try:
        tree = sqlglot.parse_one(text, read="postgres")
    except sqlglot.errors.SqlglotError as exc:
        raise ValueError(f"not a SQL expression: {exc}") from None
    for node in tree.walk():
        if isinstance(node, _FILTER_NODES) and not (isinstance(node, exp.In) and node.args.get("query")):
            continue
        if isinstance(node, exp.Func):
            name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
            kind = f"function {name.upper()}"
        elif isinstance(node, exp.Subquery | exp.Select | exp.In):
            kind = "a subquery"
        else:
            kind = f"{node.key!r}"
        raise ValueError(f"{kind} is not allowed in a filter: {node.sql(dialect='postgres')}")
    return tree.sql(dialect="postgres")


@dataclass(frozen=True)
class Routed:
    """One batch after routing: the two lanes (source order kept), the count filtered out,
    and the derived events to route next."""

    high: pa.Table
    normal: pa.Table
    filtered: int
    derived: pa.Table


def type_regex(patterns: list[str]) -> str:
    """One regular expression (Rust syntax, for Polars) for shell-style type patterns."""
    def one(pattern: str) -> str:
        return re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")

    return "^(?:" + "|".join(one(p) for p in patterns) + ")$"


def _cycle(routes: list[RouteSpec]) -> list[str] | None:
    """A cycle of routes through emitted event types, if any (depth-first search)."""
    edges = {r.name: [t.name for t in routes
                      if r.emit and any(fnmatch.fnmatchcase(r.emit.event_type, p)
                                        for p in t.event_types)] for r in routes}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for nxt in edges[name]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [name, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[name] = 2
        return None

    for route in routes:
        if route.name not in state and (found := visit(route.name, [route.name])):
            return found
    return None


class Router:
    """Routes envelope batches by a pipeline's routing rules.

    Example:
        >>> spec = PipelineSpec.model_validate({"name": "r",
        ...     "source": {"format": "jsonl", "path": ["x"]},
        ...     "mapping": {"event_type": "t", "timestamp": "ts"},
        ...     "routing": {"routes": [{"name": "vip", "filter": "key = 'a'",
        ...                             "priority": "high"}]}})
        >>> Router(spec).routes[0].priority
        'high'
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec.routing
        self.routes = list(self.spec.routes)
        self.schema = envelope_schema(spec.registry())
        self._masks = [self._compile(i, route) for i, route in enumerate(self.routes)]
        self._dropped = [i for i, r in enumerate(self.routes) if r.drop] + (
            [-1] if self.spec.unrouted == "drop" else [])
        self._emitting = [(i, r) for i, r in enumerate(self.routes) if r.emit is not None]
        self._choice = self._route_choice()
        #: each route's mask in Arrow compute, when every route's filter compiles to it and
        #: no route emits (derived events are made from the Polars frame): a live batch
        #: then routes without a Polars query (see :mod:`pipelines.route_filters`)
        self._arrow_masks = self._arrow_compile()
        #: the columns the routes read: only these are handed to Polars (an envelope's
        #: payload and metadata structs cost most of a small batch's conversion)
        self._reads = sorted(set(self._choice.meta.root_names()) | {"event_type"})
        self._high = [i for i, r in enumerate(self.routes) if r.priority == "high"]
        if self.spec.max_hops is None and (cycle := _cycle(self.routes)):
            raise ConfigError(f"routing.routes: emitted events loop through routes "
                              f"{' -> '.join(cycle)}; set routing.max_hops to bound them")

    def _compile(self, index: int, route: RouteSpec) -> pl.Expr:
        mask = pl.col("event_type").str.contains(type_regex(route.event_types))
        if route.filter is None:
            return mask
        try:
            condition = pl.sql_expr(safe_filter_sql(route.filter))
            empty = pl.DataFrame(schema=pl.from_arrow(self.schema.empty_table()).schema)
            empty.filter(condition)  # type errors show now, not at the first batch
        except Exception as exc:  # polars raises several kinds for a bad expression
            raise ConfigError(f"routing.routes.{index}.filter (route {route.name!r}): "
                              f"{route.filter!r}: {exc}") from None
        return mask & condition.fill_null(False)

    def _arrow_compile(self) -> list[Callable[[pa.Table], np.ndarray]] | None:
        if self._emitting:
            return None
        masks = []
        for route in self.routes:
            types = type_regex(route.event_types)
            condition = None if route.filter is None else compile_filter(
                sqlglot.parse_one(safe_filter_sql(route.filter), read="postgres"), self.schema)
            if route.filter is not None and condition is None:
                return None
            masks.append(_arrow_mask(types, condition))
        return masks

    def route(self, events: pa.Table) -> Routed:
        """Route one envelope batch: each row's route is one evaluation over the columns
        the routes read (Arrow compute, or a Polars query); the lanes are found in numpy
        and taken from the batch in Arrow."""
        frame = None
        if self._arrow_masks is not None and events.num_rows <= ARROW_ROUTING_ROWS:
            route = np.full(events.num_rows, -1, np.int64)
            for index in reversed(range(len(self.routes))):  # the first route that takes it
                route = np.where(self._arrow_masks[index](events), index, route)
        else:
            frame = pl.from_arrow(events if self._emitting else events.select(self._reads))
            assert isinstance(frame, pl.DataFrame)
            # with_columns, not select: a constant choice (no routes) is one per row, not
            # one; eager: a lazy query's plan costs more than a live batch's evaluation
            route = frame.with_columns(__route=self._choice).get_column("__route").to_numpy()
        kept = ~np.isin(route, self._dropped)
        high = _promoted(events.column("key"), np.isin(route, self._high) & kept) & kept
        derived = self._derive(frame, route, kept) if frame is not None and self._emitting \
            else self.schema.empty_table()
        return Routed(
            high=_rows(events, high),
            normal=_rows(events, kept & ~high),
            filtered=int(events.num_rows - kept.sum()),
            derived=derived,
        )

    def _route_choice(self) -> pl.Expr:
        """Each row's route: the first whose mask holds, else -1."""
        choice = pl.lit(-1)
        for index in reversed(range(len(self.routes))):
            choice = pl.when(self._masks[index]).then(pl.lit(index)).otherwise(choice)
        return choice

    def _derive(self, frame: pl.DataFrame, route: np.ndarray, kept: np.ndarray) -> pa.Table:
        parts = []
        for index, emitting in self._emitting:
            at = np.flatnonzero(kept & (route == index))
            if len(at) == 0:
                continue
            assert emitting.emit is not None
            rows = frame[at].with_columns(__row=pl.Series(at, dtype=pl.UInt32))
            ids = uuid5_strings((rows["event_id"] + f"/{emitting.name}").to_arrow())
            parts.append(rows.with_columns(
                event_id=pl.Series(ids), event_type=pl.lit(emitting.emit.event_type),
                source=pl.lit(f"route:{emitting.name}")))
        if not parts:
            return self.schema.empty_table()
        columns = self.schema.names
        return _table(pl.concat(parts).sort("__row").select(columns), self.schema)


def _arrow_mask(types: str, condition: Callable[[pa.Table], pa.Array] | None
                ) -> Callable[[pa.Table], np.ndarray]:
    """A route's mask in Arrow compute: its event types, and its filter (null: no match)."""
    def mask(events: pa.Table) -> np.ndarray:
        typed = pc.fill_null(pc.match_substring_regex(events.column("event_type"), types), False)
        if condition is not None:
            typed = pc.and_(typed, condition(events))
        return np.asarray(typed.to_numpy(zero_copy_only=False), bool)
    return mask


def _promoted(keys: pa.ChunkedArray, high: np.ndarray) -> np.ndarray:
    """Rows in the high lane: the ``high`` ones and every earlier row of their keys (up to
    each key's last high row), so that a lane never reorders a key."""
    if not high.any():
        return high
    group = pc.dictionary_encode(keys.combine_chunks(), null_encoding="encode").indices
    group = group.to_numpy(zero_copy_only=False).astype(np.int64)
    last = np.full(group.max() + 1, -1, np.int64)
    np.maximum.at(last, group[high], np.flatnonzero(high))
    return np.arange(len(high)) <= last[group]


def _rows(events: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows of ``events`` under ``mask``, in order (the batch itself when all are)."""
    return events if mask.all() else events.filter(pa.array(mask))


def _table(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.to_arrow().cast(schema)
