"""Labels as events: a delayed label feed merged into the event stream in event-time order.

A card network learns that a transaction was fraud days after it happened, through a feed
of its own. Recorded data (the fraud handbook's files, the simulator's) carries the label
on the transaction row instead; :class:`LabelFeed` plays the feed back: for every event of
type ``spec.of`` it schedules one ``spec.event_type`` event (``fraud.reported``) at the
event's time plus ``spec.delay_days``, carrying only ``spec.fields`` of the payload, and
releases it into the stream once the stream's event time has reached it. A released label
goes before the first event whose time (the running maximum of event times, so the stream's
own order is never changed) is at or after the label's time: a feature computed for an
event at ``t`` can see the labels of events at ``t - delay`` and before, never later ones.

The feed is driver state: :meth:`LabelFeed.snapshot` / :meth:`LabelFeed.restore` carry the
scheduled labels through checkpoints, and :meth:`LabelFeed.flush` releases the rest when
the source ends. Label ids are UUIDv5s of the parent's id, so a replay derives the same
labels. Everything is vectorised over the batch.

Example:
    >>> from pipelines.spec import LabelFeedSpec
    >>> LabelFeedSpec().event_type
    'fraud.reported'
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
        self.pending = schema.empty_table()

    def merge(self, events: pa.Table) -> tuple[pa.Table, int]:
        """Schedule ``events``' labels and merge the ones now due; returns (batch, labels added)."""
        self._schedule(events)
        if events.num_rows == 0 or self.pending.num_rows == 0:
            return events, 0
        times = _micros(events.column("timestamp"))
        reached = np.maximum.accumulate(times)
        label_times = _micros(self.pending.column("timestamp"))
        n_due = int(np.searchsorted(label_times, reached[-1], side="right"))
        if n_due == 0:
            return events, 0
        due, self.pending = self.pending.slice(0, n_due), self.pending.slice(n_due)
        before = np.searchsorted(reached, label_times[:n_due], side="left")
        # label j goes before event before[j]; events keep their order, labels theirs
        order = np.argsort(np.concatenate([2 * np.arange(events.num_rows) + 1, 2 * before]),
                           kind="stable")
        merged = take_rows(pa.concat_tables([events, due]), order)
        return merged, n_due

    def flush(self) -> pa.Table:
        """Every label still scheduled (the source has ended), in time order."""
        rest, self.pending = self.pending, self.schema.empty_table()
        return rest

    def _schedule(self, events: pa.Table) -> None:
        parents = events.filter(pc.equal(events.column("event_type"), self.spec.of))
        if parents.num_rows == 0:
            return
        frame = pl.from_arrow(parents)
        assert isinstance(frame, pl.DataFrame)
        labels = self._labels(frame).to_arrow().cast(self.schema)
        times = _micros(labels.column("timestamp"))
        pending = _micros(self.pending.column("timestamp"))
        ordered = bool((np.diff(times) >= 0).all()) and (
            len(pending) == 0 or pending[-1] <= times[0])
        both = pa.concat_tables([self.pending, labels])
        if not ordered:  # a source out of time order: keep the schedule sorted (stably)
            both = take_rows(both, np.argsort(np.concatenate([pending, times]), kind="stable"))
        self.pending = both.combine_chunks()

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
            writer.write_table(self.pending)
        return sink.getvalue().to_pybytes()

    def restore(self, state: bytes) -> None:
        """Replace the scheduled labels with a snapshot's."""
        self.pending = pa.ipc.open_stream(state).read_all().cast(self.schema)


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int64()).to_numpy()
