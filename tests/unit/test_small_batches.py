"""The driver's per-batch paths give the same results on a batch of one event as on many.

A live source reads batches of one to a few events, where each Polars call's fixed cost
dominates: the normaliser runs a JSON payload in one lazy plan, the arrival guard decides in
numpy, the router takes lanes in Arrow, the partition split skips or shrinks its gather.
Each is checked here against the general path (or a plain model of it) on random batches
mixing valid, malformed, duplicate, late and out-of-range events.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipelines.keyed
from pipelines.arrival import ArrivalGuard, KeyOf, _LatestTimes
from pipelines.dedup import DuplicateFilter
from pipelines.hashing import partition_of
from pipelines.keyed import split_by_partition
from pipelines.normalise import Normaliser
from pipelines.normalise_small import SMALL_BATCH_ROWS
from pipelines.pipeline import load_pipeline
from pipelines.routing import Router
from pipelines.sources import RawBatch
from pipelines.testing import FakeClock
from tests.support import CONFIGS, EVENTS_SPEC, START

LIVE_SPEC = load_pipeline(CONFIGS / "live.yaml")
#: How a test line departs from a valid transaction (``None``: it does not).
DEFECTS = [None, None, None, "not-json", "not-utf8", "array", "no-type", "bad-type", "bad-time",
           "future-time", "ancient-time", "bad-amount", "no-customer", "newer-version",
           "fractional-version", "long-correlation", "label", "untyped", "no-id", "repeat"]


def transaction(index: int, customer: int, minute: int, amount: float) -> dict[str, Any]:
    """A live transaction event (configs/live.yaml) at ``minute`` past 2024-06-01 10:00."""
    when = dt.datetime(2024, 6, 1, 10, tzinfo=dt.UTC) + dt.timedelta(minutes=minute)
    return {
        "eventId": f"tx-{index}", "eventType": "transaction.created",
        "timestamp": when.isoformat().replace("+00:00", "Z"), "source": "card-network",
        "correlationId": str(customer),
        "data": {"TRANSACTION_ID": index, "TX_DATETIME": when.strftime("%Y-%m-%dT%H:%M:%S"),
                 "CUSTOMER_ID": customer, "TERMINAL_ID": customer % 3, "TX_AMOUNT": amount,
                 "TX_TIME_SECONDS": minute * 60, "TX_TIME_DAYS": 0, "TX_FRAUD": 0,
                 "TX_FRAUD_SCENARIO": 0},
        "metadata": {"version": "1", "region": "eu-west"},
    }


def defective(event: dict[str, Any], defect: str | None, earlier: list[bytes]) -> bytes:
    """The event's line with ``defect`` (see :data:`DEFECTS`)."""
    plain = {"not-json": b"{not json", "not-utf8": b"\xff\xfe{}", "array": b"[1, 2]"}
    if defect in plain:
        return plain[defect]
    if defect == "repeat" and earlier:
        return earlier[0]
    changes = {
        "no-type": lambda e: e.pop("eventType"),
        "bad-type": lambda e: e.update(eventType="Not A Type"),
        "bad-time": lambda e: e.update(timestamp="yesterday"),
        "future-time": lambda e: e.update(timestamp="2031-01-01T00:00:00Z"),
        "ancient-time": lambda e: e.update(timestamp="2024-01-01T00:00:00Z"),
        "bad-amount": lambda e: e["data"].update(TX_AMOUNT="lots"),
        "no-customer": lambda e: e["data"].pop("CUSTOMER_ID"),
        "newer-version": lambda e: e["metadata"].update(version="9"),
        "fractional-version": lambda e: e["metadata"].update(version=1.5),
        "long-correlation": lambda e: e.update(correlationId="c" * 300),
        "label": lambda e: e.update(eventType="fraud.reported"),
        "untyped": lambda e: e.update(eventType="other.thing"),
        "no-id": lambda e: e.pop("eventId"),
    }
    if defect in changes:
        changes[defect](event)
    return json.dumps(event).encode()


