"""Labels as events: a delayed label feed merged into the event stream in event-time order.

A card network learns that a transaction was fraud days after it happened, through a feed
of its own. Recorded data (the fraud handbook's files, the simulator's) carries the label
on the transaction row instead; :class:`LabelFeed` plays the feed back: for every event of
type ``spec.of`` it schedules one ``spec.event_type`` event (``fraud.reported``) at the
event's time plus ``spec.delay_days``, carrying only ``spec.fields`` of the payload, and
releases it into the stream once the source's watermark has reached it (the driver passes
the watermark of :mod:`pipelines.event_time`, which the stream's bulk moves, never a single
row, so one row dated years ahead cannot release every pending label: a label leak). A
released label goes before the first event whose time (the running maximum of event times,
so the stream's own order is never changed) is at or after the label's time: a feature
computed for an event at ``t`` can see the labels of events at ``t - delay`` and before,
never later ones.

Pending labels are kept as a list of sorted chunks, one per scheduling batch, so a batch
never copies the whole schedule (chunks are merged only when there are many of them).

The feed is driver state: :meth:`LabelFeed.snapshot` / :meth:`LabelFeed.restore` carry the
scheduled labels through checkpoints, and :meth:`LabelFeed.flush` releases the rest when
the source ends. Label ids are UUIDv5s of the parent's id, so a replay derives the same
labels. Everything is vectorised over the batch.

Example:
    >>> from pipelines.spec import LabelFeedSpec
    >>> spec = LabelFeedSpec(of="transaction.created", event_type="fraud.reported",
    ...                      label="TX_FRAUD", fields=["TRANSACTION_ID", "TX_FRAUD"], delay_days=7)
    >>> spec.event_type, spec.delay_days
    ('fraud.reported', 7.0)
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.envelope import PayloadRegistry
from pipelines.event_ids import uuid5_strings
from pipelines.spec import ENVELOPE_KEY_FIELDS, LabelFeedSpec
from pipelines.tables import take_rows

_LABEL_SUFFIX = "/label"
_MAX_CHUNKS = 64


class LabelFeed:
    """Schedules a label event per labelled event and merges due labels into batches.

    Args:
        spec: the feed's settings.
        registry: the pipeline's payload registry (the label type's key and version).
        schema: the envelope schema every batch has.
    """

    def __init__(self, spec: LabelFeedSpec, registry: PayloadRegistry, schema: pa.Schema) -> None:
        self.spec, self.schema = spec, schema
        label_schema = registry.schema_for(spec.event_type)
        self.key, self.version = label_schema.key, label_schema.version
        self.delay = dt.timedelta(days=spec.delay_days)
        # sorted chunks of scheduled labels, in scheduling order (a stable merge of them is
        # the pending schedule)
        self._chunks: list[tuple[pa.Table, np.ndarray]] = []

    @property
    def pending(self) -> pa.Table:
        """Every scheduled label not yet released, in time order (scheduling order on ties)."""
        return self._pending()

    def merge(self, events: pa.Table, watermark_us: int | None = None) -> tuple[pa.Table, int]:
        """Schedule ``events``' labels and merge the ones now due; returns (batch, labels added).

        Args:
            events: the next batch of the stream, in the order the keyed steps see it.
            watermark_us: the source's watermark (epoch microseconds): labels at or before
                it are due. None takes the running maximum of this batch's event times,
                which one far-future row moves; pass the source's robust watermark.
        """
        self._schedule(events)
        if not self._chunks:
            return events, 0
        reached = np.maximum.accumulate(_micros(events.column("timestamp")))
        if watermark_us is None:
            if events.num_rows == 0:
                return events, 0
            watermark_us = int(reached[-1])
        due = self._take_due(watermark_us)
        if due.num_rows == 0:
            return events, 0
        label_times = _micros(due.column("timestamp"))
        before = np.searchsorted(reached, label_times, side="left")
        # label j goes before event before[j]; events keep their order, labels theirs
        order = np.argsort(np.concatenate([2 * np.arange(events.num_rows) + 1, 2 * before]),
                           kind="stable")
        merged = take_rows(pa.concat_tables([events, due]), order)
        return merged, due.num_rows

    def flush(self) -> pa.Table:
        """Every label still scheduled (the source has ended), in time order."""
        rest, self._chunks = self._pending(), []
        return rest

    def _take_due(self, watermark_us: int) -> pa.Table:
        """Remove and return the labels at or before ``watermark_us``, stably time-sorted."""
        due: list[pa.Table] = []
        kept: list[tuple[pa.Table, np.ndarray]] = []
        for table, times in self._chunks:
            n_due = int(np.searchsorted(times, watermark_us, side="right"))
            if n_due:
                due.append(table.slice(0, n_due))
            if n_due < len(times):
                kept.append((table.slice(n_due), times[n_due:]))
        self._chunks = kept
        return _stable_time_sorted(due, self.schema)

    def _pending(self) -> pa.Table:
        return _stable_time_sorted([table for table, _ in self._chunks], self.schema)

    def _schedule(self, events: pa.Table) -> None:
        """Add ``events``' labels as one more sorted chunk; nothing already pending is copied.

        Chunks are merged (one copy of the pending labels) only when there are more than
        ``_MAX_CHUNKS`` of them, so the cost per batch stays amortised.
        """
        parents = events.filter(pc.equal(events.column("event_type"), self.spec.of))
        if parents.num_rows == 0:
            return
        frame = pl.from_arrow(parents)
        assert isinstance(frame, pl.DataFrame)
        labels = self._labels(frame).to_arrow().cast(self.schema)
        times = _micros(labels.column("timestamp"))
        if not bool((np.diff(times) >= 0).all()):  # a source out of time order
            order = np.argsort(times, kind="stable")
            labels, times = take_rows(labels, order), times[order]
        self._chunks.append((labels, times))
        if len(self._chunks) > _MAX_CHUNKS:
            merged = self._pending().combine_chunks()
            self._chunks = [(merged, _micros(merged.column("timestamp")))]

    def _labels(self, parents: pl.DataFrame) -> pl.DataFrame:
        ids = uuid5_strings((parents["event_id"] + _LABEL_SUFFIX).to_arrow())
        kept = set(self.spec.fields)
        data_dtype = parents.schema["data"]
        assert isinstance(data_dtype, pl.Struct)
        data = pl.struct([
            pl.col("data").struct.field(f.name) if f.name in kept
            else pl.lit(None, f.dtype).alias(f.name)
            for f in data_dtype.fields])
        if self.key == "event_id":
            key = pl.col("__id")
        elif self.key in ENVELOPE_KEY_FIELDS and self.key != "part":
            key = pl.col(self.key)
        else:
            key = pl.col("data").struct.field(self.key).cast(pl.String)
        return parents.with_columns(__id=pl.Series(ids)).select(
            event_id=pl.col("__id"),
            event_type=pl.lit(self.spec.event_type),
            timestamp=pl.col("timestamp") + self.delay,
            source=pl.col("source"),
            correlation_id=pl.col("correlation_id"),
            key=key,
            data=data,
            metadata=pl.col("metadata").struct.with_fields(
                version=pl.lit(str(self.version), pl.String)),
        )

    def snapshot(self) -> bytes:
        """The scheduled labels, as Arrow IPC bytes."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            writer.write_table(self._pending())
        return sink.getvalue().to_pybytes()

    def restore(self, state: bytes) -> None:
        """Replace the scheduled labels with a snapshot's."""
        pending = pa.ipc.open_stream(state).read_all().cast(self.schema)
        self._chunks = [(pending, _micros(pending.column("timestamp")))] if pending.num_rows else []


def _stable_time_sorted(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """``tables`` concatenated, then stably sorted by time (each is sorted already)."""
    if not tables:
        return schema.empty_table()
    both = pa.concat_tables(tables)
    if len(tables) == 1:
        return both
    times = _micros(both.column("timestamp"))
    if bool((np.diff(times) >= 0).all()):
        return both
    return take_rows(both, np.argsort(times, kind="stable"))


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int64()).to_numpy()
