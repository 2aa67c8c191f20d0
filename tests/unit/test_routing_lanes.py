"""Routing (wildcards, filters, drops, priority, derived events, cycles) and the dispatch
lanes (high first, per-key order kept, coalescing under load, adaptive sizes)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.envelope import TIMESTAMP, envelope_schema
from pipelines.errors import ConfigError
from pipelines.event_ids import EVENTRAY_NAMESPACE
from pipelines.lanes import BatchSizer, LaneQueues
from pipelines.pipeline import load_pipeline
from pipelines.routing import Router
from pipelines.spec import AdaptiveBatching, PipelineSpec


def spec(routing: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "r", "source": {"format": "jsonl", "path": ["x"]},
        "mapping": {"event_type": "t", "timestamp": "ts"},
        "event_types": {"tx.created": {"payload": {"amount": "float"}, "key": "correlation_id"}},
        "routing": routing})


def events(rows: list[tuple[str, str, float | None]]) -> pa.Table:
    schema = envelope_schema(spec({}).registry())
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pa.Table.from_pylist([{
        "event_id": f"e{i}", "event_type": event_type, "timestamp": when, "source": "s",
        "correlation_id": key, "key": key, "data": {"amount": amount, "json": None},
        "metadata": {"version": "1", "region": None, "ingested_at": when, "tags": None},
    } for i, (event_type, key, amount) in enumerate(rows)], schema=schema)


def ids(table: pa.Table) -> list[str]:
    return table.column("event_id").to_pylist()


def test_first_matching_route_wins_with_wildcards_and_filters() -> None:
    router = Router(spec({"routes": [
        {"name": "big", "event_types": ["tx.*"], "filter": "data.amount > 100", "priority": "high"},
        {"name": "noise", "event_types": ["debug.*"], "drop": True},
        {"name": "rest"},
    ]}))
    routed = router.route(events([("tx.created", "a", 500.0), ("tx.created", "b", 5.0),
                                  ("debug.ping", "c", None), ("user.login", "d", None)]))
    assert ids(routed.high) == ["e0"]
    assert ids(routed.normal) == ["e1", "e3"]
    assert routed.filtered == 1


def test_filters_on_any_envelope_column_route_as_on_the_payload() -> None:
    """The router hands Polars only the columns its routes read: filters on the source, the
    key or the metadata route as well as those on the payload."""
    router = Router(spec({"routes": [
        {"name": "by-key", "filter": "key = 'b'"},
        {"name": "by-region", "filter": "metadata.version = '1' AND source = 's'", "priority": "high"},
    ]}))
    routed = router.route(events([("tx.created", "a", 1.0), ("tx.created", "b", 2.0)]))
    assert (ids(routed.high), ids(routed.normal)) == (["e0"], ["e1"])


def test_unrouted_events_are_stored_or_dropped() -> None:
    only = {"routes": [{"name": "tx", "event_types": ["tx.*"]}]}
    batch = events([("tx.created", "a", 1.0), ("user.login", "b", None)])
    assert ids(Router(spec(only)).route(batch).normal) == ["e0", "e1"]
    dropped = Router(spec({**only, "unrouted": "drop"})).route(batch)
    assert (ids(dropped.normal), dropped.filtered) == (["e0"], 1)


def test_a_high_event_promotes_its_keys_earlier_events_only() -> None:
    router = Router(spec({"routes": [
        {"name": "vip", "filter": "data.amount > 100", "priority": "high"}]}))
    routed = router.route(events([("tx.created", "a", 1.0), ("tx.created", "b", 2.0),
                                  ("tx.created", "a", 900.0), ("tx.created", "a", 3.0)]))
    assert ids(routed.high) == ["e0", "e2"]  # a's earlier event goes with its high event
    assert ids(routed.normal) == ["e1", "e3"]


def test_derived_events_have_deterministic_ids_and_keep_key_and_time() -> None:
    router = Router(spec({"routes": [
        {"name": "flag", "event_types": ["tx.created"], "filter": "data.amount > 100",
         "emit": {"event_type": "tx.flagged"}}]}))
    routed = router.route(events([("tx.created", "a", 500.0), ("tx.created", "b", 1.0)]))
    (derived,) = routed.derived.to_pylist()
    assert derived["event_id"] == str(uuid.uuid5(EVENTRAY_NAMESPACE, "e0/flag"))
    assert (derived["event_type"], derived["key"], derived["source"]) == ("tx.flagged", "a", "route:flag")
    assert derived["data"]["amount"] == 500.0
    assert routed.derived.schema == routed.normal.schema


def test_a_route_matching_its_own_emitted_type_is_a_loop() -> None:
    with pytest.raises(ConfigError, match="flag -> flag"):
        Router(spec({"routes": [{"name": "flag", "event_types": ["tx.*"],
                                 "emit": {"event_type": "tx.flagged"}}]}))


def test_routes_that_loop_need_a_hop_limit() -> None:
    loop = {"routes": [
        {"name": "a", "event_types": ["x.*"], "emit": {"event_type": "y.one"}},
        {"name": "b", "event_types": ["y.*"], "emit": {"event_type": "x.two"}}]}
    with pytest.raises(ConfigError, match="a -> b -> a|b -> a -> b"):
        Router(spec(loop))
    Router(spec({**loop, "max_hops": 3}))  # bounded: accepted


@pytest.mark.parametrize("bad", ["data.amount >", "nosuchcolumn = 1", "data.amount = 'x' AND"])
def test_bad_filters_fail_at_start_up_naming_the_route(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"routing\.routes\.0\.filter"):
        Router(spec({"routes": [{"name": "f", "filter": bad}]}))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from("abcd"), min_size=1, max_size=5),
                          st.booleans(), st.integers(0, 2)), max_size=12))
def test_lanes_keep_each_keys_order(steps: list[tuple[list[str], bool, int]]) -> None:
    queues, counter, out = LaneQueues(1), 0, []
    for keys, high, takes in steps:
        queues.offer(0, pa.table({"key": keys, "n": list(range(counter, counter + len(keys)))}), high)
        counter += len(keys)
        for _ in range(takes):
            if (piece := queues.take(0, max_rows=4)) is not None:
                out += list(zip(piece["key"].to_pylist(), piece["n"].to_pylist(), strict=True))
    while (piece := queues.take(0)) is not None:
        out += list(zip(piece["key"].to_pylist(), piece["n"].to_pylist(), strict=True))
    assert sorted(n for _, n in out) == list(range(counter))  # nothing lost or doubled
    for key in "abcd":
        ns = [n for k, n in out if k == key]
        assert ns == sorted(ns)


def test_high_lane_goes_first_and_coalesces_under_load() -> None:
    queues = LaneQueues(1)
    for i in range(3):
        queues.offer(0, pa.table({"key": [f"n{i}"]}), high=False)
    queues.offer(0, pa.table({"key": ["h"]}), high=True)
    assert queues.take(0)["key"].to_pylist() == ["h"]
    assert queues.take(0, max_rows=10)["key"].to_pylist() == ["n0", "n1", "n2"]
    assert queues.empty()


def test_under_load_one_batch_holds_both_lanes_high_first() -> None:
    # a live slice with one high event is one batch, not two (each costs a partition a
    # fixed few milliseconds), applied in the order the two batches would have been
    queues = LaneQueues(1)
    queues.offer(0, pa.table({"key": ["a", "b"]}), high=False)
    queues.offer(0, pa.table({"key": ["c"]}), high=True)
    queues.offer(0, pa.table({"key": ["d"]}), high=False)
    assert queues.take(0, max_rows=10)["key"].to_pylist() == ["c", "a", "b", "d"]
    assert queues.empty()
    # a high lane the limit cuts short: no normal piece may overtake what is left of it
    for keys, high in ((["n"], False), (["h1", "h2"], True), (["h3"], True)):
        queues.offer(0, pa.table({"key": keys}), high=high)
    assert queues.take(0, max_rows=2)["key"].to_pylist() == ["h1", "h2"]
    assert queues.take(0, max_rows=2)["key"].to_pylist() == ["h3", "n"]
    # without a limit (a replay's batches are its input's): one piece at a time
    queues.offer(0, pa.table({"key": ["x"]}), high=False)
    queues.offer(0, pa.table({"key": ["y"]}), high=True)
    assert [queues.take(0)["key"].to_pylist() for _ in range(2)] == [["y"], ["x"]]


def test_batch_sizer_targets_latency_within_bounds() -> None:
    sizer = BatchSizer(AdaptiveBatching(target_latency_ms=50, min_rows=100, max_rows=50_000), 2)
    assert sizer.max_rows(0) == 100  # nothing measured yet: small batches, low latency
    sizer.observe(0, rows=10_000, seconds=0.01)  # 1M rows/s
    assert sizer.max_rows(0) == 50_000
    sizer.observe(1, rows=100, seconds=1.0)
    assert sizer.max_rows(1) == 100


def test_routed_tables_keep_the_envelope_schema() -> None:
    router = Router(spec({"routes": [{"name": "all"}]}))
    batch = events([("tx.created", "a", 1.0)])
    routed = router.route(batch)
    assert routed.normal.schema == batch.schema
    assert pl.from_arrow(routed.high).height == 0
    assert routed.high.schema == batch.schema and TIMESTAMP == batch.schema.field("timestamp").type


@pytest.mark.parametrize(("hostile", "part"), [
    ("read_parquet('/etc/passwd') IS NOT NULL", "function READ_PARQUET"),
    ("key IN (SELECT key FROM read_csv('/etc/passwd'))", "a subquery"),
    ("data.TX_AMOUNT > (SELECT 1)", "a subquery"),
    ("read_csv('x.csv') IS NULL", "function READ_CSV"),
    ("nosuchfunction(key) = 1", "function NOSUCHFUNCTION"),
])
def test_filters_that_read_files_or_query_are_refused_at_start_up(
    tmp_path: Path, hostile: str, part: str
) -> None:
    config = yaml.safe_load(Path("configs/fraud.yaml").read_text())
    config["routing"]["routes"][0]["filter"] = hostile
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"route 'large-amounts'.*{part}"):
        load_pipeline(path)


SAFE_FILTERS = [
    "data.amount > 100", "key IN ('a', 'c')", "key = 'a' OR data.amount IS NULL",
    "lower(key) LIKE 'a%' AND NOT data.amount BETWEEN 1 AND 50", "abs(data.amount - 100) < 60",
    "coalesce(data.amount, 0) * 2 % 7 >= 3", "length(upper(key)) = 1 AND starts_with(key, 'a')",
    "ends_with(correlation_id, 'b') OR CAST(data.amount AS INT) = 5",
]


@pytest.mark.parametrize("text", SAFE_FILTERS)
def test_safe_filters_route_as_polars_compiles_them(text: str) -> None:
    batch = events([("tx.created", k, a) for k, a in
                    [("a", 5.0), ("b", 150.0), ("c", None), ("ab", 40.0), ("d", 101.0)]])
    routed = Router(spec({"routes": [{"name": "f", "filter": text}], "unrouted": "drop"})).route(batch)
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    expected = frame.filter(pl.sql_expr(text).fill_null(False))["event_id"].to_list()
    assert ids(routed.normal) == expected


def test_the_shipped_configs_still_load() -> None:
    for path in sorted(Path("configs").glob("*.yaml")):
        if "routing" in (yaml.safe_load(path.read_text()) or {}):
            load_pipeline(path)