@st.composite
def live_lines(draw: st.DrawFn) -> list[bytes]:
    """Up to 25 lines: transactions of a few customers, some of them defective."""
    rows = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 50), st.sampled_from(DEFECTS),
                                   st.sampled_from([10.0, 250.0])), min_size=1, max_size=25))
    lines: list[bytes] = []
    for index, (customer, minute, defect, amount) in enumerate(rows):
        lines.append(defective(transaction(index, customer, minute, amount), defect, lines))
    return lines


def raw_batch(lines: list[bytes], first: int) -> RawBatch:
    return RawBatch("card-network", "p-1", np.arange(first, first + len(lines)),
                    pa.record_batch({"line": pa.array(lines, pa.binary())}))


def normalised(lines: list[bytes], size: int, stepwise: bool = False, spec=LIVE_SPEC,
               by_arrival: bool = True, python: bool = False) -> list[tuple[pa.Table, pa.Table]]:
    """Each ``size``-line batch's (events, dead letters), by the stepwise path, the one
    plan, or (``python``) the Python path for small batches of plainly valid events, which
    falls back on the plan."""
    clock = FakeClock(START)
    normaliser, duplicates = Normaliser(spec, clock.now), DuplicateFilter()
    normaliser.small.enabled = python
    out = []
    for first in range(0, len(lines), size):
        raw = raw_batch(lines[first:first + size], first)
        clock.sleep(0.25)
        if stepwise:
            now = clock.now()
            arrived = int(now.timestamp() * 1e6) if by_arrival else None
            batch = normaliser._normalise_stepwise(raw, duplicates, arrived, now)
        else:
            batch = normaliser.normalise(raw, duplicates, dedup_by_arrival=by_arrival)
            assert python or normaliser._fused_plans, "a JSON payload takes the one-plan path"
        out.append((batch.events, batch.deadletters))
    return out


def assert_same_batches(got: list[tuple[pa.Table, pa.Table]],
                        expected: list[tuple[pa.Table, pa.Table]]) -> None:
    assert len(got) == len(expected)
    for (events, dead), (want_events, want_dead) in zip(got, expected, strict=True):
        assert events.schema == want_events.schema and dead.schema == want_dead.schema
        assert events.to_pylist() == want_events.to_pylist()
        assert dead.to_pylist() == want_dead.to_pylist()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(live_lines(), st.sampled_from([1, 3, 25]), st.booleans())
def test_one_plan_normalises_as_the_stepwise_path(lines: list[bytes], size: int,
                                                  by_arrival: bool) -> None:
    assert_same_batches(normalised(lines, size, stepwise=False, by_arrival=by_arrival),
                        normalised(lines, size, stepwise=True, by_arrival=by_arrival))


@pytest.mark.parametrize("size", [1, 4, 100])
def test_one_plan_gives_every_reason_and_message_of_the_stepwise_path(size: int) -> None:
    lines: list[bytes] = []
    for index, defect in enumerate(DEFECTS * 3):
        lines.append(defective(transaction(index, index % 4, index % 7, 250.0), defect, lines))
    fused = normalised(lines, size, stepwise=False)
    assert_same_batches(fused, normalised(lines, size, stepwise=True))
    reasons = {r for _, dead in fused for r in dead.column("reason").to_pylist()}
    assert reasons >= {"bad_json", "bad_encoding", "not_an_object", "missing_event_type",
                       "bad_event_type", "bad_timestamp", "timestamp_out_of_range", "bad_field",
                       "missing_field", "bad_version", "duplicate_event_id"}


def test_one_plan_normalises_untyped_payloads_as_the_stepwise_path() -> None:
    def seed(**changes: Any) -> bytes:
        event = {"eventId": "e", "eventType": "user.login", "timestamp": "2024-05-01T10:00:00Z",
                 "correlationId": "c7", "data": {"n": 1}, "metadata": {"version": "1.0"}}
        return json.dumps(event | changes).encode()

    lines = [seed(), seed(eventId="f", data={"n": "x" * 5000}), seed(eventType="Bad"), seed(),
             seed(eventId="g", timestamp="2300-01-01T00:00:00Z"), b"{}", seed(eventId=[1])]
    for size in (1, 7):
        assert_same_batches(normalised(lines, size, stepwise=False, spec=EVENTS_SPEC),
                            normalised(lines, size, stepwise=True, spec=EVENTS_SPEC))


