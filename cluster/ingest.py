"""Ingest: source batches into envelope events, before anything is keyed.

Normalise (vectorised), store the dead letters under the driver's own writer, drop
duplicates, and merge the label feed's due events into the stream.
"""

from __future__ import annotations

import pyarrow as pa

from cluster.accounting import RunCounts
from pipelines.dedup import DuplicateFilter
from pipelines.envelope import envelope_schema
from pipelines.labels import LabelFeed
from pipelines.normalise import Clock, Normaliser
from pipelines.sources import RawBatch
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId


class Ingest:
    """Source batches into envelope events: normalise, dead-letter, schedule labels."""

    def __init__(self, spec: PipelineSpec, store: EventStore, run: str, clock: Clock) -> None:
        self.store, self.writer = store, WriterId.ingest(run).name
        self.normaliser, self.duplicates = Normaliser(spec, clock), DuplicateFilter()
        schema = envelope_schema(spec.registry())
        self.labels = LabelFeed(spec.labels, spec.registry(), schema) if spec.labels else None

    def read(self, raw: RawBatch, counts: RunCounts) -> pa.Table:
        """One source batch's events (with the labels now due); its dead letters are stored."""
        out = self.normaliser.normalise(raw, self.duplicates)
        self.store.write("deadletter", out.deadletters, writer=self.writer, seq=counts.batches)
        counts.read += out.read
        counts.batches += 1
        counts.count_dead_letters(out.deadletters.column("reason").to_numpy(zero_copy_only=False))
        events = out.events
        if self.labels is not None:
            events, released = self.labels.merge(events)
            counts.derived += released
        return events

    def rest(self, counts: RunCounts) -> pa.Table | None:
        """What is still scheduled once the source has ended (the rest of the label feed)."""
        if self.labels is None:
            return None
        rest = self.labels.flush()
        counts.derived += rest.num_rows
        return rest
