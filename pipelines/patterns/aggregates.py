"""Edge-triggered window aggregates, vectorised over a batch with Polars.

At each of a key's events (in the key's order) the aggregate of the key's window ``(t -
over, t]`` of events up to and including this one is computed; a match fires where it is
at or above ``at_least`` and was below at the key's previous event (or there was none).
Per batch, the rows a key still needs from earlier batches (those inside the window of its
latest event) are put before the batch's, each row's window is gathered as lists by
shifting within its key (as many shifts as the largest window holds rows), and the
aggregates and the edge are list and window expressions: no per-event Python.

Example:
    >>> from pipelines.patterns.spec import PatternSpec
    >>> spec = PatternSpec.model_validate({"name": "hop", "emit": "hop.found", "aggregate": {
    ...     "event_types": ["tx"], "distinct": "data.terminal", "over": "1h", "at_least": 2}})
    >>> VectorAggregate(spec).active()
    0
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl

from pipelines.patterns.engine import Match, Stats
from pipelines.patterns.spec import PatternSpec

__all__ = ["VectorAggregate"]

_WINDOW = {"k": pl.String, "time": pl.Int64, "id": pl.String, "value": pl.String,
           "cid": pl.String}


class VectorAggregate:
    """One aggregate pattern over every key; its state is each key's rows still in a window,
    and the keys whose last event was at or above the threshold."""

    def __init__(self, spec: PatternSpec) -> None:
        assert spec.aggregate is not None
        self.spec, self.name, self.aggregate = spec, spec.name, spec.aggregate
        self.over = self.aggregate.over // dt.timedelta(microseconds=1)
        self.window = pl.DataFrame(schema=_WINDOW)
        self.above: set[str] = set()
        self.keys = self.above  # keys holding state besides their window rows
        self.stats = Stats()

    def feed(self, rows: pl.DataFrame) -> list[Match]:
        """The matches among ``rows`` (columns ``_pk``, ``_time``, ``event_id``,
        ``correlation_id`` and ``_value`` when the aggregate reads a field), in order."""
        value = pl.col("_value").cast(pl.String) if "_value" in rows.columns else pl.lit(None, pl.String)
        new = rows.select(k="_pk", time="_time", id=pl.col("event_id").cast(pl.String), value=value,
                          cid=pl.col("correlation_id").cast(pl.String))
        frame = pl.concat([self.window.with_columns(new=pl.lit(False)),
                           new.with_columns(new=pl.lit(True))])
        frame = frame.with_row_index("_i").sort(["k", "_i"])
        frame = self._windows(frame)
        measure = self._measure()
        frame = frame.with_columns(_above=measure >= self.aggregate.at_least)
        # a key's first new row follows its last event of earlier batches, whose state is
        # ``above`` (the kept rows of that event's window may have been cut since)
        same_key = (pl.col("k").shift(1) == pl.col("k")).fill_null(False)
        first = ~(same_key & pl.col("new").shift(1).fill_null(False))
        previous = pl.when(first).then(pl.col("k").is_in(list(self.above)))\
            .otherwise(pl.col("_above").shift(1))
        frame = frame.with_columns(_fire=pl.col("_above") & ~previous & pl.col("new"))
        self._keep(frame)
        self.stats.max_partial = max(self.stats.max_partial, int(frame["_held"].max() or 0) + 1)
        return self._matches(frame)

    def _matches(self, frame: pl.DataFrame) -> list[Match]:
        """A match per fired row: its window is the ``_held`` rows above it (sorted frame)."""
        fired = frame.with_row_index("_r").filter("_fire").sort("_i")
        if fired.height == 0:
            return []
        ids, times, cids = (frame[c].to_list() for c in ("id", "time", "cid"))
        return [Match(self.name, "match", k, tuple(ids[r - held:r + 1]), times[r - held], t, t,
                      cids[r - held])
                for k, r, held, t in fired.select("k", "_r", "_held", "time").iter_rows()]

    def _windows(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Each row's window: ``_held``, the rows before it in its window (they are the
        rows right above it), and ``_values``, the window's values as a list (oldest first)."""
        # the frame is sorted by key: a row ``lag`` rows up is the key's when its key is the same
        inside: list[pl.Series] = []
        lag = 1
        while True:
            column = frame.select(((pl.col("k").shift(lag) == pl.col("k"))
                                   & (pl.col("time").shift(lag) > pl.col("time") - self.over))
                                  .fill_null(False)).to_series()
            if not column.any():
                break
            inside.append(column.alias(f"_in{lag}"))
            lag += 1
        frame = frame.with_columns(inside)

        def gather(column: str) -> pl.Expr:
            parts = [pl.when(pl.col(f"_in{n}")).then(pl.col(column).shift(n))
                     for n in range(len(inside), 0, -1)]
            listed = pl.concat_list([*parts, pl.col(column)])
            # rows outside the window are a leading run of nulls: cut them by count, since
            # a value inside may be null too
            return listed.list.slice(pl.lit(len(inside)) - held)

        held = pl.sum_horizontal([pl.col(f"_in{n}").cast(pl.Int64) for n in range(1, len(inside) + 1)]) \
            if inside else pl.lit(0)

        frame = frame.with_columns(_held=held)
        if self.aggregate.function == "count":
            return frame
        return frame.with_columns(_values=gather("value"))

    def _measure(self) -> pl.Expr:
        function = self.aggregate.function
        if function == "count":
            return pl.col("_held") + 1
        values = pl.col("_values").list.drop_nulls()
        if function == "sum":
            return values.list.eval(pl.element().cast(pl.Float64)).list.sum()
        return values.list.n_unique()

    def _keep(self, frame: pl.DataFrame) -> None:
        """The rows each key's next events may still need, and the keys now above."""
        last = frame.group_by("k", maintain_order=True).agg(
            pl.col("time").last().alias("_last"), pl.col("_above").last().alias("_up"),
            pl.col("new").last().alias("_seen"))
        seen = last.filter("_seen")  # keys without new rows keep their state as it was
        self.above |= set(seen.filter("_up")["k"].to_list())
        self.above -= set(seen.filter(~pl.col("_up"))["k"].to_list())
        kept = frame.join(last, on="k").filter(pl.col("time") > pl.col("_last") - self.over)
        self.window = kept.sort("_i").select(list(_WINDOW))

    def advance(self, now: int, positions: dict[str, int], out: list[Match]) -> None:
        """Forget rows no later event's window can hold."""
        self.window = self.window.filter(pl.col("time") > now - 1 - self.over)

    def active(self) -> int:
        return self.window.height

    def snapshot(self) -> dict[str, Any]:
        return {"window": self.window.to_dict(as_series=False), "above": sorted(self.above),
                "stats": [self.stats.cap_hits, self.stats.max_partial]}

    def restore(self, state: dict[str, Any] | None) -> None:
        self.window, self.above, self.stats = pl.DataFrame(schema=_WINDOW), set(), Stats()
        self.keys = self.above
        if state:
            self.window = pl.DataFrame(state["window"], schema=_WINDOW)
            self.above = set(state["above"])
            self.keys = self.above
            self.stats = Stats(*state["stats"])
