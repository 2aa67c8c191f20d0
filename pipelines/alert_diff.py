"""The difference in alerts between two stores (a run and its replay, two models).

An alert is identified by the event that raised it and the step that raised it; it is
*added* when only the second store has it, *removed* when only the first has it, and
*changed* when both have it with another score or threshold.

Example:
    >>> diff = compare_alerts(EventStore("store/v1"), EventStore("store/v2"))  # doctest: +SKIP
    >>> diff.counts()  # doctest: +SKIP
    {'alerts_a': 2658, 'alerts_b': 2710, 'added': 90, 'removed': 38, 'changed': 2620, 'same': 0}
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipelines.store import EventStore

IDENTITY = ("event_id", "step")
_COLUMNS = ("event_id", "step", "timestamp", "key", "score", "threshold")


def alerts_of(store: EventStore) -> pl.DataFrame:
    """A store's alerts (empty when it has none), one row per (event, step)."""
    if not store.files("alerts"):
        return pl.DataFrame(schema={"event_id": pl.String, "step": pl.String,
                                    "timestamp": pl.Datetime("us", "UTC"), "key": pl.String,
                                    "score": pl.Float64, "threshold": pl.Float64})
    return store.scan("alerts").select(_COLUMNS).unique(IDENTITY, keep="last").collect()


@dataclass(frozen=True)
class AlertDiff:
    """Alerts added, removed and changed from store A to store B."""

    a: pl.DataFrame
    b: pl.DataFrame
    added: pl.DataFrame
    removed: pl.DataFrame
    changed: pl.DataFrame

    def counts(self) -> dict[str, int]:
        return {"alerts_a": self.a.height, "alerts_b": self.b.height, "added": self.added.height,
                "removed": self.removed.height, "changed": self.changed.height,
                "same": self.a.height - self.removed.height - self.changed.height}

    def by_day(self) -> pl.DataFrame:
        """Per event day: alerts in A and B, and how many were added, removed, changed."""
        def daily(frame: pl.DataFrame, name: str) -> pl.DataFrame:
            return frame.group_by(day=pl.col("timestamp").dt.date()).agg(pl.len().alias(name))

        days = pl.concat([daily(f, n).select("day") for f, n in self._named()]).unique()
        for frame, name in self._named():
            days = days.join(daily(frame, name), on="day", how="left")
        return days.fill_null(0).sort("day")

    def _named(self) -> list[tuple[pl.DataFrame, str]]:
        return [(self.a, "alerts_a"), (self.b, "alerts_b"), (self.added, "added"),
                (self.removed, "removed"), (self.changed, "changed")]


def compare_alerts(a: EventStore, b: EventStore) -> AlertDiff:
    """The alerts of ``b`` against those of ``a``."""
    left, right = alerts_of(a), alerts_of(b)
    added = right.join(left, on=list(IDENTITY), how="anti")
    removed = left.join(right, on=list(IDENTITY), how="anti")
    both = left.join(right, on=list(IDENTITY), how="inner", suffix="_b")
    changed = both.filter((pl.col("score") != pl.col("score_b"))
                          | (pl.col("threshold") != pl.col("threshold_b")))
    return AlertDiff(left, right, added.sort("timestamp", "event_id"),
                     removed.sort("timestamp", "event_id"), changed.sort("timestamp", "event_id"))