#: Departures from a valid transaction that the Python path must either normalise exactly
#: as the plan does or decline (the plan then decides): valid variants, borderline and
#: hostile ones.
VARIANTS: dict[str, Any] = {
    "fraction-time": lambda e: e.update(timestamp="2024-06-01T10:05:00.123Z"),
    "long-fraction": lambda e: e.update(timestamp="2024-06-01T10:05:00.1234567Z"),
    "space-time": lambda e: e.update(timestamp="2024-06-01 10:05:00"),
    "naive-time": lambda e: e.update(timestamp="2024-06-01T10:05:00"),
    "offset-time": lambda e: e.update(timestamp="2024-06-01T12:05:00+02:00"),
    "padded-time": lambda e: e.update(timestamp=" 2024-06-01T10:05:00Z "),
    "epoch-time": lambda e: e.update(timestamp=1717236300),
    "no-date": lambda e: e.update(timestamp="2024-02-30T10:05:00Z"),
    "old-time": lambda e: e.update(timestamp="1600-01-01T00:00:00Z"),
    "fraction-field": lambda e: e["data"].update(TX_DATETIME="2024-06-01T10:05:00.5"),
    "int-amount": lambda e: e["data"].update(TX_AMOUNT=250),
    "long-float": lambda e: e["data"].update(TX_AMOUNT=0.12345678901234568),
    "exp-float": lambda e: e["data"].update(TX_AMOUNT=2.5e-8),
    "huge-int-amount": lambda e: e["data"].update(TX_AMOUNT=2 ** 60 + 1),
    "text-int": lambda e: e["data"].update(CUSTOMER_ID="7"),
    "float-int": lambda e: e["data"].update(TERMINAL_ID=3.0),
    "bool-int": lambda e: e["data"].update(TX_FRAUD=True),
    "big-int": lambda e: e["data"].update(TRANSACTION_ID=2 ** 70),
    "null-field": lambda e: e["data"].update(TX_FRAUD=None),
    "nested-extra": lambda e: e["data"].update(EXTRA={"a": [1, 2.5]}),
    "zero-customer": lambda e: e["data"].update(CUSTOMER_ID=0),
    "negative-customer": lambda e: e["data"].update(CUSTOMER_ID=-12),
    "int-version": lambda e: e["metadata"].update(version=1),
    "dotted-version": lambda e: e["metadata"].update(version="1.2.3"),
    "zero-version": lambda e: e["metadata"].update(version=0),
    "no-metadata": lambda e: e.pop("metadata"),
    "null-metadata": lambda e: e.update(metadata=None),
    "text-metadata": lambda e: e.update(metadata="v1"),
    "no-region": lambda e: e["metadata"].pop("region"),
    "number-region": lambda e: e["metadata"].update(region=7),
    "tagged": lambda e: e["metadata"].update(team="risk ü", shard=3),
    "float-tag": lambda e: e["metadata"].update(weight=1.5),
    "nested-tag": lambda e: e["metadata"].update(more={"a": 1}),
    "no-correlation": lambda e: e.pop("correlationId"),
    "empty-correlation": lambda e: e.update(correlationId=""),
    "no-source": lambda e: e.pop("source"),
    "null-source": lambda e: e.update(source=None),
    "empty-source": lambda e: e.update(source=""),
    "number-id": lambda e: e.update(eventId=12345),
    "null-id": lambda e: e.update(eventId=None),
    "long-id": lambda e: e.update(eventId="i" * 129),
    "literal-id": lambda e: e.update(eventId="null"),
    "bracket-id": lambda e: e.update(eventId="[x]"),
    "unicode-id": lambda e: e.update(eventId=e["eventId"] + "-é"),
    "newline-id": lambda e: e.update(eventId=e["eventId"] + "\n"),
    "no-data": lambda e: e.pop("data"),
    "list-data": lambda e: e.update(data=[1]),
}


