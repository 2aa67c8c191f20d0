"""Projections: the vectorised fold against a plain-Python fold, batch splits, snapshots,
time travel, the config section and the step's snapshot/restore."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import Pipeline
from pipelines.errors import ConfigError
from pipelines.projection_spec import CUSTOMER_PROFILE, ProjectionSpec
from pipelines.projections import Projection, ProjectionFold
from pipelines.store import EventStore

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
TYPES = ["tx.created", "alert.raised", "alert.closed", "card.blocked", "card.unblocked", "other.thing"]

SPEC = ProjectionSpec.model_validate({"name": "profile", "snapshot_every": 7, "fields": [
    {"name": "n", "op": "count", "event_types": ["tx.*"]},
    {"name": "big", "op": "count", "event_types": ["tx.created"], "where": "amount > 50"},
    {"name": "spend", "op": "sum", "event_types": ["tx.created"], "value": "amount"},
    {"name": "smallest", "op": "min", "event_types": ["tx.created"], "value": "amount"},
    {"name": "largest", "op": "max", "event_types": ["tx.created"], "value": "amount"},
    {"name": "terminal", "op": "last", "event_types": ["tx.created"], "value": "terminal"},
    {"name": "open", "op": "set", "event_types": ["alert.raised"], "value": "correlation_id",
     "remove": {"event_types": ["alert.closed"], "value": "correlation_id"}},
    {"name": "status", "op": "last", "event_types": ["card.*"], "default": "active",
     "value": "CASE WHEN event_type = 'card.blocked' THEN 'blocked' ELSE 'active' END"},
]})
SCHEMA = {"key": pl.String, "event_type": pl.String, "timestamp": pl.Datetime("us", "UTC"),
          "event_id": pl.String, "correlation_id": pl.String, "amount": pl.Float64, "terminal": pl.Int64}


def reference_fold(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The projection folded one event at a time, in (time, id) order: the oracle."""
    states: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["timestamp"], r["event_id"])):
        s = states.setdefault(row["key"], {"n": 0, "big": 0, "spend": 0.0, "smallest": None,
                                           "largest": None, "terminal": None, "open": set(),
                                           "status": "active", "events": 0})
        kind, amount = row["event_type"], row["amount"]
        if kind == "other.thing":
            continue
        s["events"] += 1
        if kind.startswith("tx."):
            s["n"] += 1
        if kind == "tx.created":
            s["big"] += int(amount is not None and amount > 50)
            if amount is not None:
                s["spend"] += amount
                s["smallest"] = amount if s["smallest"] is None else min(s["smallest"], amount)
                s["largest"] = amount if s["largest"] is None else max(s["largest"], amount)
            if row["terminal"] is not None:
                s["terminal"] = row["terminal"]
        if kind == "alert.raised":
            s["open"].add(row["correlation_id"])
        if kind == "alert.closed":
            s["open"].discard(row["correlation_id"])
        if kind.startswith("card."):
            s["status"] = "blocked" if kind == "card.blocked" else "active"
    return states


def as_reference(view: pl.DataFrame) -> dict[str, dict[str, Any]]:
    out = {}
    for row in view.iter_rows(named=True):
        key = row.pop("key")
        row.pop("timestamp"), row.pop("event_id")
        row["open"] = set(row["open"])
        out[key] = row
    return out


def close(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert float(a[key]["spend"]) == pytest.approx(b[key]["spend"]), key
        assert {k: v for k, v in a[key].items() if k != "spend"} == \
            {k: v for k, v in b[key].items() if k != "spend"}, key


event = st.fixed_dictionaries({
    "key": st.sampled_from(["a", "b", "c"]),
    "event_type": st.sampled_from(TYPES),
    "minute": st.integers(0, 30),  # few minutes: many equal times
    "amount": st.one_of(st.none(), st.floats(0, 100, allow_nan=False).map(lambda x: round(x, 2))),
    "terminal": st.one_of(st.none(), st.integers(0, 5)),
    "correlation_id": st.sampled_from(["c1", "c2", "c3"]),
})


def frame_of(drawn: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], pl.DataFrame]:
    rows = [{"key": e["key"], "event_type": e["event_type"],
             "timestamp": T0 + dt.timedelta(minutes=e["minute"]), "event_id": f"e{i:04d}",
             "correlation_id": e["correlation_id"], "amount": e["amount"], "terminal": e["terminal"]}
            for i, e in enumerate(drawn)]
    return rows, pl.DataFrame(rows, schema=SCHEMA)


