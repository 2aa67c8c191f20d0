"""Poison events: a step that raises on some events of a batch dead-letters exactly those,
and the partition applies the rest as if they had never been there."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines import Pipeline
from pipelines.envelope import DEADLETTER_SCHEMA, envelope_schema
from pipelines.errors import StoreError
from pipelines.keyed import PartitionWorker
from pipelines.kinds import build_steps
from pipelines.processing import ROW_POSITION
from pipelines.processors import ProcessorError
from pipelines.testing import FakeClock, ListSink, run_local

START = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def _pipeline(steps: list[dict[str, Any]] = (), **processors: Any) -> Pipeline:
    """A pipeline of ``order.created`` events with ``steps``, then ``processors`` registered."""
    pipeline = Pipeline.from_dict({
        "name": "orders", "source": {"format": "jsonl", "path": ["-"]},
        "mapping": {"event_id": "id", "event_type": "type", "timestamp": "at",
                    "payload": {"json": "data"}},
        "event_types": {
            "order.created": {"key": "customer", "payload": {"customer": "str", "amount": "float"}},
            "order.total": {"key": "customer", "payload": {"customer": "str", "amount": "float"}}},
        "steps": list(steps)})
    for name, processor in processors.items():
        pipeline.register_processor(["order.created"], processor, name=name)
    return pipeline


def _steps(pipeline: Pipeline) -> list[Any]:
    return build_steps(pipeline.spec, pipeline.objects)


def _orders(amounts: list[float], customers: list[str], first: int = 0) -> pa.Table:
    """Envelope rows of ``order.created`` events, one a minute, ids ``o<i>``."""
    n = len(amounts)
    schema = envelope_schema(_pipeline().spec.registry())
    return pa.table({
        "event_id": [f"o{first + i}" for i in range(n)],
        "event_type": ["order.created"] * n,
        "timestamp": [START + dt.timedelta(minutes=first + i) for i in range(n)],
        "source": ["shop"] * n, "correlation_id": customers, "key": customers,
        "data": [{"customer": c, "amount": a, "json": None} for c, a in zip(customers, amounts, strict=True)],
        "metadata": [{"version": "1", "region": None, "ingested_at": START, "tags": None}] * n,
    }).cast(schema)


class RunningTotals:
    """A stateful processor: each customer's running total, emitted per order. It raises on
    a negative amount after it has already added the rows before it (partial mutation)."""

    calls = 0

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def process(self, events: pa.Table) -> list[dict[str, Any]]:
        RunningTotals.calls += 1
        out = []
        for row in events.to_pylist():
            amount = row["data"]["amount"]
            if amount < 0:
                raise ValueError(f"negative amount {amount}")
            customer = row["key"]
            self.totals[customer] = self.totals.get(customer, 0.0) + amount
            out.append({"event_type": "order.total", "timestamp": row["timestamp"],
                        "key": customer, "data": {"customer": customer,
                                                  "amount": self.totals[customer]}})
        return out

    def snapshot(self) -> dict[str, float]:
        return self.totals  # the live dict: a snapshot that later mutation reaches

    def restore(self, state: dict[str, float]) -> None:
        self.totals = dict(state)


#: A detector first: it scores a poison event before the processor raises on it, so its
#: state must be put back too.
SPIKES = [{"kind": "anomaly", "name": "spikes", "detector": "robust_zscore", "value": "amount",
           "event_types": ["order.created"], "emit_alerts": False}]


def _worker(sink: ListSink, steps: list[dict[str, Any]] = SPIKES) -> PartitionWorker:
    pipeline = _pipeline(steps, totals=RunningTotals())
    return PartitionWorker(0, sink, clock=FakeClock(), steps=_steps(pipeline))


def _batches(seed: int = 1) -> tuple[list[pa.Table], list[set[int]]]:
    """Three batches of 200 orders over 7 customers; some amounts negative (poison)."""
    rng = np.random.default_rng(seed)
    batches, poison = [], []
    for b in range(3):
        amounts = np.round(rng.gamma(2.0, 50.0, 200), 2)
        bad = set(rng.choice(200, size=b * 3, replace=False).tolist())  # none in the first
        amounts[list(bad)] *= -1
        customers = [f"c{k}" for k in rng.integers(0, 7, 200)]
        batches.append(_orders(amounts.tolist(), customers, first=200 * b))
        poison.append(bad)
    return batches, poison


def _without(batch: pa.Table, rows: set[int]) -> pa.Table:
    mask = np.ones(batch.num_rows, dtype=bool)
    mask[list(rows)] = False
    return batch.filter(pa.array(mask))


def test_poison_events_are_dead_lettered_and_the_rest_applied_as_without_them() -> None:
    batches, poison = _batches()
    sink, clean_sink = ListSink(), ListSink()
    worker, clean = _worker(sink), _worker(clean_sink)
    for seq, (batch, bad) in enumerate(zip(batches, poison, strict=True)):
        receipt = worker.apply(seq, batch)
        expected = clean.apply(seq, _without(batch, bad))
        assert (receipt.rows, receipt.dead_lettered) == (200 - len(bad), len(bad))
        assert receipt.reasons == ({"processor_error": len(bad)} if bad else {})
        assert (receipt.derived is None) == (expected.derived is None)
        if receipt.derived is not None:
            assert receipt.derived.equals(expected.derived)  # ids and running totals alike
        if seq == 1:
            worker.snapshot()  # a checkpoint: the next failure replays from here
    for table in ("events", "scores"):
        assert sink.table(table).equals(clean_sink.table(table)), table
    assert worker.snapshot() == clean.snapshot()  # the poison never reached any state
    dead = sink.table("deadletter")
    assert dead.schema == DEADLETTER_SCHEMA
    bad_ids = sorted(batches[b]["event_id"][i].as_py() for b in range(3) for i in poison[b])
    assert sorted(dead["event_id"].to_pylist()) == bad_ids
    assert set(dead["reason"].to_pylist()) == {"processor_error"}
    message = dead["message"][0].as_py()
    assert message.startswith("step 'totals' raised ValueError: negative amount -"), message
    assert dead["raw"][0].as_py().startswith(b'{"event_id":"o')
    assert set(dead["offset"].to_pylist()) == {-1}


def test_bisection_calls_the_steps_k_log_n_times() -> None:
    n, bad = 4096, {17, 3000}
    amounts = [10.0] * n
    for row in bad:
        amounts[row] = -1.0
    worker = _worker(ListSink(), [])
    RunningTotals.calls = 0
    receipt = worker.apply(0, _orders(amounts, ["c1"] * n))
    assert receipt.dead_lettered == 2
    # the whole batch, two halves per level down to each poison event, the kept rows once
    assert RunningTotals.calls <= 2 + 2 * len(bad) * math.log2(n), RunningTotals.calls


def test_an_error_of_the_environment_fails_the_batch_without_bisecting() -> None:
    class Unreadable:
        calls = 0

        def process(self, events: pa.Table) -> None:
            Unreadable.calls += 1
            raise PermissionError("model file is not readable")

    sink = ListSink()
    worker = PartitionWorker(0, sink, steps=_steps(_pipeline(reader=Unreadable())))
    with pytest.raises(ProcessorError, match="raised PermissionError"):
        worker.apply(0, _orders([1.0] * 64, ["c1"] * 64))
    assert Unreadable.calls == 1 and worker.next_seq == 0
    assert "deadletter" not in sink.batches


def test_a_store_that_cannot_be_written_fails_the_batch_and_keeps_the_state() -> None:
    class BrokenSink(ListSink):
        def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> None:
            if table == "events":
                raise StoreError("events: read-only file system")
            super().write(table, rows, writer, seq)

    worker, clean = _worker(BrokenSink()), _worker(ListSink())
    batches, _ = _batches()
    RunningTotals.calls = 0
    with pytest.raises(StoreError):
        worker.apply(0, batches[0])
    assert RunningTotals.calls == 1  # no bisection: the rewind restores the base state
    assert worker.next_seq == 0 and worker.snapshot() == clean.snapshot()


def test_a_batch_that_fails_whole_while_every_event_passes_is_not_poison() -> None:
    def at_most_ten(events: pa.Table) -> None:
        if events.num_rows > 10:
            raise ValueError("too many")

    worker = PartitionWorker(0, ListSink(), steps=_steps(_pipeline(small=at_most_ten)))
    with pytest.raises(Exception, match="too many"):
        worker.apply(0, _orders([1.0] * 40, ["c1"] * 40))
    assert worker.next_seq == 0


def test_a_stage_batch_reports_the_positions_of_its_poison_events() -> None:
    batch = _orders([5.0, -1.0, 3.0, -2.0], ["a", "b", "a", "c"])
    batch = batch.append_column(ROW_POSITION, pa.array([10, 11, 12, 13], pa.int64()))
    worker = _worker(ListSink(), [])
    worker.store_events = False
    receipt = worker.apply(0, batch)
    assert receipt.poisoned is not None and receipt.poisoned.to_pylist() == [11, 13]
    dead = worker.sink.table("deadletter")  # type: ignore[attr-defined]
    assert b"_pos" not in dead["raw"][0].as_py()


def test_a_local_run_dead_letters_poison_events_and_balances_its_counts() -> None:
    def reject_negative(events: pa.Table) -> None:
        amounts = pc.struct_field(events.column("data"), "amount")
        if pc.any(pc.less(amounts, 0)).as_py():
            raise ValueError("negative amount")

    pipeline = _pipeline(guard=reject_negative)
    events = [{"id": f"e{i}", "type": "order.created",
               "at": (START + dt.timedelta(seconds=i)).isoformat(),
               "data": {"customer": f"c{i % 5}", "amount": -1.0 if i % 97 == 3 else 2.0}}
              for i in range(1000)]
    out = run_local(pipeline, events)
    summary = out["summary"].row(0, named=True)
    poison = {f"e{i}" for i in range(1000) if i % 97 == 3}
    assert summary["dead_lettered"] == len(poison) and summary["stored"] == 1000 - len(poison)
    assert set(out["deadletter"]["event_id"]) == poison
    assert not poison & set(out["events"]["event_id"])


STAGE_MODULE = '''
import polars as pl
import pyarrow as pa

from pipelines.processing import ROW_POSITION, Step, StepOutput


class Counting(Step):
    """An enrichment stage: each key's running count; it raises on a negative amount after
    counting it (partial mutation)."""

    columns = ("_count",)
    reads = ("amount",)

    def __init__(self, spec, context=None):
        self.spec, self.name, self.counts = spec, spec.name, {}

    def process(self, events):
        out = []
        for key, amount in zip(events["key"].to_pylist(),
                               events["data"].combine_chunks().field("amount").to_pylist()):
            self.counts[key] = self.counts.get(key, 0) + 1
            if amount < 0:
                raise ValueError("negative amount")
            out.append(float(self.counts[key]))
        return StepOutput(derived=pa.table({ROW_POSITION: events[ROW_POSITION],
                                            "_count": pa.array(out, pa.float64())}))

    def snapshot(self):
        return self.counts

    def restore(self, state):
        self.counts = dict(state or {})


class Recorder(Step):
    """A partition step that keeps the stage's column in a table of its own."""

    def __init__(self, spec, context=None):
        self.spec, self.name = spec, spec.name

    def process(self, events):
        frame = pl.from_arrow(events).select("event_id", "event_type", "timestamp", "_count")
        return StepOutput(tables={"counts": frame.to_arrow()})

    def snapshot(self):
        return None

    def restore(self, state):
        pass