def variant(index: int, customer: int, name: str | None, ascii_only: bool,
            earlier: list[bytes]) -> bytes:
    event = transaction(index, customer, index % 50, 250.0)
    if name in VARIANTS:
        VARIANTS[name](event)
        return json.dumps(event, ensure_ascii=ascii_only).encode()
    if name == "dup-key":  # the same key twice: which wins differs between JSON parsers
        return json.dumps(event).encode().replace(b'"source"', b'"source": "x", "source"')
    if name == "nan":
        return json.dumps(event | {"score": float("nan")}).encode()
    return defective(event, name, earlier)


@st.composite
def variant_lines(draw: st.DrawFn) -> list[bytes]:
    names = st.sampled_from([None, None, *VARIANTS, "dup-key", "nan", *DEFECTS])
    rows = draw(st.lists(st.tuples(st.integers(1, 4), names, st.booleans()), min_size=1,
                         max_size=30))
    lines: list[bytes] = []
    for index, (customer, name, ascii_only) in enumerate(rows):
        lines.append(variant(index, customer, name, ascii_only, lines))
    return lines


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variant_lines(), st.sampled_from([1, 4, 30]), st.booleans())
def test_the_python_path_normalises_as_the_plan_or_declines(lines: list[bytes], size: int,
                                                             by_arrival: bool) -> None:
    assert_same_batches(normalised(lines, size, python=True, by_arrival=by_arrival),
                        normalised(lines, size, by_arrival=by_arrival))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_is_normalised_as_the_plan_or_declined(name: str) -> None:
    lines = [variant(i, i % 3, name if i % 2 else None, i % 4 == 1, []) for i in range(6)]
    for size in (1, 6):
        assert_same_batches(normalised(lines, size, python=True), normalised(lines, size))


def test_plainly_valid_events_take_the_python_path() -> None:
    """Valid transactions of every plain form are normalised without a plan (the test
    fails if the Python path declines them all)."""
    plain = [None, "fraction-time", "space-time", "naive-time", "int-amount", "int-version",
             "no-metadata", "no-region", "tagged", "no-correlation", "no-source", "unicode-id",
             "no-id"]
    lines = [variant(i, i % 3, name, False, []) for i, name in enumerate(plain)]
    clock = FakeClock(START)
    normaliser, duplicates = Normaliser(LIVE_SPEC, clock.now), DuplicateFilter()
    for first in range(0, len(lines), 3):
        batch = normaliser.normalise(raw_batch(lines[first:first + 3], first), duplicates,
                                     dedup_by_arrival=True)
        assert batch.events.num_rows == len(lines[first:first + 3])
    again = normaliser.normalise(raw_batch(lines[:2], 0), duplicates, dedup_by_arrival=True)
    assert again.events.num_rows == 0 and again.deadletters.num_rows == 2  # retried: duplicates
    assert not normaliser._fused_plans, "no batch needed the plan"
    assert_same_batches(normalised(lines, 3, python=True), normalised(lines, 3))
    # beyond SMALL_BATCH_ROWS, batch operations: the per-row path's cost stays bounded
    many = [variant(100 + i, i % 7, None, False, []) for i in range(SMALL_BATCH_ROWS + 1)]
    batch = normaliser.normalise(raw_batch(many, 100), duplicates, dedup_by_arrival=True)
    assert batch.events.num_rows == len(many) and normaliser._fused_plans


# -- the arrival guard ---------------------------------------------------------------------


class GuardModel:
    """The arrival guard's rule, one event at a time (the plain statement of it)."""

    def __init__(self, dimensions: list[str], horizon: int | None) -> None:
        self.latest: dict[str, dict[str, int]] = {d: {} for d in dimensions}
        self.horizon, self.newest = horizon, None

    def late(self, rows: list[dict[str, Any]], considered: list[bool]) -> list[bool]:
        late = [False] * len(rows)
        for name, latest in self.latest.items():
            for i, row in enumerate(rows):
                key = row[name]
                if not considered[i] or key is None:
                    continue
                late[i] |= key in latest and row["ts"] < latest[key]
                latest[key] = max(latest.get(key, row["ts"]), row["ts"])
                self.newest = row["ts"] if self.newest is None else max(self.newest, row["ts"])
        if self.horizon is not None and self.newest is not None:
            for name, latest in self.latest.items():
                self.latest[name] = {k: t for k, t in latest.items()
                                     if t >= self.newest - self.horizon}
        return late