@settings(max_examples=120, deadline=None)
@given(st.lists(event, min_size=1, max_size=60), st.lists(st.integers(1, 59), max_size=4))
def test_fold_in_any_batches_equals_the_event_at_a_time_fold(drawn: list[dict[str, Any]],
                                                            cuts: list[int]) -> None:
    rows, frame = frame_of(drawn)
    ordered = frame.sort("timestamp", "event_id")  # the stream gives each key's events in order
    fold = ProjectionFold(SPEC, SCHEMA)
    state = fold.empty()
    bounds = sorted({0, *[c for c in cuts if c < ordered.height], ordered.height})
    for start, end in zip(bounds, bounds[1:], strict=False):
        batch = ordered.slice(start, end - start).sample(fraction=1.0, shuffle=True, seed=1)
        state, _ = fold.fold(state, batch)
    expected = {k: v for k, v in reference_fold(rows).items() if v["events"]}
    close(as_reference(fold.view(state)), expected)


@settings(max_examples=120, deadline=None)
@given(st.lists(event, min_size=1, max_size=60), st.lists(st.integers(1, 59), max_size=4))
def test_derived_events_folded_a_batch_late_give_the_event_order_state(drawn: list[dict[str, Any]],
                                                                      cuts: list[int]) -> None:
    """Online, an alert derived from a batch is folded with the next one, after events up to
    the batch's end (its transaction's label among them): the state is event order's."""
    rows, frame = frame_of(drawn)
    ordered = frame.sort("timestamp", "event_id")
    bounds = sorted({0, *[c for c in cuts if c < ordered.height], ordered.height})
    batches = [ordered.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    is_derived = pl.col("event_type") == "alert.raised"
    fold = ProjectionFold(SPEC, SCHEMA)
    state, late = fold.empty(), frame.clear()
    for batch in batches:
        state, _ = fold.fold(state, pl.concat([late, batch.filter(~is_derived)]))
        late = batch.filter(is_derived)
    state, _ = fold.fold(state, late)
    expected = {k: v for k, v in reference_fold(rows).items() if v["events"]}
    close(as_reference(fold.view(state)), expected)


def test_a_remove_is_forgotten_after_its_horizon() -> None:
    short = dt.timedelta(minutes=5)
    spec = SPEC.model_copy(update={"fields": [
        f.model_copy(update={"remember_removes": short}) if f.op == "set" else f for f in SPEC.fields]})
    fold = ProjectionFold(spec, SCHEMA)
    _, frame = frame_of([{"key": "a", "event_type": kind, "minute": minute, "amount": None,
                          "terminal": None, "correlation_id": "c1"}
                         for kind, minute in [("alert.closed", 0), ("tx.created", 3), ("tx.created", 20)]])
    state, _ = fold.fold(fold.empty(), frame.head(2))
    assert state["_open_ops"].to_list()[0][0]["add"] is False  # remembered 3 minutes later
    state, _ = fold.fold(state, frame.tail(1))
    assert state["_open_ops"].to_list() == [[]]  # 20 minutes later: forgotten


def write_events(store: EventStore, frame: pl.DataFrame, seq: int = 0) -> None:
    store.write("events", frame.to_arrow(), writer="p0", seq=seq)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event, min_size=1, max_size=50), st.integers(1, 10), st.integers(0, 31))
