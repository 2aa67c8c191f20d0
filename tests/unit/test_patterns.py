"""Patterns: the spec and its validation, the where language, the builder, the engine's
timeouts, caps and state, and patterns in a pipeline run in process."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml

import pipelines.patterns
from pipelines import SOURCE_KINDS, Pipeline
from pipelines.errors import ConfigError
from pipelines.kinds import FileSourceOptions, SourceKind
from pipelines.patterns import (
    ExpressionError,
    Pattern,
    PatternSpec,
    load_patterns,
    parse_condition,
    pattern_specs,
)
from pipelines.patterns.batches import PatternSet, matches_frame
from pipelines.patterns.mining import mine_events, stored_in_stream_order
from pipelines.patterns.scenarios import supply_chain_scenario
from pipelines.store import EventStore
from pipelines.testing import ABORT, AbortingListSource, run_local

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def events(*rows: tuple[str, str, float, dict[str, Any]]) -> pl.DataFrame:
    """(type, key, minute, data) rows as envelope rows, ids e0, e1..."""
    return pl.DataFrame({
        "event_id": [f"e{i}" for i in range(len(rows))], "event_type": [r[0] for r in rows],
        "timestamp": [T0 + dt.timedelta(minutes=r[2]) for r in rows],
        "source": ["t"] * len(rows), "correlation_id": [r[1] for r in rows],
        "key": [r[1] for r in rows], "data": [{"v": 0, **r[3]} for r in rows]},
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")})


def spec(**values: Any) -> PatternSpec:
    return PatternSpec.model_validate({"name": "p", "emit": "p.found", **values})


def run(patterns: list[PatternSpec], frame: pl.DataFrame, finish: bool = True) -> pl.DataFrame:
    engine = PatternSet(patterns)
    found = engine.process(frame) + (engine.finish() if finish else [])
    return matches_frame(found)


def test_public_surface() -> None:
    assert sorted(pipelines.patterns.__all__) == [
        "AggregateSpec", "ExpressionError", "MatchPayload", "Pattern", "PatternSpec",
        "SequenceStepSpec", "load_patterns", "parse_condition", "pattern_specs"]


@pytest.mark.parametrize(("values", "field"), [
    ({"steps": [{"name": "a", "event_types": ["x"], "times": [2, None]}]}, "steps.0.times"),
    ({"steps": [{"name": "a", "event_types": ["x"], "negated": True}]}, "steps.0.negated"),
    ({"within": "1h", "steps": [{"name": "a", "event_types": ["x"], "where": "data.v >"}]}, "where"),
    ({"within": "1h", "steps": [{"name": "a", "event_types": ["x"], "where": "b.data.v > 1"}]},
     "steps.0.where"),
    ({"within": "1h", "key": "data.1x", "steps": [{"name": "a", "event_types": ["x"]}]}, "key"),
    ({"within": "1h", "skip": "skip_to_first:zz", "steps": [{"name": "a", "event_types": ["x"]}]},
     "skip"),
    ({"aggregate": {"event_types": ["x"], "over": "1h", "at_least": 2}}, "aggregate"),
    ({"within": "1h", "steps": [{"name": "a", "event_types": ["x"]},
                                {"name": "b", "event_types": ["y"], "negated": True,
                                 "contiguity": "next"}]}, "steps.1.contiguity"),
])
def test_a_bad_pattern_names_its_field(values: dict[str, Any], field: str, tmp_path: Path) -> None:
    path = tmp_path / "patterns.yaml"
    path.write_text(yaml.safe_dump({"patterns": [{"name": "p", "emit": "p.found", **values}]}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_patterns(path)


def test_the_shipped_pattern_files_load() -> None:
    files = sorted(CONFIGS.glob("patterns/*.yaml"))
    assert files, "configs/patterns/*.yaml are missing"
    for path in files:
        assert load_patterns(path)


def test_where_is_parsed_never_evaluated_as_python() -> None:
    with pytest.raises(ExpressionError):
        parse_condition("__import__('os').system('true')")
    with pytest.raises(ExpressionError):
        parse_condition("data.v > 1; data.v")
    condition = parse_condition("not (data.v in (1, 2)) and key != 'k' or data.w is null")
    frame = pl.DataFrame({"key": ["a", "k", "k"], "data": [{"v": 3, "w": 1}, {"v": 3, "w": 1},
                                                            {"v": 1, "w": None}]})
    assert frame.select(condition.polars()).to_series().to_list() == [True, False, True]
    assert [condition.evaluate(row, {}) for row in frame.to_dicts()] == [True, False, True]


def test_where_reads_untyped_json_payloads() -> None:
    frame = pl.DataFrame({"data": [{"json": '{"amount": 3}'}, {"json": '{"amount": 300}'}]})
    assert frame.select(parse_condition("data.amount > 200").polars(set())).to_series().to_list() \
        == [False, True]


def test_builder_gives_the_yaml_spec() -> None:
    built = (Pattern.begin("small", "tx").where("data.v < 5").times(3)
             .followed_by("big", "tx").where("data.v > 10 * small.data.v")
             .within("10m").skip("skip_past_last_event")
             .emit("fraud.card_testing", name="card-testing", key="data.customer"))
    from_yaml = PatternSpec.model_validate({
        "name": "card-testing", "key": "data.customer", "within": "10m",
        "skip": "skip_past_last_event", "emit": "fraud.card_testing",
        "steps": [{"name": "small", "event_types": ["tx"], "where": "data.v < 5", "times": 3},
                  {"name": "big", "event_types": ["tx"], "where": "data.v > 10 * small.data.v",
                   "contiguity": "followed_by"}]})
    assert built == from_yaml


def test_strict_next_and_not_next() -> None:
    """``next`` is the key's next event among the pattern's own event types."""
    frame = events(("a", "k", 0, {}), ("c", "k", 1, {}), ("b", "k", 2, {}),
                   ("a", "k", 3, {}), ("b", "k", 4, {}))
    strict = spec(within="1h", steps=[{"name": "a", "event_types": ["a"]},
                                      {"name": "b", "event_types": ["b"], "contiguity": "next"}])
    assert run([strict], frame)["event_ids"].to_list() == [["e0", "e2"], ["e3", "e4"]]
    seeing_c = spec(within="1h", steps=[
        {"name": "a", "event_types": ["a", "c"], "where": "event_type == 'a'"},
        {"name": "b", "event_types": ["b"], "contiguity": "next"}])
    assert run([seeing_c], frame)["event_ids"].to_list() == [["e3", "e4"]]
    guarded = spec(within="1h", steps=[
        {"name": "a", "event_types": ["a"]},
        {"name": "no-c", "event_types": ["c"], "contiguity": "not_next"},
        {"name": "b", "event_types": ["b"]}])
    assert run([guarded], frame)["event_ids"].to_list() == [["e3", "e4"]]


def test_absence_fires_when_the_watermark_passes_its_deadline() -> None:
    absence = spec(key="correlation_id", within="48h", steps=[
        {"name": "paid", "event_types": ["paid"]},
        {"name": "shipped", "event_types": ["shipped"], "negated": True}])
    engine = PatternSet([absence])
    frame = events(("paid", "o1", 0, {}), ("paid", "o2", 10, {}), ("shipped", "o2", 60, {}))
    assert engine.process(frame) == []
    assert engine.advance(int((T0 + dt.timedelta(hours=47)).timestamp() * 1e6)) == []
    fired = engine.advance(int((T0 + dt.timedelta(hours=48, seconds=1)).timestamp() * 1e6))
    assert [(m.key, m.event_ids) for m in fired] == [("o1", ("e0",))]
    assert fired[0].time == int((T0 + dt.timedelta(hours=48)).timestamp() * 1e6)
    assert engine.finish() == []


def test_timeouts_are_emitted_as_their_own_type() -> None:
    timed = spec(within="10m", on_timeout="p.timed_out", steps=[
        {"name": "a", "event_types": ["a"]}, {"name": "b", "event_types": ["b"]}])
    engine = PatternSet([timed])
    found = engine.process(events(("a", "k", 0, {}), ("a", "k", 30, {}), ("b", "k", 35, {})))
    found += engine.finish()
    assert sorted((m.kind, m.event_ids) for m in found) == [
        ("match", ("e1", "e2")), ("timeout", ("e0",))]


def test_partial_matches_are_capped_dropping_the_oldest() -> None:
    capped = spec(within="1h", max_partial=2, steps=[
        {"name": "a", "event_types": ["a"]}, {"name": "b", "event_types": ["b"]}])
    engine = PatternSet([capped])
    found = engine.process(events(*[("a", "k", i, {}) for i in range(5)], ("b", "k", 9, {})))
    assert [m.event_ids for m in found] == [("e3", "e5"), ("e4", "e5")]
    assert engine.stats()["pattern_cap_hits"] == 3
    assert engine.stats()["pattern_max_partial"] == 2


def test_state_expires_by_within() -> None:
    engine = PatternSet([spec(within="10m", steps=[
        {"name": "a", "event_types": ["a"]}, {"name": "b", "event_types": ["b"]}])])
    engine.process(events(("a", "k1", 0, {}), ("a", "k2", 1, {})))
    assert engine.stats()["pattern_active"] == 2
    engine.process(events(("c", "k3", 30, {})))
    assert engine.stats()["pattern_active"] == 0 and engine.snapshot()["positions"] == [{}]


def test_aggregates_are_edge_triggered() -> None:
    total = spec(key="key", aggregate={"event_types": ["tx"], "sum": "data.v", "over": "10m",
                                       "at_least": 10})
    frame = events(*[("tx", "k", m, {"v": v}) for m, v in
                     ((0, 4), (1, 4), (2, 4), (3, 4), (20, 1), (21, 9), (22, 1))])
    assert run([total], frame)["event_ids"].to_list() == [["e0", "e1", "e2"], ["e4", "e5"]]


def patterns_pipeline() -> Pipeline:
    return Pipeline.from_dict({
        "name": "p", "source": {"format": "jsonl", "path": ["-"]},
        "mapping": {"event_id": "id", "event_type": "type", "timestamp": "at",
                    "correlation_id": "order", "payload": {"json": "data"}}}).add_pattern(
        Pattern.begin("paid", "payment.received")
        .not_followed_by("shipped", "shipment.sent").within("48h")
        .emit("order.unshipped", name="paid-not-shipped", key="correlation_id"))


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"{kind}-{i}", "type": kind, "order": f"o{i}", "data": {"i": i},
             "at": (T0 + dt.timedelta(hours=i + (30 if kind == "shipment.sent" else 0))).isoformat()}
            for i in range(n) for kind in ("payment.received", "shipment.sent") if i % 3 or kind[0] == "p"]


def test_a_pipeline_stores_typed_match_events_and_mine_finds_the_same(tmp_path: Path) -> None:
    out = run_local(patterns_pipeline(), records(30), store=tmp_path / "store")
    summary = out["summary"].row(0, named=True)
    found = out["events"].filter(pl.col("event_type") == "order.unshipped")
    assert summary["pattern_matches"] == found.height == 10
    assert found.schema["data"].to_schema()["event_ids"] == pl.List(pl.String)  # type: ignore[union-attr]
    assert sorted(found["key"]) == sorted(f"o{i}" for i in range(0, 30, 3))
    ids = found["data"].struct.field("event_ids").to_list()
    assert sorted(ids) == sorted([f"payment.received-{i}"] for i in range(0, 30, 3))
    again = run_local(patterns_pipeline(), records(30), store=tmp_path / "again")
    assert sorted(again["events"]["event_id"]) == sorted(out["events"]["event_id"])  # ids by content
    stored = stored_in_stream_order(EventStore(tmp_path / "store"))
    mined = mine_events(stored, pattern_specs(patterns_pipeline().spec))
    assert sorted(mined["event_ids"].to_list()) == sorted(ids)


def test_a_pattern_keyed_by_a_field_the_events_are_not_partitioned_by_gets_copies(tmp_path: Path) -> None:
    """Events keyed by their correlation id, a pattern keyed by a payload field: the pattern
    sees copies keyed by that field (never stored), and finds what mine finds."""
    pipeline = Pipeline.from_dict({
        "name": "p", "source": {"format": "jsonl", "path": ["-"]},
        "mapping": {"event_id": "id", "event_type": "type", "timestamp": "at",
                    "correlation_id": "id", "payload": {"json": "data"}},
        "runtime": {"partitions": 3},
        "patterns": [{"name": "twice", "key": "data.customer", "within": "10m", "emit": "x.twice",
                      "skip": "skip_past_last_event",
                      "steps": [{"name": "a", "event_types": ["tx"], "times": 2}]}]})
    rows = [{"id": f"e{i:03d}", "type": "tx", "data": {"customer": f"c{i % 4}"},
             "at": (T0 + dt.timedelta(minutes=i)).isoformat()} for i in range(40)]
    out = run_local(pipeline, rows, store=tmp_path / "store")
    found = out["events"].filter(pl.col("event_type") == "x.twice")
    assert out["events"].height == 40 + found.height and found.height == 20
    assert sorted(found["key"].unique()) == ["c0", "c1", "c2", "c3"]
    stored = stored_in_stream_order(EventStore(tmp_path / "store"))
    mined = mine_events(stored, pattern_specs(pipeline.spec))
    assert sorted(mined["event_ids"].to_list()) == \
        sorted(found["data"].struct.field("event_ids").to_list())


_SOURCES = (f"patterns-list-{i}" for i in itertools.count())


def aborting_pipeline(items: list) -> Pipeline:
    """The supply-chain patterns over ``items`` (batches and ABORT markers) from memory."""
    source, name = AbortingListSource("orders", {"orders": items}), next(_SOURCES)
    SOURCE_KINDS.register(name, SourceKind(FileSourceOptions, lambda *_: source))
    return Pipeline.from_dict({
        "name": "p", "source": {"format": name, "name": "orders", "path": ["-"]},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "correlation_id": "correlationId", "payload": {"json": "data"}},
        "runtime": {"partitions": 2, "checkpoint_every": 2},
        "patterns": yaml.safe_load((CONFIGS / "patterns" / "supply-chain.yaml").read_text())["patterns"]})


def test_a_crash_and_resume_finds_what_a_fault_free_run_finds(tmp_path: Path) -> None:
    """Partial matches and pending absences come back from the checkpoint."""
    events, _ = supply_chain_scenario(orders=300, seed=5)
    columns = ("eventId", "eventType", "timestamp", "correlationId")
    batches = [pa.record_batch({**{c: [e[c] for e in chunk] for c in columns},
                                "data": [json.dumps(e["data"]) for e in chunk]})
               for chunk in (events[i:i + 100] for i in range(0, len(events), 100))]
    clean = aborting_pipeline(batches).run(store=tmp_path / "clean", runner="local")
    crashing = aborting_pipeline([*batches[:5], ABORT, *batches[5:]])
    with pytest.raises(Exception, match="aborted"):
        crashing.run(store=tmp_path / "crashed", runner="local")
    resumed = crashing.run(store=tmp_path / "crashed", runner="local", resume=True)
    assert resumed["resumed"] and resumed["pattern_matches"] == clean["pattern_matches"] > 100

    def matches(store: Path) -> pl.DataFrame:
        stored = pl.read_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
        return stored.filter(pl.col("source") == "processor:patterns").drop("metadata").sort("event_id")

    assert matches(tmp_path / "crashed").equals(matches(tmp_path / "clean"))