GUARD_ROWS = st.lists(st.fixed_dictionaries({
    "key": st.sampled_from(["a", "b", "c", None]),
    "terminal": st.sampled_from(["x", "y", None]),
    "ts": st.integers(0, 30)}), min_size=0, max_size=12)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(GUARD_ROWS, st.lists(st.booleans(), min_size=12, max_size=12)),
                min_size=1, max_size=6), st.sampled_from([None, 5]))
def test_arrival_guard_decides_as_one_event_at_a_time(batches: list, horizon: int | None) -> None:
    guard = ArrivalGuard({"key": KeyOf("key"), "terminal": KeyOf("terminal")}, horizon)
    model = GuardModel(["key", "terminal"], horizon)
    for rows, mask in batches:
        considered = mask[:len(rows)]
        table = pa.table({"key": pa.array([r["key"] for r in rows], pa.string()),
                          "terminal": pa.array([r["terminal"] for r in rows], pa.string()),
                          "ts": pa.array([r["ts"] for r in rows], pa.int64())})
        got = guard.late(table, "ts", np.array(considered, bool))
        assert got.tolist() == model.late(rows, considered)
    for name, latest in guard.latest.items():
        assert dict(latest.iter_rows()) == model.latest[name]
    restored = ArrivalGuard({"key": KeyOf("key"), "terminal": KeyOf("terminal")}, horizon)
    restored.restore(guard.snapshot())
    assert {n: dict(f.iter_rows()) for n, f in restored.latest.items()} == model.latest