def test_state_from_a_snapshot_equals_the_state_from_zero(tmp_path_factory: pytest.TempPathFactory,
                                                          drawn: list[dict[str, Any]], every: int,
                                                          minute: int) -> None:
    rows, frame = frame_of(drawn)
    store = EventStore(tmp_path_factory.mktemp("snap"))
    write_events(store, frame)
    projection = Projection(SPEC, store)
    projection.rebuild(snapshot_every=every)
    as_of = T0 + dt.timedelta(minutes=minute)
    known = [r for r in rows if r["timestamp"] <= as_of]
    expected = reference_fold(known)
    for key in ("a", "b", "c"):
        zero = projection.state(key, as_of=as_of, use_snapshots=False)
        snapped = projection.state(key, as_of=as_of)
        assert zero == snapped
        if key in expected and expected[key]["events"]:
            assert zero is not None
            close(as_reference(pl.DataFrame([zero])), {key: expected[key]})


def test_rebuild_writes_snapshots_and_state_uses_them(tmp_path: Path) -> None:
    rows, frame = frame_of([{"key": "a", "event_type": "tx.created", "minute": m, "amount": 1.0,
                             "terminal": m, "correlation_id": "c1"} for m in range(20)])
    store = EventStore(tmp_path)
    write_events(store, frame)
    projection = Projection(SPEC, store)
    final = projection.rebuild()
    assert final.row(0, named=True)["n"] == 20
    assert [s["events"] for s in projection.snapshots()] == [7, 14]
    assert (tmp_path / "_projections" / "profile" / "snapshot-000002.parquet").is_file()
    assert projection.state("a", as_of=T0 + dt.timedelta(minutes=15))["terminal"] == 15
    assert projection.state("a", as_of=T0 - dt.timedelta(minutes=1)) is None


def test_a_snapshot_the_history_outgrew_is_not_used(tmp_path: Path) -> None:
    """Events stored after the rebuild, with earlier times: the snapshot's counts disagree
    with the history, and the state is folded from zero."""
    _, frame = frame_of([{"key": "a", "event_type": "tx.created", "minute": 10 + m, "amount": 2.0,
                          "terminal": 1, "correlation_id": "c1"} for m in range(14)])
    store = EventStore(tmp_path)
    write_events(store, frame)
    projection = Projection(SPEC, store)
    projection.rebuild(snapshot_every=5)
    _, late = frame_of([{"key": "a", "event_type": "tx.created", "minute": 0, "amount": 100.0,
                         "terminal": 9, "correlation_id": "c1"}])
    write_events(store, late.with_columns(event_id=pl.lit("late")), seq=1)
    state = projection.state("a")
    assert state is not None and state["n"] == 15 and state["spend"] == 128.0
    assert state == projection.state("a", use_snapshots=False)


def test_a_spec_change_ignores_old_snapshots(tmp_path: Path) -> None:
    _, frame = frame_of([{"key": "a", "event_type": "tx.created", "minute": m, "amount": 1.0,
                          "terminal": 1, "correlation_id": "c1"} for m in range(10)])
    store = EventStore(tmp_path)
    write_events(store, frame)
    Projection(SPEC, store).rebuild(snapshot_every=3)
    changed = SPEC.model_copy(update={"snapshot_every": 4})
    assert Projection(changed, store).snapshots() == []


def test_bad_expressions_fail_at_build_naming_the_field() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        ProjectionSpec.model_validate({"name": "p", "fields": [
            {"name": "x", "op": "last", "event_types": ["a"], "value": "read_csv('/etc/passwd')"}]})
    spec = ProjectionSpec.model_validate({"name": "p", "fields": [
        {"name": "x", "op": "sum", "event_types": ["a"], "value": "data.missing"}]})
    with pytest.raises(ConfigError, match="projections.p.fields.x"):
        ProjectionFold(spec, SCHEMA)
    with pytest.raises(ValueError, match="needs a value"):
        ProjectionSpec.model_validate({"name": "p", "fields": [
            {"name": "x", "op": "sum", "event_types": ["a"]}]})


