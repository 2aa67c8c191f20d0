"""The fold of a projection, vectorised: a batch of events onto per-key state, in Polars.

The state is one Polars frame with a row per key: the fields of the projection, and the
bookkeeping that makes folding a batch at a time give the same result as folding events
one by one in event order:

- ``_n``: events folded for the key; ``_ts`` / ``_id``: the latest of them, by
  (event time, event id), the projection's order of events;
- ``_<field>_ts`` / ``_<field>_id``: for a ``last`` field, the position of the event its
  value came from, so a value is replaced only by a later event's (last writer wins);
- ``_<field>_ops``: for a ``set``, each member's latest add or remove and its position
  (removes forgotten ``remember_removes`` behind the key's latest event), so an add that
  arrives after a later remove does not bring the member back.

Folding a batch is a group-by per key over the batch's events (sorted by key, time and id,
so ``last()`` is the latest), then a join with the prior state of the batch's keys: counts
and sums add, minima and maxima take the extreme, ``last`` keeps the later position; a
set's members are decided per (key, member) by their latest add or remove, the prior
operations standing where the batch says nothing. Every op is then independent of the
order in which a key's events arrive (within ``remember_removes`` for sets): derived
events, folded a batch after their parents online, give the state of event order. No
per-event Python loop runs.

Example:
    >>> import datetime as dt
    >>> from pipelines.projection_spec import ProjectionSpec
    >>> spec = ProjectionSpec.model_validate({"name": "p", "fields": [
    ...     {"name": "n", "op": "count", "event_types": ["a"]},
    ...     {"name": "total", "op": "sum", "event_types": ["a"], "value": "amount"}]})
    >>> events = pl.DataFrame({"key": ["k", "k"], "event_type": ["a", "a"], "event_id": ["1", "2"],
    ...     "timestamp": [dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * 2, "amount": [1.5, 2.0]})
    >>> fold = ProjectionFold(spec, events.schema)
    >>> state, changed = fold.fold(fold.empty(), events)
    >>> fold.view(state).select("key", "n", "total").rows()
    [('k', 2, Decimal('3.500000'))]
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from pipelines.errors import ConfigError
from pipelines.projection_spec import EventMatch, FieldSpec, ProjectionSpec
from pipelines.routing import type_regex

#: The envelope columns that order events and name keys.
ORDER = ("timestamp", "event_id")
_TIME = pl.Datetime("us", "UTC")
#: A sum is a decimal with 6 places: exact, so the grouping of additions (batches online,
#: slices and snapshots offline) never changes it, as it would a float's last digits.
SUM_TYPE = pl.Decimal(38, 6)
#: A set field's remembered operations: each member's latest add (present) or remove.
_SET_OPS = pl.List(pl.Struct({"member": pl.String(), "timestamp": _TIME, "event_id": pl.String(),
                              "add": pl.Boolean()}))


def _later(ts: str, eid: str, than_ts: str, than_id: str) -> pl.Expr:
    """Whether position (``ts``, ``eid``) is after (``than_ts``, ``than_id``); a missing
    position is before any other."""
    after = (pl.col(ts) > pl.col(than_ts)) | (
        (pl.col(ts) == pl.col(than_ts)) & (pl.col(eid) > pl.col(than_id)))
    return pl.col(ts).is_not_null() & (pl.col(than_ts).is_null() | after.fill_null(False))


class ProjectionFold:
    """A projection's fold compiled for one schema of events (the envelope's, or a table's).

    Args:
        spec: the projection.
        schema: the columns of the events it will fold (at least ``key``, ``event_type``,
            ``timestamp``, ``event_id`` and what the expressions read).

    Raises:
        ConfigError: an expression does not compile against ``schema``, naming the field.
    """

    def __init__(self, spec: ProjectionSpec, schema: Mapping[str, pl.DataType]) -> None:
        self.spec = spec
        self.types = type_regex(spec.event_types())
        empty = pl.DataFrame(schema=dict(schema))
        self.masks: dict[str, pl.Expr] = {}
        self.values: dict[str, pl.Expr] = {}
        self.dtypes: dict[str, pl.DataType] = {}
        for field in spec.fields:
            self.masks[field.name] = self._mask(field, empty, field.name)
            if field.value is not None:
                self.values[field.name] = self._value(field, empty, field.name)
            if field.remove is not None:
                self.masks[f"{field.name}.remove"] = self._mask(field.remove, empty, field.name)
                self.values[f"{field.name}.remove"] = self._value(field.remove, empty, field.name)
            self.dtypes[field.name] = self._dtype(field, empty)

    def _mask(self, match: EventMatch, empty: pl.DataFrame, name: str) -> pl.Expr:
        mask = pl.col("event_type").str.contains(type_regex(match.event_types))
        if match.where is not None:
            mask = mask & self._compiled(match.where, empty, name).fill_null(False)
        return mask

    def _value(self, match: EventMatch, empty: pl.DataFrame, name: str) -> pl.Expr:
        assert match.value is not None
        return self._compiled(match.value, empty, name)

    def _compiled(self, sql: str, empty: pl.DataFrame, name: str) -> pl.Expr:
        try:
            expr = pl.sql_expr(sql)
            empty.select(expr)  # a bad column or type shows now, not at the first batch
        except Exception as exc:  # polars raises several kinds for a bad expression
            raise ConfigError(f"projections.{self.spec.name}.fields.{name}: {sql!r}: {exc}") from None
        return expr

    def _dtype(self, field: FieldSpec, empty: pl.DataFrame) -> pl.DataType:
        if field.op == "count":
            return pl.Int64()
        if field.op == "set":
            return pl.List(pl.String())
        if field.op == "sum":
            return SUM_TYPE
        if field.op in ("min", "max"):
            return pl.Float64()
        return empty.select(self.values[field.name]).to_series().dtype

    def empty(self) -> pl.DataFrame:
        """The state of no keys."""
        schema: dict[str, pl.DataType] = {"key": pl.String(), "_n": pl.Int64(), "_ts": _TIME,
                                          "_id": pl.String()}
        for field in self.spec.fields:
            schema[field.name] = self.dtypes[field.name]
            if field.op == "last":
                schema[f"_{field.name}_ts"], schema[f"_{field.name}_id"] = _TIME, pl.String()
            if field.op == "set":
                schema[f"_{field.name}_ops"] = _SET_OPS
        return pl.DataFrame(schema=schema)

    def fold(self, state: pl.DataFrame, events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Fold ``events`` (any order) onto ``state``.

        Returns:
            the new state (sorted by key) and the rows of the keys the events changed.
        """
        mine = events.filter(pl.col("event_type").str.contains(self.types))
        if mine.height == 0:
            return state, state.clear()
        mine = mine.with_columns(key=pl.col("key").cast(pl.String)).sort("key", *ORDER)
        batch = mine.group_by("key", maintain_order=True).agg(self._aggregates())
        prior = state.join(batch.select("key"), on="key", how="semi")
        merged = batch.join(prior, on="key", how="left", suffix="_p").select(self._merged())
        for field in self.spec.fields:
            if field.op == "set":
                sets = self._members(field, mine, prior, merged.select("key", "_ts"))
                merged = merged.drop(field.name, f"_{field.name}_ops").join(sets, on="key", how="left")
        merged = merged.select(self.empty().columns).cast(dict(self.empty().schema))
        rest = state.join(batch.select("key"), on="key", how="anti")
        return pl.concat([rest, merged]).sort("key"), merged.sort("key")

    def _aggregates(self) -> list[pl.Expr]:
        aggs = [pl.len().cast(pl.Int64).alias("_n"), pl.col("timestamp").last().alias("_ts"),
                pl.col("event_id").last().alias("_id")]
        for field in self.spec.fields:
            mask, name = self.masks[field.name], field.name
            if field.op == "count":
                aggs.append(mask.sum().cast(pl.Int64).alias(name))
            elif field.op == "set":
                aggs += [pl.lit(None, pl.List(pl.String())).alias(name),
                         pl.lit(None, _SET_OPS).alias(f"_{name}_ops")]
            elif field.op == "last":
                taken = mask & self.values[name].is_not_null()
                aggs += [self.values[name].filter(taken).last().alias(name),
                         pl.col("timestamp").filter(taken).last().alias(f"_{name}_ts"),
                         pl.col("event_id").filter(taken).last().alias(f"_{name}_id")]
            else:
                value = self.values[name].cast(SUM_TYPE if field.op == "sum" else pl.Float64)
                value = value.filter(mask)
                aggs.append(getattr(value, field.op)().alias(name))
        return aggs

    def _merged(self) -> list[pl.Expr]:
        """The batch's aggregates combined with the prior state (columns ``*_p``)."""
        newer = _later("_ts", "_id", "_ts_p", "_id_p")
        out = [pl.col("key"), (pl.col("_n") + pl.col("_n_p").fill_null(0)).alias("_n"),
               pl.when(newer).then("_ts").otherwise("_ts_p").alias("_ts"),
               pl.when(newer).then("_id").otherwise("_id_p").alias("_id")]
        for field in self.spec.fields:
            name = field.name
            if field.op in ("count", "sum"):
                out.append((pl.col(name).fill_null(0) + pl.col(f"{name}_p").fill_null(0)).alias(name))
            elif field.op == "min":
                out.append(pl.min_horizontal(name, f"{name}_p").alias(name))
            elif field.op == "max":
                out.append(pl.max_horizontal(name, f"{name}_p").alias(name))
            elif field.op == "last":
                ts, eid = f"_{name}_ts", f"_{name}_id"
                wins = _later(ts, eid, f"{ts}_p", f"{eid}_p")
                out += [pl.when(wins).then(c).otherwise(f"{c}_p").alias(c) for c in (name, ts, eid)]
            else:
                out += [pl.col(name), pl.col(f"_{name}_ops")]
        return out

    def _members(self, field: FieldSpec, mine: pl.DataFrame, prior: pl.DataFrame,
                 latest: pl.DataFrame) -> pl.DataFrame:
        """A set field's members and remembered operations per key of the batch.

        Each member's latest add or remove (by position; a remove and an add of one event:
        the remove) decides. Removes are remembered ``remember_removes`` behind the key's
        latest event, so an add that arrives after a later remove (an alert derived from a
        transaction whose label came in the same batch) stays removed, as in event order.
        """
        name = field.name
        ops_column = f"_{name}_ops"
        ops = [mine.filter(self.masks[name]).select(
            "key", "timestamp", "event_id", member=self.values[name].cast(pl.String), add=pl.lit(True))]
        if field.remove is not None:
            ops.append(mine.filter(self.masks[f"{name}.remove"]).select(
                "key", "timestamp", "event_id", member=self.values[f"{name}.remove"].cast(pl.String),
                add=pl.lit(False)))
        before = prior.select("key", pl.col(ops_column).alias("op")).explode("op").drop_nulls().unnest("op")
        new = pl.concat([o.drop_nulls("member") for o in ops], how="diagonal_relaxed")
        touched = new.select("key", "member").unique()
        # Only the members this batch touches are decided again (a sort of the batch's
        # operations, not of everything the keys remember).
        pair = ["key", "member"]
        decided = (pl.concat([before.join(touched, on=pair, how="semi", maintain_order="left"), new],
                             how="diagonal_relaxed")
                   .sort("timestamp", "event_id", pl.col("add").not_())
                   .group_by("key", "member").agg(pl.all().last()).sort("key", "member"))
        horizon = pl.col("_ts") - field.remember_removes
        kept = (pl.concat([before.join(touched, on=pair, how="anti", maintain_order="left"), decided],
                          how="diagonal_relaxed")
                .join(latest, on="key", maintain_order="left")
                .filter(pl.col("add") | (pl.col("timestamp") >= horizon)))
        per_key = kept.group_by("key", maintain_order=True).agg(
            pl.col("member").filter(pl.col("add")).sort().alias(name),
            pl.struct("member", "timestamp", "event_id", "add").alias(ops_column))
        empty = self.empty().schema
        return latest.select("key").join(per_key, on="key", how="left").with_columns(
            pl.col(name).fill_null(pl.lit([], empty[name])),
            pl.col(ops_column).fill_null(pl.lit([], empty[ops_column])))

    def view(self, state: pl.DataFrame) -> pl.DataFrame:
        """The state as readers see it: ``key``, the fields (defaults filled in), ``events``
        (how many were folded), and the latest event's ``timestamp`` and ``event_id``."""
        fields = []
        for field in self.spec.fields:
            column = pl.col(field.name)
            if field.default is not None:
                column = column.fill_null(pl.lit(field.default).cast(self.dtypes[field.name]))
            fields.append(column)
        return state.select("key", *fields, events="_n", timestamp="_ts", event_id="_id")
