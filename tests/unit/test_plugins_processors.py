"""The open engine in process: plugin kinds resolved and validated at start-up, the
processor contract, and the testing kit (run_local, check_processor, ABORT)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines import STEP_KINDS, ConfigError, Pipeline, StepOutput, UnknownPluginError
from pipelines.envelope import envelope_schema
from pipelines.pipeline import load_pipeline
from pipelines.processing import StepContext
from pipelines.processors import ProcessorError, PythonStep, derived_events
from pipelines.testing import ABORT, AbortingListSource, SourceAborted, check_processor, run_local

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "name": "orders",
    "source": {"format": "jsonl", "path": ["in.jsonl"]},
    "mapping": {"event_id": "id", "event_type": "type", "timestamp": "at", "payload": {"json": "data"}},
    "default_event_type": {"key": "correlation_id"},
}


def orders(n: int = 40) -> list[dict]:
    start = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    return [{"id": f"o{i}", "type": "order.created" if i % 3 else "order.paid",
             "at": (start + dt.timedelta(minutes=i)).isoformat(), "data": {"amount": i * 10}}
            for i in range(n)]


def write_config(tmp: Path, steps: list[dict], **extra: object) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(json.dumps({**BASE, "steps": steps, **extra}))
    return path


def test_a_python_step_names_a_function_that_cannot_be_imported_at_start_up(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"kind": "python", "name": "x", "event_types": ["order.*"],
                                      "function": "no_such_module:fn"}])
    with pytest.raises(ConfigError, match=r"steps\.0\.function: cannot import 'no_such_module:fn'"):
        load_pipeline(config)


def test_a_python_step_resolves_beside_its_config(tmp_path: Path) -> None:
    (tmp_path / "rules_beside.py").write_text("def flag(events):\n    return None\n")
    config = write_config(tmp_path, [{"kind": "python", "name": "flag", "event_types": ["order.*"],
                                      "function": "rules_beside:flag"}])
    assert load_pipeline(config).steps[0].name == "flag"


def test_each_kind_validates_its_own_fields_and_the_error_names_the_field(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"kind": "anomaly", "value": "v", "event_types": ["a.b"],
                                      "threshold": 2}])
    with pytest.raises(ConfigError, match=r"steps\.0\.threshold"):
        load_pipeline(config)
    config = write_config(tmp_path, [{"kind": "fraud", "model": {"registry": "r", "name": "x",
                                                                 "reload_every": 0}}])
    with pytest.raises(ConfigError, match=r"steps\.0\.model\.reload_every"):
        load_pipeline(config)


def test_an_unknown_kind_lists_the_allowed_ones_including_entry_points(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"kind": "isolation_forest", "event_types": ["a.b"]}])
    with pytest.raises(UnknownPluginError) as error:
        load_pipeline(config)
    assert "steps.0.kind" in str(error.value)
    assert {"anomaly", "python", "fraud"} <= set(error.value.allowed)  # fraud: an entry point
    assert "fraud" in STEP_KINDS.names()


def test_names_use_lower_case_digits_dashes_and_underscores(tmp_path: Path) -> None:
    ok = write_config(tmp_path, [], routing={"routes": [{"name": "big-orders"}, {"name": "card_testing"}]})
    assert [r.name for r in load_pipeline(ok).routing.routes] == ["big-orders", "card_testing"]
    bad = write_config(tmp_path, [], routing={"routes": [{"name": "Big Orders"}]})
    with pytest.raises(ConfigError, match=r"routing\.routes\.0\.name"):
        load_pipeline(bad)


def test_processors_registered_for_wildcard_types_all_run_on_each_batch() -> None:
    seen: dict[str, int] = {"a": 0, "b": 0}

    def count_a(events: pa.Table) -> None:
        seen["a"] += events.num_rows

    def flag_paid(events: pa.Table) -> list[dict]:
        paid = events.filter(pa.compute.equal(events["event_type"], "order.paid"))
        return [{"event_type": "order.flagged", "timestamp": row["timestamp"],
                 "data": {"of": row["event_id"]}, "key": row["key"]} for row in paid.to_pylist()]

    pipeline = (Pipeline.from_dict(BASE)
                .register_processor("order.*", count_a)
                .register_processor(["order.created", "order.paid"], flag_paid, name="flag-paid"))
    out = run_local(pipeline, orders())
    events = out["events"]
    flagged = events.filter(pl.col("event_type") == "order.flagged")
    assert flagged.height == 14 and seen["a"] == 40 + 14  # count_a also sees the derived events
    assert out["summary"]["derived"][0] == 14


def test_derived_events_take_datetimes_iso_strings_and_arrow_timestamps() -> None:
    context = StepContext(envelope_schema())
    aware = dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = [{"event_type": "a.b", "timestamp": aware, "data": {"x": 1}},
            {"event_type": "a.b", "timestamp": dt.datetime(2024, 5, 1, 10), "data": {"x": 1}}]
    iso = [{"event_type": "a.b", "timestamp": "2024-05-01T10:00:00Z", "data": {"x": 1}}]
    first, second = derived_events(rows, "p", context), derived_events(iso, "p", context)
    times = first.column("timestamp").to_pylist() + second.column("timestamp").to_pylist()
    assert len({t.astimezone(dt.UTC) for t in times}) == 1  # all the same instant, UTC
    # two equal events get two ids; the same content gets the same ids in any batch
    assert first.column("event_id")[0] != first.column("event_id")[1]
    assert first.column("event_id")[0] == derived_events(rows[:1], "p", context).column("event_id")[0]
    with pytest.raises(ProcessorError, match="event_type or timestamp"):
        derived_events([{"event_type": "Not A Type", "timestamp": aware, "data": {}}], "p", context)
    with pytest.raises(ProcessorError, match="without"):
        derived_events([{"event_type": "a.b", "data": {}}], "p", context)


class RunningTotal:
    """A stateful processor: derives a running total per key every fifth event."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.seen = 0

    def process(self, events: pa.Table) -> StepOutput | None:
        out = []
        for row in events.to_pylist():
            amount = json.loads(row["data"]["json"])["amount"]
            self.totals[row["key"]] = self.totals.get(row["key"], 0) + amount
            self.seen += 1
            if self.seen % 5 == 0:
                out.append({"event_type": "order.total", "timestamp": row["timestamp"],
                            "key": row["key"], "data": {"total": self.totals[row["key"]]}})
        table = pa.table({"event_type": ["order.total"], "timestamp": pa.array(
            [dt.datetime(2024, 5, 1, tzinfo=dt.UTC)], pa.timestamp("us", "UTC")), "n": [self.seen]})
        return StepOutput(tables={"order_counts": table}, derived=pa.Table.from_pylist(out) if out else None)

    def snapshot(self) -> dict:
        return {"totals": self.totals, "seen": self.seen}

    def restore(self, state: dict) -> None:
        self.totals, self.seen = dict(state["totals"]), state["seen"]


