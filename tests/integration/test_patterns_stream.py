"""Patterns on a real local Ray: the stream's matches equal ``eventray mine``'s over the
store it wrote and a brute-force reference's, for the four kinds the issue names (a relaxed
sequence with ``times``, an absence keyed by ``correlation_id``, a correlation sequence
across event types, a ``distinct`` aggregation), in order and shuffled within lateness.

Events are generated here in the seed's JSON Lines schema; the patterns are written in the
YAML syntax of the docs.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from pipelines import Pipeline
from tests.unit.test_patterns_reference import Ev, StepPlan, reference

EVENTRAY = str(Path(sys.executable).parent / "eventray")
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)

PATTERNS_YAML = """
patterns:
  - name: card-testing
    key: data.customer
    within: 10m
    skip: skip_past_last_event
    steps:
      - name: small
        event_types: [transaction.created]
        where: "data.amount < 5"
        times: 3
      - name: big
        event_types: [transaction.created]
        where: "data.amount > 200"
        contiguity: followed_by
    emit: fraud.card_testing
  - name: paid-not-shipped
    key: correlation_id
    within: 48h
    steps:
      - {name: paid, event_types: [payment.received]}
      - {name: shipped, event_types: [shipment.sent], negated: true}
    emit: order.unshipped
  - name: order-journey
    key: correlation_id
    within: 48h
    steps:
      - {name: placed, event_types: [order.placed]}
      - {name: paid, event_types: [payment.received]}
      - {name: shipped, event_types: [shipment.sent]}
    emit: order.fulfilled
  - name: terminal-hopping
    key: data.customer
    aggregate: {event_types: [transaction.created], distinct: data.terminal, over: 1h, at_least: 3}
    emit: fraud.terminal_hopping
"""


def generate(seed: int = 11) -> list[dict[str, Any]]:
    """Card transactions (with planted card testing) and orders over two days, in the seed's
    schema; each event's minute, ids sortable in event-time order."""
    rng = random.Random(seed)
    rows: list[tuple[int, str, str, dict[str, Any]]] = []  # (minute, type, correlation, data)
    for c in range(30):
        minute = rng.randint(0, 600)
        for _ in range(rng.randint(20, 60)):
            minute += rng.choice([0, 1, 2, 5, 15, 40])
            amount = rng.choice([1, 2, 3, 4, 20, 50, 90, 150, 250, 400])
            terminal = f"t{rng.randint(0, 4) if rng.random() < 0.5 else rng.randint(0, 60)}"
            rows.append((minute, "transaction.created", f"tx-{c}-{minute}",
                         {"customer": f"c{c}", "amount": float(amount), "terminal": terminal}))
    for o in range(120):
        placed = rng.randint(0, 2000)
        rows.append((placed, "order.placed", f"o{o}", {"order": f"o{o}"}))
        if rng.random() < 0.85:
            paid = placed + rng.randint(5, 90)
            rows.append((paid, "payment.received", f"o{o}", {"order": f"o{o}"}))
            if rng.random() < 0.7:
                rows.append((paid + rng.choice([30, 600, 2000, 2870, 2880, 2900, 4000]),
                             "shipment.sent", f"o{o}", {"order": f"o{o}"}))
    rows.sort(key=lambda r: (r[0], rng.random()))
    return [{"eventId": f"ev-{i:06d}", "eventType": kind,
             "timestamp": (T0 + dt.timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
             "source": "generator", "correlationId": correlation, "data": data,
             "metadata": {"version": "1"}, "_minute": minute}
            for i, (minute, kind, correlation, data) in enumerate(rows)]


def config(path: Path, lateness: str = "0s", by_customer: bool = True) -> dict[str, Any]:
    """The pipeline; ``by_customer``: transactions keyed by customer (the patterns' key),
    else by their correlation id (the patterns then see copies keyed by customer)."""
    transactions: dict[str, Any] = {"payload": {"customer": "str", "amount": "float", "terminal": "str"}}
    if by_customer:
        transactions["key"] = "customer"
    return {
        "name": "patterns-stream",
        "source": {"format": "jsonl", "path": [str(path)], "batch_size": 400,
                   "lateness": lateness, "order_ties_by": "event_id"},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "source": "source", "correlation_id": "correlationId",
                    "payload": {"json": "data"}, "metadata": {"json": "metadata"}},
        "event_types": {"transaction.created": transactions},
        "runtime": {"partitions": 2, "checkpoint_every": 3},
        **yaml.safe_load(PATTERNS_YAML),
    }


# -- the reference --------------------------------------------------------------------------


def _evs(events: list[dict[str, Any]], types: set[str], key: Any) -> list[Ev]:
    return [Ev(e["eventId"], e["eventType"], e["_minute"], key(e), int(e["data"].get("amount", 0)))
            for e in events if e["eventType"] in types]


