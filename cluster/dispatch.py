"""Routing and dispatch: events into priority lanes, lanes into the keyed partitions.

A batch is routed (kept, dropped, laned, derived events emitted), split by key over the
partitions (each key's order kept) and queued per partition and lane; queued pieces go to
partitions with room in flight, high lane first, each with the partition's next sequence
number. Receipts that come back are counted; the events the partitions' steps derived
(alerts, a processor's events) are routed again, one hop further, up to the hop limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyarrow as pa

from cluster.accounting import Latencies, RunCounts
from cluster.operators import KeyedExecutor
from pipelines.keyed import BatchReceipt, merge_counters, split_by_partition
from pipelines.kinds import repartitioned_patterns
from pipelines.lanes import BatchSizer, LaneQueues
from pipelines.patterns.batches import pattern_copies
from pipelines.patterns.spec import pattern_specs
from pipelines.processing import watermark_batch, without_copies
from pipelines.routing import Router
from pipelines.spec import PipelineSpec
from pipelines.tables import conform


class Dispatcher:
    """Routes batches into the lanes and feeds the partitions from them.

    Args:
        spec: the pipeline.
        executor: the partitions' executor.
        seqs: each partition's next sequence number (from a checkpoint).
        counts: the run's counters (``filtered``, ``derived``, ``sent``... are kept here).
        routed_schema: the schema every routed piece has (the envelope, then the transit
            columns of the enrichment stages), so that any two pieces concatenate.
        coalesce_rows: without adaptive batching, a partition's queued pieces of a lane go
            as one batch of up to this many rows (default: one piece per batch). A live run
            sets it: under load the pieces queue while the partition works, and a batch's
            cost is mostly fixed.
    """

    def __init__(self, spec: PipelineSpec, executor: KeyedExecutor, seqs: list[int],
                 counts: RunCounts, routed_schema: pa.Schema,
                 coalesce_rows: int | None = None) -> None:
        self.spec, self.executor, self.seqs, self.counts = spec, executor, seqs, counts
        self.router = Router(spec)
        self.partitions = spec.runtime.partitions
        self.queues = LaneQueues(self.partitions)
        adaptive = spec.runtime.adaptive_batching
        self.sizer = BatchSizer(adaptive, self.partitions) if adaptive else None
        self.coalesce_rows = coalesce_rows
        self.routed_schema = routed_schema
        self.copied = repartitioned_patterns(spec)
        self.patterns = pattern_specs(spec)
        self.latencies = Latencies()
        #: called with every receipt acknowledged (``eventray serve`` answers ``/score``)
        self.on_receipt: Callable[[BatchReceipt], None] | None = None

    def route(self, events: pa.Table, hops: int = 0) -> None:
        """Route a batch and its derived events (hop by hop) into the lanes."""
        counts = self.counts
        # Without max_hops, routes are acyclic (checked at start-up): derivation ends by itself.
        limit = self.spec.routing.max_hops or len(self.spec.routing.routes) + 2
        while events.num_rows:
            routed = self.router.route(self._with_transit(events))
            counts.filtered += routed.filtered
            for lane, high in ((routed.high, True), (routed.normal, False)):
                for partition, rows in split_by_partition(lane, self.partitions):
                    self.queues.offer(partition, rows, high)
            if self.copied:  # after the events: a pattern's copies, keyed by its key
                copies = pattern_copies(self.patterns, self.copied, routed.high, routed.normal)
                for partition, rows in split_by_partition(self._with_transit(copies), self.partitions):
                    self.queues.offer(partition, rows, False)
            events, hops = routed.derived, hops + 1
            counts.derived += events.num_rows
            if events.num_rows and hops > limit:
                counts.filtered += events.num_rows  # dropped past the limit
                counts.hop_limited += events.num_rows
                break

    def _with_transit(self, events: pa.Table) -> pa.Table:
        """The batch in the routed schema: nulls where a stage added no column."""
        if events.schema.names == self.routed_schema.names:
            return conform(events, self.routed_schema)  # Polars hands back large strings
        columns = [events.column(f.name) if f.name in events.column_names
                   else pa.nulls(events.num_rows, f.type) for f in self.routed_schema]
        return conform(pa.table(columns, names=self.routed_schema.names), self.routed_schema)

    def dispatch(self) -> None:
        """Hand queued batches to partitions with room in flight, high lane first."""
        for partition in range(self.partitions):
            while self.executor.capacity(partition) > 0:
                limit = self.sizer.max_rows(partition) if self.sizer else self.coalesce_rows
                rows = self.queues.take(partition, limit)
                if rows is None:
                    break
                self.executor.submit(partition, self.seqs[partition], rows)
                self.seqs[partition] += 1
                self.counts.sent += without_copies(rows).num_rows  # copies are never stored

    def pump(self, block: bool = False) -> None:
        """Collect finished batches (``block``: wait for one), route what they derived,
        and dispatch into the room they freed."""
        self.acknowledge(self.executor.poll(block))
        self.dispatch()

    def queued(self) -> bool:
        """Whether any piece waits for a partition's room."""
        return not self.queues.empty()

    def over_queued(self) -> bool:
        bound = self.spec.runtime.max_queued_batches
        return any(self.queues.pieces(p) > bound for p in range(self.partitions))

    def flush(self) -> None:
        """Dispatch everything queued, waiting for room as needed."""
        self.dispatch()
        while not self.queues.empty():
            self.pump(block=True)

    def acknowledge(self, receipts: Iterable[BatchReceipt]) -> None:
        counts = self.counts
        for receipt in receipts:
            if self.on_receipt is not None:
                self.on_receipt(receipt)
            self.latencies.add(receipt.latency_s, receipt.rows)
            counts.stored += receipt.rows
            if receipt.dead_lettered:  # poison events: sent, dead-lettered instead of stored
                counts.poisoned += receipt.dead_lettered
                counts.count_reasons(receipt.reasons)
            counts.alerts += receipt.alerts
            merge_counters(counts.steps, receipt.counters)
            if receipt.derived is not None and receipt.derived.num_rows:
                counts.derived += receipt.derived.num_rows
                self.route(receipt.derived, hops=1)
            if self.sizer is not None:
                self.sizer.observe(receipt.partition, receipt.rows, receipt.apply_s)

    def advance_watermark(self, watermark_us: int | None, final: bool = False) -> None:
        """Tell every partition's steps where the watermark stands (see
        :meth:`pipelines.processing.Step.on_watermark`): a zero-row batch after everything
        queued, in sequence like any batch (so it is replayed after a recovery)."""
        self.flush()
        mark = watermark_batch(self.routed_schema, watermark_us, final)
        for partition in range(self.partitions):
            self.executor.submit(partition, self.seqs[partition], mark)
            self.seqs[partition] += 1

    def checkpoint(self, epoch: int, meanwhile: Callable[[], None] = lambda: None) -> dict[int, int]:
        """Every partition's state for ``epoch``, once nothing is queued or in flight and no
        acknowledged batch brings derived events to dispatch; ``meanwhile`` runs (once) while
        the partitions write theirs."""
        while True:
            self.flush()
            collect = self.executor.ask_checkpoint(epoch)
            meanwhile()
            meanwhile = lambda: None  # noqa: E731 (a retake does not run it again)
            seqs = collect()
            self.acknowledge(self.executor.poll())
            if self.queues.empty():
                return seqs