def config(projections: list[Any]) -> dict[str, Any]:
    return {"name": "profiles", "source": {"format": "jsonl", "path": ["-"]},
            "mapping": {"event_type": "type", "timestamp": "at", "payload": {"json": "data"}},
            "projections": projections}


def test_a_projection_in_config_is_a_step_once() -> None:
    spec = Pipeline.from_dict(config([{"name": "seen", "fields": [
        {"name": "n", "op": "count", "event_types": ["user.*"]}]}])).spec
    assert [(s.kind, s.name) for s in spec.steps] == [("projection", "seen")]
    again = Pipeline.from_dict(spec.model_dump(by_alias=True, exclude_unset=True)).spec
    assert [(s.kind, s.name) for s in again.steps] == [("projection", "seen")]
    clash = config([{"name": "seen", "fields": [{"name": "n", "op": "count", "event_types": ["user.*"]}]}])
    clash["steps"] = [{"kind": "anomaly", "name": "seen", "value": "x", "event_types": ["user.*"]}]
    with pytest.raises(ConfigError, match="step names must be unique"):
        Pipeline.from_dict(clash)
    with pytest.raises(ConfigError, match="is a table of the store"):
        Pipeline.from_dict(config([{"name": "events", "fields": [
            {"name": "n", "op": "count", "event_types": ["user.*"]}]}]))
    offline = Pipeline.from_dict(config([{"name": "seen", "online": False, "fields": [
        {"name": "n", "op": "count", "event_types": ["user.*"]}]}])).spec
    assert offline.steps == []


def test_an_expression_the_envelope_cannot_compile_fails_at_start_up() -> None:
    with pytest.raises(ConfigError, match="projections.p.fields.total: 'data.amount'"):
        Pipeline.from_dict(config([{"name": "p", "fields": [
            {"name": "total", "op": "sum", "event_types": ["a.*"], "value": "data.amount"}]}]))


def test_the_step_state_survives_snapshot_and_restore() -> None:
    from pipelines.envelope import envelope_schema
    from pipelines.processing import StepContext
    from pipelines.projections import ProjectionStep, ProjectionStepSpec

    spec = ProjectionStepSpec.model_validate({"kind": "projection", "name": "p", "projection": {
        "name": "p", "fields": [{"name": "n", "op": "count", "event_types": ["a.*"]},
                                {"name": "who", "op": "set", "event_types": ["a.*"], "value": "source"}]}})
    envelope = envelope_schema()
    batch = pl.DataFrame({"event_id": ["1", "2"], "event_type": ["a.b", "a.c"],
                          "timestamp": [T0, T0], "source": ["s1", "s2"], "correlation_id": ["c", "c"],
                          "key": ["k", "k"]}).to_arrow()
    one = ProjectionStep(spec, StepContext(envelope))
    out = one.process(batch)
    assert pl.from_arrow(out.tables["p"])["n"].to_list() == [2]
    two = ProjectionStep(spec, StepContext(envelope))
    two.restore(one.snapshot())
    out = two.process(batch)
    row = pl.from_arrow(out.tables["p"]).row(0, named=True)
    assert (row["n"], row["who"], row["event_type"]) == (4, ["s1", "s2"], "p")


def test_customer_profile_names_its_folds() -> None:
    assert CUSTOMER_PROFILE.event_types() == ["transaction.created", "fraud.suspected", "fraud.reported",
                                              "alert.closed", "card.blocked", "card.unblocked"]


def test_the_readme_declares_the_shipped_customer_profile() -> None:
    import yaml

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text[text.index("projections:\n  - name: customer_profile"):]
    declared = yaml.safe_load(block[:block.index("```")])["projections"][0]
    assert ProjectionSpec.model_validate(declared) == CUSTOMER_PROFILE
