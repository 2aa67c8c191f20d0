"""Ingest: source batches into envelope events in event-time order, before anything is keyed.

Per source batch: normalise (vectorised); skip events already stored (by this run, within
the duplicate horizon, or by an earlier run into the same store) or dead-letter them, as
``source.duplicates`` says; order the rest behind the source's watermark
(:class:`~pipelines.event_time.EventTimeOrderer`: out-of-order events within
``source.lateness`` are released in order; later ones follow ``source.late`` where a keyed
step or stage would see them, and are kept, flagged, where none would); store the
dead letters under the driver's own writer; merge the label feed's events that the
watermark has reached. A far-off timestamp never moves the watermark, so it never releases
labels early or jumps the pacer ahead.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from cluster.accounting import RunCounts
from pipelines.arrival import ArrivalGuard, KeyOf
from pipelines.deadletters import dead_letters_of
from pipelines.dedup import DuplicateFilter
from pipelines.envelope import DEADLETTER_SCHEMA, envelope_schema
from pipelines.event_time import EventTimeOrderer, WatermarkPolicy
from pipelines.group_commit import GroupCommitSink, ImmediateSink
from pipelines.kinds import keyed_event_types
from pipelines.labels import LabelFeed
from pipelines.normalise import Clock, Normaliser
from pipelines.routing import type_regex
from pipelines.sources import RawBatch
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId

DUPLICATE = "duplicate_event_id"
LATE = "late_event"
_US = dt.timedelta(microseconds=1)


def flag_late(events: pa.Table) -> pa.Table:
    """``events`` with ``"late": true`` added to their ``metadata.tags`` (JSON text)."""
    frame = pl.from_arrow(events)
    assert isinstance(frame, pl.DataFrame)
    tags = pl.col("metadata").struct.field("tags")
    flagged = (pl.when(tags.is_null() | (tags.str.strip_chars() == "{}"))
               .then(pl.lit('{"late":true}'))
               .otherwise(tags.str.replace(r"^\s*\{", '{"late":true,')))
    frame = frame.with_columns(pl.col("metadata").struct.with_fields(tags=flagged))
    return frame.to_arrow().cast(events.schema)


class Ingest:
    """The driver's side of a source: normalise, dedup, order, dead-letter, label feed."""

    def __init__(self, spec: PipelineSpec, store: EventStore, run: str, clock: Clock,
                 live: bool = False, writer: WriterId | None = None) -> None:
        source = spec.source
        self.spec, self.store, self.run, self.clock = spec, store, run, clock
        #: the dead letters' writer: the driver's, or a reader actor's own
        self.writer = (writer or WriterId.ingest(run)).name
        #: where the dead letters and late events go: a live run group-commits them as its
        #: partitions do (every store.commit_interval, in a thread, and before each
        #: checkpoint), so a batch with one never waits on a Parquet write and its fsync
        #: (a live label feed is late by nature); a bounded run writes them as they come
        self.sink: GroupCommitSink | ImmediateSink = GroupCommitSink(
            store, spec.store.commit_rows, spec.store.commit_interval.total_seconds(),
            on_time=True) if live else ImmediateSink(store)
        self.normaliser = Normaliser(spec, clock)
        self.duplicates = DuplicateFilter(horizon_us=source.dedup_horizon // _US)
        schema = envelope_schema(spec.registry())
        self.orderer = EventTimeOrderer(
            WatermarkPolicy(lateness=source.lateness, idle_timeout=source.idle_timeout),
            clock=clock, schema=schema, tiebreak=source.order_ties_by) \
            if source.ordering == "event-time" else None
        self.labels = LabelFeed(spec.labels, spec.registry(), schema) if spec.labels else None
        self.last_dead = DEADLETTER_SCHEMA.empty_table()
        #: the event ids of the last batch's lines: those normalised and those
        #: dead-lettered (duplicates included), as the normaliser gave or derived them
        self.last_ids: tuple[pa.ChunkedArray, ...] = ()
        patterns = keyed_event_types(spec)
        #: the event types a keyed step or stage sees (the late policy applies to them)
        self.keyed_types = type_regex(patterns) if patterns else None
        #: a live source in arrival order: events older than their key's latest go the
        #: late lane (:mod:`pipelines.arrival`)
        self.arrival = _arrival_guard(spec) if live and self.orderer is None else None
        self.last_late = schema.empty_table()

    @property
    def watermark_us(self) -> int | None:
        """The source's watermark (``None`` before it has one, or in arrival order)."""
        return self.orderer.watermark_us if self.orderer is not None else None

    def read(self, raw: RawBatch, counts: RunCounts) -> pa.Table:
        """One source batch's events, ordered, with the labels now due; its dead letters are
        stored."""
        out = self.normaliser.normalise(raw, self.duplicates, dedup_by_arrival=self.orderer is None)
        counts.read += out.read
        self.last_ids = (out.events.column("event_id"), out.deadletters.column("event_id"))
        dead = [self._without_skipped_duplicates(out.deadletters, counts)]
        events, repeated = self._without_stored_elsewhere(out.events, counts)
        events, late = self._order(events)
        events, behind = self._late_lane(events, counts)
        dead = pa.concat_tables([*dead, repeated, late, behind])
        self.last_dead = dead  # what a synchronous caller of these events is told
        self.sink.write("deadletter", dead, writer=self.writer, seq=counts.batches)
        if self.sink.due():
            self.sink.flush_in_background()
        counts.batches += 1
        counts.count_dead_letters(dead.column("reason").to_numpy(zero_copy_only=False))
        return self._with_labels(events, counts)

    def _without_skipped_duplicates(self, dead: pa.Table, counts: RunCounts) -> pa.Table:
        """Dead letters less the duplicates skipped (``duplicates: skip``), which are counted."""
        is_duplicate = pc.equal(dead.column("reason"), DUPLICATE)
        found = int(pc.sum(is_duplicate).as_py() or 0)
        counts.duplicates += found
        if not found or self.spec.source.duplicates == "dead-letter":
            return dead
        counts.filtered += found
        return dead.filter(pc.invert(is_duplicate))

    def _without_stored_elsewhere(self, events: pa.Table,
                                  counts: RunCounts) -> tuple[pa.Table, pa.Table]:
        """Events an earlier run already stored in this store are duplicates too: skipped
        (and counted), or returned as dead letters."""
        none = self._dead(events.slice(0, 0), DUPLICATE, "")
        if events.num_rows == 0 or not self.store.has_other_runs(self.run):
            return events, none
        times = pc.cast(events.column("timestamp"), pa.int64()).to_numpy()
        start, end = (dt.datetime.fromtimestamp(int(t) / 1e6, dt.UTC)
                      for t in (times.min(), times.max()))
        stored = self.store.stored_ids(events.column("event_id"), start, end, exclude_run=self.run)
        found = int(stored.sum())
        if not found:
            return events, none
        counts.duplicates += found
        repeated, rest = events.filter(pa.array(stored)), events.filter(pa.array(~stored))
        if self.spec.source.duplicates == "dead-letter":
            return rest, self._dead(repeated, DUPLICATE, "event id was stored by an earlier run")
        counts.filtered += found
        return rest, none

    def _order(self, events: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(events released in event-time order, dead letters of late events)."""
        none = self._dead(events.slice(0, 0), LATE, "")
        if self.orderer is None:
            self._age_duplicates()
            return events, none
        ordered = self.orderer.push(events)
        if self.orderer.watermark_us is not None:
            self.duplicates.advance(self.orderer.watermark_us)
        late = ordered.late
        if late.num_rows == 0:
            return ordered.released, none
        # the late policy is for events a keyed operator would see; the others are kept
        keyed = pc.match_substring_regex(late.column("event_type"), self.keyed_types) \
            if self.keyed_types else pa.array(np.zeros(late.num_rows, bool))
        if self.spec.source.late == "process":
            keyed = pa.array(np.zeros(late.num_rows, bool))
        kept = late.filter(pc.invert(keyed))
        released = pa.concat_tables([ordered.released, flag_late(kept)]) if kept.num_rows \
            else ordered.released
        return released, self._dead(
            late.filter(keyed), LATE, f"event time is older than the source's watermark "
                        f"({_iso(self.orderer.watermark_us)}): later than source.lateness allows")

    def _age_duplicates(self) -> None:
        """In arrival order there is no watermark, and a client's retry comes soon after the
        first try whatever the event's time: the duplicate filter keeps ids by arrival time
        (see :meth:`read`) and forgets those that arrived more than one horizon ago, so a
        long-running serve keeps a horizon of ids, not every id it ever saw."""
        self.duplicates.advance(int(self.clock().timestamp() * 1e6))

    def _late_lane(self, events: pa.Table, counts: RunCounts) -> tuple[pa.Table, pa.Table]:
        """In arrival order: events a keyed operator sees that are older than their key's
        latest are stored at once, flagged late (``late: process``), or returned as dead
        letters; returns (the events that go on, those dead letters)."""
        self.last_late = events.slice(0, 0)
        none = self._dead(events.slice(0, 0), LATE, "")
        if self.arrival is None or events.num_rows == 0 or self.keyed_types is None:
            return events, none
        keyed = pc.match_substring_regex(events.column("event_type"), self.keyed_types)
        late = self.arrival.late(events, "timestamp",
                                 keyed.to_numpy(zero_copy_only=False))
        if not late.any():
            return events, none
        rows, rest = events.filter(pa.array(late)), events.filter(pa.array(~late))
        if self.spec.source.late == "dead-letter":
            return rest, self._dead(rows, LATE, "event time is older than its key's latest "
                                                "event (a live source decides in arrival order)")
        self.last_late = flag_late(rows)
        self.sink.write("events", self.last_late, writer=self.writer, seq=counts.batches)
        counts.stored += rows.num_rows
        counts.sent += rows.num_rows  # stored here, as a partition would (sent = stored + poisoned)
        return rest, none

    def _dead(self, events: pa.Table, reason: str, message: str) -> pa.Table:
        return dead_letters_of(events, reason, message, self.clock())

    def _with_labels(self, events: pa.Table, counts: RunCounts) -> pa.Table:
        """Merge the labels due by the watermark (by the batch's own times in arrival order)."""
        if self.labels is None:
            return events
        watermark = self.watermark_us
        if self.orderer is not None and watermark is None:
            watermark = int(np.iinfo(np.int64).min)  # no watermark yet: nothing is due
        events, released = self.labels.merge(events, watermark)
        counts.derived += released
        return events

    def rest(self, counts: RunCounts) -> pa.Table | None:
        """What is still held once the source has ended: the events behind the watermark,
        then the rest of the label feed, in time order."""
        parts = []
        if self.orderer is not None:
            tail = self.orderer.flush()
            if self.labels is not None:
                tail, released = self.labels.merge(tail, self.orderer.watermark_us)
                counts.derived += released
            parts.append(tail)
        if self.labels is not None:
            labels = self.labels.flush()
            counts.derived += labels.num_rows
            parts.append(labels)
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else None

    def flush(self) -> None:
        """Commit the dead letters and late events held (a checkpoint's first step: a group
        never straddles one, so a restored run's truncation and replay rewrite it whole).

        Raises:
            Exception: what a commit in the background raised (the store failed).
        """
        self.sink.flush()

    def snapshot(self) -> dict[str, bytes]:
        """The driver's state to checkpoint, by name."""
        state = {"dedup": self.duplicates.snapshot()}
        if self.labels is not None:
            state["labels"] = self.labels.snapshot()
        if self.orderer is not None:
            state["orderer"] = self.orderer.snapshot()
        if self.arrival is not None:
            state["arrival"] = self.arrival.snapshot()
        return state

    def restore(self, state: dict[str, bytes]) -> None:
        self.duplicates.restore(state["dedup"])
        if self.labels is not None:
            self.labels.restore(state["labels"])
        if self.orderer is not None:
            self.orderer.restore(state["orderer"])
        if self.arrival is not None:
            self.arrival.restore(state["arrival"])


def _iso(micros: int | None) -> str:
    if micros is None:
        return "none yet"
    return dt.datetime.fromtimestamp(micros / 1e6, dt.UTC).isoformat()


def _arrival_guard(spec: PipelineSpec) -> ArrivalGuard:
    """The keys whose time order a live run keeps: the partition key, and each enrichment
    stage's key (a payload field) for the stage's event types."""
    dimensions = {"key": KeyOf("key")}
    fields = {f.name for f in spec.registry().data_type()}
    for stage in spec.enrich:
        if stage.key in fields:
            dimensions[stage.name] = KeyOf("data", stage.key, type_regex(stage.event_types))
    # No horizon: forgetting a key a window operator still holds (its reach is the
    # operator's business, up to weeks) would let an older event of it through. One time per
    # key and dimension is little beside what the operators keep per key.
    return ArrivalGuard(dimensions)
