"""Arrival order for live sources: each key's events are decided as they arrive.

A live source never waits for a watermark. Its events go to the keyed operators in arrival
order, which is each key's time order as long as producers send in order. An event older
than its key's latest (a producer's retry, a slow path) would take a keyed window back in
time: :class:`ArrivalGuard` finds those, per partition key and per enrichment stage key
(a terminal's events come from many customers), so the run sends them the late lane
instead (stored flagged ``{"late": true}`` with ``late: process``, else dead-lettered).

With a ``horizon``, a key whose latest event is that much older than the newest event time
seen is forgotten (an event of it after that is in order again, as for a new key): only
safe when no keyed operator remembers the key longer, so a live run keeps every key (one
time per key and dimension).

Example:
    >>> import pyarrow as pa
    >>> guard = ArrivalGuard({"key": pl.col("key")})
    >>> t = pa.table({"key": ["a", "a", "b", "a"], "ts": pa.array([5, 9, 1, 7], pa.int64())})
    >>> guard.late(t, pl.col("ts")).tolist()
    [False, False, False, True]
    >>> guard.late(pa.table({"key": ["a"], "ts": pa.array([8], pa.int64())}), pl.col("ts")).tolist()
    [True]
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa

_NEVER = np.iinfo(np.int64).min


class ArrivalGuard:
    """Per key dimension, the latest event time seen of each key.

    Args:
        dimensions: name -> expression giving each event's key in that dimension (null:
            the event has no key there, never late in it).
        horizon: how long (in the time column's units) a key is remembered after its
            latest event, behind the newest event time seen.
    """

    def __init__(self, dimensions: dict[str, pl.Expr], horizon: int | None = None) -> None:
        self.dimensions, self.horizon = dimensions, horizon
        self.latest = {name: pl.DataFrame(schema={"k": pl.String, "t": pl.Int64})
                       for name in dimensions}
        self.newest = _NEVER

    def late(self, events: pa.Table, time: pl.Expr, considered: np.ndarray | None = None) -> np.ndarray:
        """Which events are older than their key's latest, in any dimension (the others
        become their keys' latest). ``considered``: only these rows are checked and learnt."""
        frame = pl.from_arrow(events)
        assert isinstance(frame, pl.DataFrame)
        rows = frame.select(__t=time.cast(pl.Int64), **{f"__k_{n}": e.cast(pl.String)
                                                       for n, e in self.dimensions.items()})
        mask = np.ones(rows.height, bool) if considered is None else considered
        rows = rows.with_row_index("__i").filter(pl.Series(mask))
        late = np.zeros(frame.height, bool)
        for name in self.dimensions:
            late[self._late_in(name, rows)] = True
        self._forget()
        return late

    def _late_in(self, name: str, rows: pl.DataFrame) -> np.ndarray:
        """Row indices late in one dimension; learns the others' times."""
        keyed = rows.select("__i", "__t", k=pl.col(f"__k_{name}")).filter(pl.col("k").is_not_null())
        if keyed.height == 0:
            return np.zeros(0, np.int64)
        before = keyed.join(self.latest[name], on="k", how="left").sort("__i").with_columns(
            prior=pl.max_horizontal(pl.col("t"), pl.col("__t").shift(1).cum_max().over("k")))
        late = before.filter(pl.col("__t") < pl.col("prior"))
        newest = keyed.group_by("k").agg(t=pl.col("__t").max())
        self.latest[name] = pl.concat([self.latest[name], newest]).group_by("k").agg(pl.col("t").max())
        self.newest = max(self.newest, int(keyed["__t"].max()))  # type: ignore[arg-type]
        return late["__i"].to_numpy()

    def _forget(self) -> None:
        if self.horizon is None or self.newest == _NEVER:
            return
        cutoff = self.newest - self.horizon
        for name, latest in self.latest.items():
            self.latest[name] = latest.filter(pl.col("t") >= cutoff)

    def snapshot(self) -> bytes:
        """The state as Arrow IPC bytes (one table: dimension, key, latest time)."""
        table = pl.concat([latest.with_columns(d=pl.lit(name)) for name, latest in self.latest.items()]
                          or [pl.DataFrame(schema={"k": pl.String, "t": pl.Int64, "d": pl.String})])
        sink = io.BytesIO()
        table.with_columns(newest=pl.lit(self.newest, pl.Int64)).write_ipc(sink)
        return sink.getvalue()

    def restore(self, state: bytes) -> None:
        table = pl.read_ipc(io.BytesIO(state))
        self.newest = int(table["newest"][0]) if table.height else _NEVER
        for name in self.dimensions:
            self.latest[name] = table.filter(pl.col("d") == name).select("k", "t")