@pytest.mark.parametrize("horizon", [None, 300])
@pytest.mark.parametrize("weak_hash", [False, True])
def test_arrival_guard_holds_thousands_of_keys_exactly(
        weak_hash: bool, horizon: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the index's rebuilds (thousands of keys, forgotten ones too) and with a first
    hash shared by many keys (forced here with a weak one: in practice two keys whose 64-bit
    hashes collide), every key keeps its own latest time."""
    if weak_hash:
        real = _LatestTimes.hashes
        monkeypatch.setattr(_LatestTimes, "hashes", staticmethod(
            lambda keys: (real(keys)[0] % np.uint64(7), real(keys)[1])))
    rng = np.random.default_rng(3)
    guard, model = ArrivalGuard({"key": KeyOf("key")}, horizon), GuardModel(["key"], horizon)
    for batch in range(12):
        keys = [f"k{v}" for v in rng.integers(0, 5000, 600)]
        times = (rng.integers(0, 400, 600) + 60 * batch).tolist()
        table = pa.table({"key": pa.array(keys, pa.string()), "ts": pa.array(times, pa.int64())})
        rows = [{"key": k, "ts": t} for k, t in zip(keys, times, strict=True)]
        assert guard.late(table, "ts").tolist() == model.late(rows, [True] * len(rows))
    assert dict(guard.latest["key"].iter_rows()) == model.latest["key"]
    restored = ArrivalGuard({"key": KeyOf("key")}, horizon)
    restored.restore(guard.snapshot())
    late = pa.table({"key": pa.array(["k1", "k2"], pa.string()), "ts": pa.array([0, 10**6], pa.int64())})
    assert restored.late(late, "ts").tolist() == model.late(
        [{"key": "k1", "ts": 0}, {"key": "k2", "ts": 10**6}], [True, True])


# -- routing and the partition split -------------------------------------------------------


def envelope_batch(seed: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    lines = [json.dumps(transaction(i, int(rng.integers(1, 6)), i, float(rng.choice([10, 250]))
                                    )).encode() for i in range(rows)]
    events = Normaliser(LIVE_SPEC, FakeClock(START).now).normalise(raw_batch(lines, 0)).events
    types = rng.choice(["transaction.created", "fraud.reported", "other.thing"], rows)
    return events.set_column(1, "event_type", pa.array(types.tolist(), pa.string()))


@pytest.mark.parametrize(("seed", "rows"), [(0, 1), (1, 2), (2, 9), (3, 40)])
def test_router_lanes_promote_a_keys_earlier_events_with_its_high_one(seed: int, rows: int) -> None:
    events = envelope_batch(seed, rows)
    routed = Router(LIVE_SPEC).route(events)
    frame = pl.from_arrow(events).with_row_index("row")
    high = (pl.col("event_type").str.starts_with("transaction.")
            & (pl.col("data").struct.field("TX_AMOUNT") > 220))
    last_high = pl.col("row").filter(high).max().over("key")
    expected = frame.with_columns(high=(pl.col("row") <= last_high).fill_null(False))
    assert routed.high.to_pylist() == events.filter(expected["high"].to_arrow()).to_pylist()
    assert routed.normal.to_pylist() == events.filter(
        pa.array(~expected["high"].to_numpy())).to_pylist()
    assert routed.filtered == 0 and routed.derived.num_rows == 0
    assert routed.high.schema == routed.normal.schema == events.schema


@pytest.mark.parametrize("gather_rows", [1024, 2])
@pytest.mark.parametrize(("seed", "rows"), [(0, 1), (1, 3), (2, 30)])
def test_split_by_partition_keeps_each_keys_order(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                  rows: int, gather_rows: int) -> None:
    monkeypatch.setattr(pipelines.keyed, "_POLARS_GATHER_ROWS", gather_rows)
    events = envelope_batch(seed, rows)
    owner = partition_of(events.column("key"), 3)
    expected = [(p, events.filter(pa.array(owner == p)).to_pylist()) for p in range(3)
                if (owner == p).any()]
    split = split_by_partition(events, 3)
    assert [(p, piece.to_pylist()) for p, piece in split] == expected
    assert all(piece.schema == events.schema for _, piece in split)


@pytest.mark.parametrize("rows", [1, 3])
def test_router_without_routes_keeps_every_row_in_the_normal_lane(rows: int) -> None:
    events = envelope_batch(rows, rows)
    routed = Router(EVENTS_SPEC).route(events)
    assert routed.normal.to_pylist() == events.to_pylist() and routed.high.num_rows == 0


# -- the enrichment stages' input -------------------------------------------------------


@pytest.mark.parametrize("reads_all", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_stages_rows_made_in_arrow_are_the_polars_plans(tmp_path, rows: int,
                                                          reads_all: bool) -> None:
    """What crosses to a stage's actors (its event types' rows, the fields it reads, its
    key as text) is the same, types included, as the Polars plan gives."""
    from cluster.enrichment import EnrichmentChain
    from cluster.partitions import LocalPartitions
    from pipelines.processing import ROW_POSITION

    kinds = [None, "label", "untyped", None, "no-id"]
    lines = [defective(transaction(i, i % 5, i, 10.0 + i), kinds[i % len(kinds)], [])
             for i in range(rows)]
    events = Normaliser(LIVE_SPEC, FakeClock(START).now).normalise(raw_batch(lines, 0)).events
    stage = LIVE_SPEC.enrich[0]
    chain = EnrichmentChain(LIVE_SPEC, [LocalPartitions(1, tmp_path, "r", LIVE_SPEC, stage)],
                            {stage.name: [0]})
    if reads_all:
        chain.reads[0] = None
    table = events.add_column(0, ROW_POSITION, pa.array(np.arange(events.num_rows), pa.int64()))
    for piece in (table, table.slice(0, 0)):
        arrow, planned = chain._stage_rows(piece, 0), chain._planned_rows(piece, 0)
        assert arrow.schema == planned.schema
        assert arrow.to_pylist() == planned.to_pylist()
    assert chain._stage_rows(table, 0).num_rows == sum(kinds[i % len(kinds)] != "untyped"
                                                       for i in range(rows))
