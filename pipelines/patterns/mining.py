"""``eventray mine``: the stream's patterns over the events of a store, with Polars, no Ray.

The stored events are read back in the order the stream's partitions applied them: by
event time, then by the partition batch that applied them (the sequence number in each
file's name), then by their row in the file. One key's events all go through one
partition, so each key is replayed in its stream order and the same engine
(:class:`~pipelines.patterns.batches.PatternSet`) finds the same matches. The one order a
store cannot give back is that of events of *different types* with the *same time* in
one batch (each type has its own file): those are ordered by type name. Give such ties an
order of their own in the source (``source.order_ties_by``) when a pattern depends on it.

Example:
    >>> summary = mine_store("store", "configs/patterns/fraud.yaml", "out")  # doctest: +SKIP
    >>> pl.read_parquet("out/matches.parquet").columns  # doctest: +SKIP
    ['pattern', 'key', 'event_ids', 'start', 'end']
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.errors import StoreError
from pipelines.patterns.batches import PatternSet, matches_frame
from pipelines.patterns.spec import PatternSpec, load_patterns
from pipelines.store import EventStore, write_parquet_atomic

__all__ = ["mine_events", "mine_store", "stored_in_stream_order"]

_ENVELOPE = ["event_id", "event_type", "timestamp", "source", "correlation_id", "key", "data",
             "metadata"]


def stored_in_stream_order(store: EventStore, start: dt.datetime | None = None,
                           end: dt.datetime | None = None) -> pl.DataFrame:
    """The store's events, each key's in the order its partition applied them."""
    files = store.files("events")
    if not files:
        raise StoreError(f"the store at {store.root} holds no events")
    frame = pl.scan_parquet(files, hive_partitioning=True, include_file_paths="_file") \
        .with_row_index("_row")
    if start is not None:
        frame = frame.filter(pl.col("timestamp") >= start)
    if end is not None:
        frame = frame.filter(pl.col("timestamp") < end)
    frame = frame.with_columns(
        _seq=pl.col("_file").str.extract(r"-(\d+)\.parquet$").cast(pl.Int64),
        _type=pl.col("_file").str.extract(r"event_type=([^/\\]+)"))
    ordered = frame.sort(["timestamp", "_seq", "_type", "_row"]).collect()
    return ordered.select([c for c in _ENVELOPE if c in ordered.columns])


def mine_events(events: pl.DataFrame, patterns: Sequence[PatternSpec]) -> pl.DataFrame:
    """Every match of ``patterns`` in ``events`` (each key's in stream order), the input
    taken as bounded: pending absences fire at its end."""
    engine = PatternSet(patterns)
    return matches_frame(engine.process(events) + engine.finish())


def mine_store(store: str | Path, patterns_file: str | Path, out: str | Path,
               start: dt.datetime | None = None, end: dt.datetime | None = None) -> dict[str, Any]:
    """Run a pattern file over a store's events; write ``out/matches.parquet``.

    Returns:
        a summary: events read, matches (in all and per pattern), the output file.
    """
    patterns = load_patterns(patterns_file)
    events = stored_in_stream_order(EventStore(store), start, end)
    matches = mine_events(events, patterns)
    target = Path(out) / "matches.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(matches.to_arrow(), target)
    per_pattern = {p.name: 0 for p in patterns}
    for name, count in matches.group_by("pattern").len().iter_rows():
        per_pattern[name] = count
    return {"events": events.height, "matches": matches.height, "per_pattern": per_pattern,
            "out": str(target)}
