"""A projection rebuilt offline from the store's history, with snapshots and time travel.

:meth:`Projection.rebuild` folds the whole history of the projection's event types in
event order ((event time, event id), the order the stream folds each key's events in) in
slices of ``snapshot_every`` events, and after each full slice stores a snapshot: the state
of the keys that slice changed, and the position (time, id) of its last event, under
``STORE/_projections/<name>/``. A key's state at snapshot ``s`` is its row in the latest
snapshot ``<= s`` that has one (a key no later slice touched did not change).

:meth:`Projection.state` answers ``state(key, as_of=T)``: the key's state once every event
with event time ``<= T`` is folded. It starts from the latest snapshot at or before ``T``
and folds the key's events after it; a snapshot whose event count for the key disagrees
with the store's history (events stored since, with earlier times) is ignored, so the
answer never depends on whether snapshots exist or are current.

Example:
    >>> import tempfile, datetime as dt, pyarrow as pa
    >>> from pipelines.store import EventStore
    >>> from pipelines.projection_spec import ProjectionSpec
    >>> store = EventStore(tempfile.mkdtemp())
    >>> t = [dt.datetime(2024, 1, d, tzinfo=dt.UTC) for d in (1, 2)]
    >>> _ = store.write("events", pa.table({"event_id": ["a", "b"], "event_type": ["x.y"] * 2,
    ...     "timestamp": pa.array(t, pa.timestamp("us", "UTC")), "key": ["k", "k"]}), "p0", 0)
    >>> spec = ProjectionSpec.model_validate({"name": "n", "fields": [
    ...     {"name": "seen", "op": "count", "event_types": ["x.*"]}]})
    >>> Projection(spec, store).state("k", as_of=t[0])["seen"]
    1
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.projection_spec import ProjectionSpec
from pipelines.projections.fold import ORDER, ProjectionFold
from pipelines.store import EventStore, write_parquet_atomic

#: Bookkeeping folder of offline projections, under the store's root.
SNAPSHOTS = "_projections"


def stored_types(store: EventStore, patterns: Sequence[str], table: str = "events") -> list[str]:
    """The event types of ``table`` that some shell-style pattern matches."""
    found = (p.name.removeprefix("event_type=") for p in store.table_dir(table).glob("event_type=*"))
    return sorted(t for t in found if any(fnmatch.fnmatchcase(t, p) for p in patterns))


def key_history(store: EventStore, event_types: Sequence[str], keys: Sequence[str] | None = None,
                until: dt.datetime | None = None) -> pl.LazyFrame:
    """Stored events of ``event_types`` (of ``keys``, with event time ``<= until``), in
    (event time, event id) order.

    The one place projections read history: it becomes ``EventStore.history`` once the
    store offers one.
    """
    types = stored_types(store, event_types)
    if not types:
        return pl.LazyFrame()
    frame = store.scan("events", event_types=types, keys=keys)
    if until is not None:
        frame = frame.filter(pl.col("timestamp") <= until)
    return frame.drop("date", strict=False).sort(*ORDER)


class Projection:
    """A projection over a store: rebuild it, snapshot it, ask for a key's state at a time.

    Args:
        spec: the projection (``ProjectionSpec``, or the mapping a config holds).
        store: the event store, or its directory.
    """

    def __init__(self, spec: ProjectionSpec | dict[str, Any], store: EventStore | str | Path) -> None:
        self.spec = spec if isinstance(spec, ProjectionSpec) else ProjectionSpec.model_validate(spec)
        self.store = store if isinstance(store, EventStore) else EventStore(store)
        self.folder = self.store.root / SNAPSHOTS / self.spec.name
        self._fold: ProjectionFold | None = None

    def history(self, keys: Sequence[str] | None = None, until: dt.datetime | None = None) -> pl.DataFrame:
        """The events the projection folds, in order (optionally of ``keys``, up to ``until``)."""
        return key_history(self.store, self.spec.event_types(), keys, until).collect()

    def fold_of(self, events: pl.DataFrame) -> ProjectionFold:
        """The fold compiled for the store's events (once)."""
        if self._fold is None:
            self._fold = ProjectionFold(self.spec, events.schema)
        return self._fold

    def rebuild(self, snapshot_every: int | None = None) -> pl.DataFrame:
        """Fold the whole history from zero, storing a snapshot every ``snapshot_every``
        events (default: the spec's); returns every key's state (:meth:`ProjectionFold.view`)."""
        every = snapshot_every or self.spec.snapshot_every
        events = self.history()
        shutil.rmtree(self.folder, ignore_errors=True)
        if events.width == 0:  # no event of its types is stored: no key has a state
            self._write_manifest(every, [])
            return pl.DataFrame()
        fold = self.fold_of(events)
        state, snapshots = fold.empty(), []
        for start in range(0, events.height, every):
            chunk = events.slice(start, every)
            state, changed = fold.fold(state, chunk)
            if chunk.height == every:
                snapshots.append(self._write_snapshot(len(snapshots) + 1, start + every, chunk, changed))
        self._write_manifest(every, snapshots)
        return fold.view(state)

    def _write_snapshot(self, seq: int, folded: int, chunk: pl.DataFrame,
                        changed: pl.DataFrame) -> dict[str, Any]:
        last = chunk.row(chunk.height - 1, named=True)
        write_parquet_atomic(changed.with_columns(snapshot=pl.lit(seq)).to_arrow(),
                             self.folder / f"snapshot-{seq:06d}.parquet")
        return {"snapshot": seq, "events": folded, "timestamp": last["timestamp"].isoformat(),
                "event_id": last["event_id"]}

    def _fingerprint(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()[:16]

    def _write_manifest(self, every: int, snapshots: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"projection": self.spec.name, "fingerprint": self._fingerprint(),
                "snapshot_every": every, "snapshots": snapshots}
        tmp = self.folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.folder / "manifest.json")

    def snapshots(self) -> list[dict[str, Any]]:
        """The stored snapshots (oldest first), or none when the spec changed since."""
        try:
            body = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return []
        return body["snapshots"] if body.get("fingerprint") == self._fingerprint() else []

    def state(self, key: str, as_of: dt.datetime | None = None,
              use_snapshots: bool = True) -> dict[str, Any] | None:
        """The key's state once its events with event time ``<= as_of`` are folded (all of
        them without ``as_of``), or ``None`` when it has none; from the latest usable
        snapshot unless ``use_snapshots`` is false."""
        events = self.history([key], as_of)
        if events.width == 0 or events.height == 0:
            return None
        fold = self.fold_of(events)
        prior, rest = self._from_snapshot(key, events, as_of) if use_snapshots else (fold.empty(), events)
        state, _ = fold.fold(prior, rest)
        view = fold.view(state)
        return view.row(0, named=True) if view.height else None

    def _from_snapshot(self, key: str, events: pl.DataFrame,
                       as_of: dt.datetime | None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The key's state at the latest snapshot at or before ``as_of`` and its events after it."""
        fold = self.fold_of(events)
        usable = [s for s in self.snapshots()
                  if as_of is None or dt.datetime.fromisoformat(s["timestamp"]) <= as_of]
        if not usable:
            return fold.empty(), events
        last = usable[-1]
        at = dt.datetime.fromisoformat(last["timestamp"])
        after = (pl.col("timestamp") > at) | (
            (pl.col("timestamp") == at) & (pl.col("event_id") > last["event_id"]))
        files = [self.folder / f"snapshot-{s['snapshot']:06d}.parquet" for s in usable]
        row = (pl.scan_parquet(files).filter(pl.col("key") == key).sort("snapshot").tail(1)
               .drop("snapshot").collect().cast(dict(fold.empty().schema)))
        rest = events.filter(after)
        if (row["_n"].item() if row.height else 0) != events.height - rest.height:
            return fold.empty(), events  # the history changed under the snapshot: fold it all
        return row, rest