def reference_matches(events: list[dict[str, Any]]) -> Counter[tuple[str, str, tuple[str, ...]]]:
    tx = {"transaction.created"}
    customer = lambda e: e["data"]["customer"]  # noqa: E731
    correlation = lambda e: e["correlationId"]  # noqa: E731
    card = [StepPlan("small", ["transaction.created"], "", lambda e, b: e.v < 5, 3, 3),
            StepPlan("big", ["transaction.created"], "", lambda e, b: e.v > 200)]
    unshipped = [StepPlan("paid", ["payment.received"], None, lambda e, b: True),
                 StepPlan("shipped", ["shipment.sent"], None, lambda e, b: True, negated=True)]
    journey = [StepPlan(n, [t], None, lambda e, b: True) for n, t in
               (("placed", "order.placed"), ("paid", "payment.received"), ("shipped", "shipment.sent"))]
    orders = {"order.placed", "payment.received", "shipment.sent"}
    found: Counter[tuple[str, str, tuple[str, ...]]] = Counter()
    for name, plans, within, skip, types, key in (
            ("card-testing", card, 10, "skip_past_last_event", tx, customer),
            ("paid-not-shipped", unshipped, 48 * 60, "no_skip", orders, correlation),
            ("order-journey", journey, 48 * 60, "no_skip", orders, correlation)):
        for k, ids in reference(plans, within, skip, _evs(events, types, key)):
            found[(name, k, ids)] += 1
    for k, ids in distinct_reference(events, 60, 3):
        found[("terminal-hopping", k, ids)] += 1
    return found


def distinct_reference(events: list[dict[str, Any]], over: int,
                       at_least: int) -> list[tuple[str, tuple[str, ...]]]:
    """At each of a customer's transactions, the distinct terminals among the customer's
    transactions so far within (t - over, t]; a match where that first reaches ``at_least``."""
    out, history, above = [], {}, {}
    for e in events:
        if e["eventType"] != "transaction.created":
            continue
        key = e["data"]["customer"]
        window = [w for w in history.get(key, []) if w["_minute"] > e["_minute"] - over] + [e]
        history[key] = window
        now = len({w["data"]["terminal"] for w in window}) >= at_least
        if now and not above.get(key, False):
            out.append((key, tuple(w["eventId"] for w in window)))
        above[key] = now
    return out


# -- the stream and the offline twin ---------------------------------------------------------


def stream_matches(store: Path) -> Counter[tuple[str, str, tuple[str, ...]]]:
    events = pl.read_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    found = events.filter(pl.col("source") == "processor:patterns")
    data = found["data"].struct
    return Counter(zip(data.field("pattern").to_list(), found["key"].to_list(),
                       [tuple(ids) for ids in data.field("event_ids").to_list()], strict=True))


def mined(store: Path, patterns: Path, out: Path) -> Counter[tuple[str, str, tuple[str, ...]]]:
    result = subprocess.run([EVENTRAY, "mine", "--store", str(store), "--patterns", str(patterns),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = pl.read_parquet(out / "matches.parquet")
    assert rows.schema["event_ids"] == pl.List(pl.String)
    return Counter(zip(rows["pattern"].to_list(), rows["key"].to_list(),
                       [tuple(ids) for ids in rows["event_ids"].to_list()], strict=True))


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "_minute"}) + "\n"
                            for e in events))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], Path]:
    folder = tmp_path_factory.mktemp("patterns")
    events = generate()
    write_jsonl(folder / "events.jsonl", events)
    (folder / "patterns.yaml").write_text(PATTERNS_YAML)
    return folder, events, folder / "patterns.yaml"


@pytest.mark.slow
def test_stream_equals_mine_equals_reference_on_ray(
        ray_local: object, generated: tuple[Path, list[dict[str, Any]], Path], tmp_path: Path) -> None:
    folder, events, patterns = generated
    expected = reference_matches(events)
    kinds = Counter(name for name, _, _ in expected.elements())
    assert all(kinds[n] >= 3 for n in ("card-testing", "paid-not-shipped", "order-journey",
                                       "terminal-hopping")), kinds
    summary = Pipeline.from_dict(config(folder / "events.jsonl")).run(
        store=tmp_path / "store", runner="ray")
    assert summary["ray"] in ("embedded", "existing")
    assert summary["pattern_matches"] == sum(expected.values())
    assert summary["pattern_cap_hits"] == 0 and summary["max_pattern_partial_matches"] >= 1
    assert stream_matches(tmp_path / "store") == expected
    assert mined(tmp_path / "store", patterns, tmp_path / "mined") == expected


@pytest.mark.slow
def test_out_of_order_input_repartitioned_by_the_pattern_key_gives_the_same_matches(
        ray_local: object, generated: tuple[Path, list[dict[str, Any]], Path], tmp_path: Path) -> None:
    """Shuffled within lateness, and transactions keyed by their correlation id: the
    customer-keyed patterns see copies of them keyed by customer."""
    folder, events, patterns = generated
    rng = random.Random(5)
    shuffled = sorted(events, key=lambda e: e["_minute"] + rng.uniform(0, 20))
    assert shuffled != events
    write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    summary = Pipeline.from_dict(config(tmp_path / "shuffled.jsonl", lateness="30m",
                                        by_customer=False)).run(store=tmp_path / "store", runner="ray")
    assert summary["dead_lettered"] == 0
    assert stream_matches(tmp_path / "store") == reference_matches(events)
    assert mined(tmp_path / "store", patterns, tmp_path / "mined") == reference_matches(events)