'''


def test_an_enrichment_stage_dead_letters_its_poison_events_and_drops_them(tmp_path: Path) -> None:
    (tmp_path / "stage_kinds.py").write_text(STAGE_MODULE)

    def pipeline() -> Pipeline:
        return Pipeline.from_dict({
            "name": "orders", "source": {"format": "jsonl", "path": ["-"], "batch_size": 64},
            "mapping": {"event_id": "id", "event_type": "type", "timestamp": "at",
                        "payload": {"json": "data"}},
            "event_types": {"order.created": {"key": "customer", "payload": {
                "customer": "str", "shop": "str", "amount": "float"}}},
            "enrich": [{"name": "shops", "kind": "stage_kinds:Counting", "key": "shop",
                        "partitions": 2, "event_types": ["order.created"]}],
            "steps": [{"kind": "stage_kinds:Recorder", "name": "recorder"}]}, base_dir=tmp_path)

    def orders(skip: set[int]) -> list[dict[str, Any]]:
        return [{"id": f"e{i}", "type": "order.created",
                 "at": (START + dt.timedelta(seconds=i)).isoformat(),
                 "data": {"customer": f"c{i % 5}", "shop": f"s{i % 3}",
                          "amount": -1.0 if i in poison else 2.0}}
                for i in range(400) if i not in skip]

    poison = {5, 6, 100, 399}
    out, clean = run_local(pipeline(), orders(set()), tables=("events", "deadletter", "counts")), \
        run_local(pipeline(), orders(poison), tables=("events", "counts"))
    summary = out["summary"].row(0, named=True)
    assert (summary["stored"], summary["dead_lettered"]) == (400 - len(poison), len(poison))
    assert set(out["deadletter"]["event_id"]) == {f"e{i}" for i in poison}
    assert set(out["deadletter"]["reason"]) == {"processor_error"}
    assert out["deadletter"]["part"].str.contains("-stage.shops.000[01]$").all()
    assert out["events"]["event_id"].sort().equals(clean["events"]["event_id"].sort())
    assert out["counts"].sort("event_id").equals(clean["counts"].sort("event_id"))


class FlaggedTally(RunningTotals):
    """The running totals, failing with an error of the environment on the batch holding
    ``e300`` while ``flag`` exists (a crash after some checkpoints)."""

    def __init__(self, flag: Path) -> None:
        super().__init__()
        self.flag = flag

    def process(self, events: pa.Table) -> list[dict[str, Any]]:
        if self.flag.exists() and "e300" in events["event_id"].to_pylist():
            raise OSError("disk unplugged")
        return super().process(events)


def test_a_resumed_run_keeps_the_dead_letters_of_before_its_checkpoint(tmp_path: Path) -> None:
    poison = {17, 120, 251, 400}
    lines = [{"id": f"e{i}", "type": "order.created",
              "at": (START + dt.timedelta(seconds=i)).isoformat(),
              "data": {"customer": f"c{i % 7}", "amount": -1.0 if i in poison else 3.0}}
             for i in range(600)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    flag = tmp_path / "unplugged"
    flag.touch()

    def pipeline() -> Pipeline:
        base = _pipeline(totals=FlaggedTally(flag)).spec.model_dump(by_alias=True, exclude_unset=True)
        base.pop("steps")
        base["source"] = {**base["source"], "batch_size": 50}
        base["runtime"] = {"partitions": 2, "checkpoint_every": 2}
        return Pipeline.from_dict(base).register_processor(
            ["order.created"], FlaggedTally(flag), name="totals")

    def run(store: Path, resume: bool = False) -> dict[str, Any]:
        return pipeline().run(store=store, runner="local", inputs=[str(tmp_path / "in.jsonl")],
                              resume=resume)

    with pytest.raises(ProcessorError, match="OSError: disk unplugged"):
        run(tmp_path / "crashed")
    flag.unlink()
    resumed, clean = run(tmp_path / "crashed", resume=True), run(tmp_path / "clean")
    assert resumed["dead_lettered"] == clean["dead_lettered"] == len(poison)
    for table, columns in (("events", ["event_id", "key", "data"]),
                           ("deadletter", ["event_id", "reason", "message", "part"])):
        got, want = (pl.read_parquet(root / table / "**" / "*.parquet").select(columns)
                     .sort("event_id") for root in (tmp_path / "crashed", tmp_path / "clean"))
        assert got.equals(want), table