class Forgetful(RunningTotal):
    def snapshot(self) -> dict:
        return {"totals": {}, "seen": 0}  # a bug: state does not survive a restore


def test_check_processor_passes_a_stateful_processor_and_catches_a_broken_snapshot(tmp_path: Path) -> None:
    events = run_local(Pipeline.from_dict(BASE), orders(), store=tmp_path / "s")["events"].to_arrow()
    events = events.select(envelope_schema().names).cast(envelope_schema())
    check_processor(RunningTotal(), events)
    with pytest.raises(AssertionError, match="snapshot -> restore"):
        check_processor(Forgetful(), events)


def test_a_processor_may_write_rows_to_a_table_of_its_own(tmp_path: Path) -> None:
    pipeline = Pipeline.from_dict(BASE).register_processor(["order.created", "order.paid"], RunningTotal(),
                                                           name="totals")
    out = run_local(pipeline, orders(), store=tmp_path / "s")
    assert out["order_counts"].height >= 1
    assert (tmp_path / "s" / "order_counts").is_dir()


def test_a_processor_that_breaks_the_contract_fails_with_its_name() -> None:
    step = PythonStep.of("bad", ["*"], lambda events: [{"nope": 1}], StepContext(envelope_schema()))
    table = run_local_events()
    with pytest.raises(ProcessorError, match="'bad'"):
        step.process(table)


def run_local_events() -> pa.Table:
    out = run_local(Pipeline.from_dict(BASE), orders(5))["events"].to_arrow()
    return out.select(envelope_schema().names).cast(envelope_schema())


def test_an_aborting_list_source_stops_once_then_goes_on() -> None:
    batches = [pa.record_batch({"x": [1, 2]}), ABORT, pa.record_batch({"x": [3]})]
    source = AbortingListSource("mem", {"p": batches})
    reader = source.open_part("p")
    assert reader.next_batch().num_rows == 2
    with pytest.raises(SourceAborted):
        reader.next_batch()
    resumed = source.open_part("p", start=2)
    assert resumed.next_batch().num_rows == 1 and resumed.next_batch() is None
