"""System (c): a port of the classic per-event "EventDrivenPattern" reference design.

The design, as such systems are written: an :class:`EventBus` where processors register
for event types; every event is an object handed to each registered processor's
``handle_event`` (the original's ``handleEvent``), one event at a time; processors publish
new events to the bus. For the fraud workload:

    transaction.created --> FeatureProcessor --> transaction.enriched
    transaction.enriched --> ScoringProcessor (one model call per event) --> transaction.scored
    transaction.scored --> AlertProcessor --> fraud.suspected (score >= threshold)
    every type --> StoreProcessor (buffers rows, writes Parquet every ``flush_every`` rows)

It is written plainly and not slowed on purpose: per-key windows keep O(1) running sums
(:mod:`cluster.bench.keyed_windows`), the model call skips scikit-learn's finiteness check
and runs on one thread, the store writes in chunks. What makes it slow is what defines the
design: Python objects
and calls per event, and a model call per event.

Run as ``python -m cluster.bench.per_event --input F... --registry DIR --model NAME --out DIR``;
the last stdout line is a JSON result. ``--max-seconds`` stops it after that long (the
events processed by then are counted and written), so a bench over millions of events
stays short.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.bench.keyed_windows import FEATURES, CustomerWindows, TerminalWindows, calendar


@dataclass
class Event:
    """One event on the bus: a type, a key and a payload dict."""

    event_type: str
    key: str
    payload: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


class Processor:
    """A processor registered for event types on the bus."""

    def handle_event(self, event: Event, bus: EventBus) -> None:
        raise NotImplementedError


class EventBus:
    """Processors by event type; ``publish`` hands an event to each, synchronously, in order."""

    def __init__(self) -> None:
        self.processors: dict[str, list[Processor]] = defaultdict(list)

    def subscribe(self, event_type: str, processor: Processor) -> None:
        self.processors[event_type].append(processor)

    def publish(self, event: Event) -> None:
        for processor in self.processors.get(event.event_type, ()):
            processor.handle_event(event, self)
        for processor in self.processors.get("*", ()):
            processor.handle_event(event, self)


class FeatureProcessor(Processor):
    """Per-customer and per-terminal windows; publishes ``transaction.enriched``."""

    def __init__(self) -> None:
        self.customers: dict[int, CustomerWindows] = defaultdict(CustomerWindows)
        self.terminals: dict[int, TerminalWindows] = defaultdict(TerminalWindows)

    def handle_event(self, event: Event, bus: EventBus) -> None:
        tx = event.payload
        t_us = tx["TX_TIME_US"]
        features = (tx["TX_AMOUNT"], *calendar(t_us),
                    *self.customers[tx["CUSTOMER_ID"]].update(t_us, tx["TX_AMOUNT"]),
                    *self.terminals[tx["TERMINAL_ID"]].update(t_us, tx["TX_FRAUD"]))
        bus.publish(Event("transaction.enriched", event.key, {**tx, "features": features}))


class ScoringProcessor(Processor):
    """One model call per event; publishes ``transaction.scored``."""

    def __init__(self, predict_proba: Callable[[np.ndarray], np.ndarray]) -> None:
        self.predict_proba = predict_proba

    def handle_event(self, event: Event, bus: EventBus) -> None:
        row = np.asarray(event.payload["features"], dtype=np.float64).reshape(1, -1)
        score = float(self.predict_proba(row)[0, 1])
        bus.publish(Event("transaction.scored", event.key, {**event.payload, "score": score}))


class AlertProcessor(Processor):
    """Publishes ``fraud.suspected`` for a score at or above the threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def handle_event(self, event: Event, bus: EventBus) -> None:
        score = event.payload["score"]
        if score >= self.threshold:
            bus.publish(Event("fraud.suspected", event.key, {
                "TRANSACTION_ID": event.payload["TRANSACTION_ID"], "score": score,
                "threshold": self.threshold}))


class StoreProcessor(Processor):
    """Buffers each table's rows and writes a Parquet file every ``flush_every`` rows."""

    TABLES = {"transaction.created": "events", "transaction.scored": "scores",
              "fraud.suspected": "alerts"}

    def __init__(self, out: Path, flush_every: int = 50_000) -> None:
        self.out, self.flush_every = out, flush_every
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.files = 0

    def handle_event(self, event: Event, bus: EventBus) -> None:
        table = self.TABLES.get(event.event_type)
        if table is None:
            return
        payload = event.payload
        if table == "scores":
            payload = {"TRANSACTION_ID": payload["TRANSACTION_ID"], "key": event.key,
                       **dict(zip(FEATURES, payload["features"], strict=True)),
                       "score": payload["score"]}
        rows = self.rows[table]
        rows.append(payload)
        if len(rows) >= self.flush_every:
            self.flush(table)

    def flush(self, table: str | None = None) -> None:
        for name in [table] if table else list(self.rows):
            rows = self.rows[name]
            if rows:
                (self.out / name).mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(rows), self.out / name / f"part-{self.files:05d}.parquet")
                self.files += 1
                rows.clear()


def build_bus(predict_proba: Callable[[np.ndarray], np.ndarray], threshold: float,
              out: Path) -> tuple[EventBus, StoreProcessor]:
    """The design's wiring: processors registered per event type."""
    bus, store = EventBus(), StoreProcessor(out)
    bus.subscribe("transaction.created", FeatureProcessor())
    bus.subscribe("transaction.enriched", ScoringProcessor(predict_proba))
    bus.subscribe("transaction.scored", AlertProcessor(threshold))
    bus.subscribe("*", store)
    return bus, store


def transactions(files: list[Path]) -> Iterator[Event]:
    """The input, one ``transaction.created`` event per row, in file order."""
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            rows = batch.to_pylist()
            micros = batch.column("TX_DATETIME").cast(pa.timestamp("us")).cast(pa.int64()).to_pylist()
            for row, t_us in zip(rows, micros, strict=True):
                row["TX_TIME_US"] = t_us
                yield Event("transaction.created", str(row["CUSTOMER_ID"]), row)


def run(files: list[Path], predict_proba: Callable[[np.ndarray], np.ndarray], threshold: float,
        out: Path, max_seconds: float | None = None) -> dict[str, Any]:
    """Publish every input event on the bus (or until ``max_seconds``); returns the result."""
    bus, store = build_bus(predict_proba, threshold, out)
    started = time.perf_counter()
    events, stopped = 0, False
    for event in transactions(files):
        bus.publish(event)
        events += 1
        if max_seconds is not None and events % 1000 == 0 and time.perf_counter() - started > max_seconds:
            stopped = True
            break
    store.flush()
    elapsed = time.perf_counter() - started
    return {"system": "per_event", "events": events, "elapsed_s": round(elapsed, 3),
            "events_per_s": round(events / elapsed, 1) if elapsed else None,
            "complete": not stopped}


def main(argv: list[str] | None = None) -> int:
    import sklearn
    from threadpoolctl import threadpool_limits

    from cluster.bench.workload import load_estimator, system_arguments

    parser = system_arguments("python -m cluster.bench.per_event")
    parser.add_argument("--max-seconds", type=float)
    args = parser.parse_args(argv)
    # One row per call: skip the finiteness check, and one thread (OpenMP's start-up per call
    # on a single row costs more than the prediction).
    sklearn.set_config(assume_finite=True)
    threadpool_limits(1)
    estimator = load_estimator(args.registry, args.model)
    result = run(args.input, estimator.predict_proba, args.threshold, args.out, args.max_seconds)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
