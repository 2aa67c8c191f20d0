"""The live fraud path's cheap routes give exactly what the general ones give.

A live partition applies batches of one to a few events, so the terminal stage, the fraud
step, the window operator and the decisions of a batch take shortcuts that skip Polars
queries (Arrow and numpy instead, searches one by one, no alert frames when nothing is
flagged, lookups instead of joins). Each test feeds the same events through a shortcut and
through the general route (one event at a time, in threes and as one batch; an Arrow batch
and a Polars one; a lookup and a join) and asks for the same bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines import keyed
from pipelines.envelope import PayloadSchema, envelope_schema
from pipelines.features import DAY, Aggregate, KeyedWindowOperator, KeyedWindowSpec, Window
from pipelines.fraud.features import CUSTOMER_HISTORY_FEATURES, HistoryFeatures, history_features_batch
from pipelines.fraud.flow import (
    POSITION,
    FraudStep,
    FraudStepSpec,
    ModelRef,
    TerminalRiskStage,
    TerminalStageSpec,
)
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
from pipelines.keyed import decisions_of
from pipelines.labels import LabelFeed
from pipelines.processing import StepContext, StepOutput
from tests.support import fraud_spec, normalised_batches, train_into


@pytest.fixture(scope="module")
def transactions() -> pa.Table:
    return simulate_transactions(SimulationSpec(n_customers=8, n_terminals=16, n_days=45, seed=7))


@pytest.fixture(scope="module")
def merged(transactions: pa.Table) -> pa.Table:
    """The transactions as normalised events, with their label events merged in."""
    spec = fraud_spec()
    feed = LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))
    return pa.concat_tables(feed.merge(events)[0] for events in normalised_batches(spec, transactions, 10**6))


def run_live(merged: pa.Table, registry: Path, size: int) -> dict[str, object]:
    """The terminal stage and a scoring fraud step over ``merged`` cut in batches of ``size``:
    the rows of every table they wrote, their alert events and their final states."""
    spec = fraud_spec()
    payloads = spec.registry()
    payloads.register(PayloadSchema("fraud.suspected", None, version=1, key="CUSTOMER_ID"))
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    step = FraudStep(FraudStepSpec(kind="fraud", threshold=0.05,
                                   model=ModelRef(registry=str(registry), name="fraud")),
                     StepContext(envelope_schema(payloads), payloads))
    tables: dict[str, list[pa.Table]] = {"scores": [], "alerts": [], "derived": [], "transit": []}
    for start in range(0, merged.num_rows, size):
        events = merged.slice(start, size)
        events = events.append_column(POSITION, pa.array(np.arange(events.num_rows)))
        transit = stage.process(events).derived
        assert transit is not None
        tables["transit"].append(transit)
        joined = pl.from_arrow(events).join(pl.from_arrow(transit), on=POSITION, how="left",
                                            maintain_order="left")
        out = step.process(joined.to_arrow())
        tables["scores"] += [out.tables["scores"]] if "scores" in out.tables else []
        tables["alerts"] += [out.tables["alerts"]] if "alerts" in out.tables else []
        tables["derived"] += [out.derived] if out.derived is not None else []
    rows = {name: pa.concat_tables(parts).combine_chunks() for name, parts in tables.items() if parts}
    rows["transit"] = rows["transit"].drop_columns([POSITION])  # positions restart per batch
    return rows | {"states": json.dumps([stage.snapshot(), step.snapshot()["customer"],
                                         step.snapshot()["history"]])}


def test_one_three_and_all_events_per_batch_give_the_same_rows_and_state(
    tmp_path: Path, transactions: pa.Table, merged: pa.Table
) -> None:
    train_into(tmp_path / "registry", transactions, seed=0)
    one, three, whole = (run_live(merged, tmp_path / "registry", size) for size in (1, 3, merged.num_rows))
    assert one["alerts"].num_rows > 0  # type: ignore[attr-defined]
    assert one["scores"].num_rows == transactions.num_rows  # type: ignore[attr-defined]
    for name in ("scores", "alerts", "derived", "transit", "states"):
        assert one[name] == three[name] == whole[name], name


def test_the_streamed_history_features_equal_the_offline_ones_one_event_at_a_time(
    transactions: pa.Table,
) -> None:
    online = HistoryFeatures()
    streamed = pl.concat([online.update(transactions.slice(i, 1)) for i in range(transactions.num_rows)])
    offline = history_features_batch(transactions).select(CUSTOMER_HISTORY_FEATURES)
    assert streamed.equals(offline)


def test_history_inputs_outside_the_numpy_route_give_the_same_features(transactions: pa.Table) -> None:
    """Nanosecond times go through the Polars expressions instead of numpy: the same bits."""
    plain, other = HistoryFeatures(), HistoryFeatures()
    frame = pl.from_arrow(transactions)
    assert isinstance(frame, pl.DataFrame)
    nanos = frame.with_columns(pl.col("TX_DATETIME").dt.cast_time_unit("ns")).to_arrow()
    for start in range(0, transactions.num_rows, 7):
        assert plain.update_arrow(transactions.slice(start, 7)).equals(
            other.update_arrow(nanos.slice(start, 7)))
    assert plain.snapshot() == other.snapshot()


def every_kind() -> KeyedWindowSpec:
    aggregates = []
    for name, window in {"1d": Window(DAY), "late": Window(3 * DAY, delay=2 * DAY)}.items():
        aggregates += [Aggregate(f"n_{name}", "count", window),
                       Aggregate(f"mean_{name}", "mean", window, "TX_AMOUNT"),
                       Aggregate(f"min_{name}", "min", window, "TX_AMOUNT"),
                       Aggregate(f"last_{name}", "last", window, "TX_AMOUNT"),
                       Aggregate(f"share_{name}", "share", window, "TX_FRAUD", empty=0.0)]
    return KeyedWindowSpec("TERMINAL_ID", "TX_DATETIME", tuple(aggregates), carry_residual=True)


@pytest.mark.parametrize("size", [1, 16, 17, 64])
def test_an_arrow_batch_and_a_polars_one_of_any_size_give_the_same_features(
    transactions: pa.Table, size: int
) -> None:
    """Arrow batches are read with numpy, Polars ones with Series casts; whatever the batch's
    size, the features and the state are those of the whole history in one batch."""
    spec = every_kind()
    by_arrow, by_polars, whole = (KeyedWindowOperator(spec) for _ in range(3))
    frame = pl.from_arrow(transactions)
    assert isinstance(frame, pl.DataFrame)
    parts = [(by_arrow.update_arrow(transactions.slice(start, size)),
              by_polars.update(frame.slice(start, size)))
             for start in range(0, transactions.num_rows, size)]
    arrow = pl.from_arrow(pa.concat_tables(part for part, _ in parts))
    assert isinstance(arrow, pl.DataFrame)
    assert arrow.equals(pl.concat([part for _, part in parts]))
    assert arrow.equals(whole.update(frame))
    assert by_arrow.snapshot() == by_polars.snapshot() == whole.snapshot()


@pytest.mark.parametrize("size", [1, 3, 17])
def test_numpy_features_are_the_arrow_ones_as_floats(transactions: pa.Table, size: int) -> None:
    """update_numpy (the terminal stage's path) gives update_arrow's values bit for bit, an
    empty window's null as NaN, in input order, and leaves the same state."""
    by_arrow, by_numpy = KeyedWindowOperator(every_kind()), KeyedWindowOperator(every_kind())
    shuffled = transactions.take(pa.array(np.random.default_rng(3).permutation(transactions.num_rows)))
    shuffled = shuffled.sort_by([("TX_DATETIME", "ascending")])  # keys interleaved, in time order
    nulls = 0
    for start in range(0, shuffled.num_rows, size):
        arrow = by_arrow.update_arrow(shuffled.slice(start, size))
        floats = by_numpy.update_numpy(shuffled.slice(start, size))
        assert list(floats) == arrow.column_names
        for name in arrow.column_names:
            expected = np.asarray(arrow.column(name).to_numpy(), dtype=np.float64)
            assert floats[name].dtype == np.float64
            assert np.array_equal(floats[name], expected, equal_nan=True), name
            assert np.array_equal(np.signbit(floats[name]), np.signbit(expected)), name
            nulls += arrow.column(name).null_count
    assert nulls > 0  # empty windows were met
    assert by_arrow.snapshot() == by_numpy.snapshot()


def test_a_batch_of_other_event_types_and_one_of_labels_only(merged: pa.Table) -> None:
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    events = merged.append_column(POSITION, pa.array(np.arange(merged.num_rows)))
    labels = events.filter(pc.equal(events.column("event_type"), "fraud.reported"))
    assert labels.num_rows
    assert stage.process(labels.slice(0, 1)).derived.num_rows == 0  # type: ignore[union-attr]
    kind = events.schema.get_field_index("event_type")
    assert events.column(kind).to_pylist()[:2] == ["transaction.created"] * 2
    other = pa.concat_tables([events.slice(0, 2), events.slice(0, 1).set_column(
        kind, events.schema.field(kind), pa.array(["audit.logged"], events.schema.field(kind).type))])
    out = TerminalRiskStage(stage.spec).process(other).derived
    assert out is not None and out.column(POSITION).to_pylist() == [0, 1]
    step = FraudStep(FraudStepSpec(kind="fraud"))
    assert step.process(other.slice(2)).tables == {}


def decided(kept: pa.Table, outputs: list[tuple[str, StepOutput]], *, joins: bool) -> pa.Table:
    if not joins:
        return decisions_of(kept, outputs)
    original, keyed._decisions_by_lookup = keyed._decisions_by_lookup, lambda *_: None
    try:
        return decisions_of(kept, outputs)
    finally:
        keyed._decisions_by_lookup = original


def scores(ids: list[str], model: str = "m:1") -> pa.Table:
    return pa.table({"event_id": ids, "model": [model] * len(ids),
                     "score": [0.1 * i for i in range(len(ids))]})


def alerts(ids: list[str]) -> pa.Table:
    return pa.table({"event_id": ids, "event_type": ["fraud.suspected"] * len(ids),
                     "threshold": [0.5] * len(ids)})


@pytest.mark.parametrize("outputs", [
    [],
    [("fraud", StepOutput(tables={"scores": scores(["b", "a"]), "alerts": alerts(["a"])}))],
    [("fraud", StepOutput(tables={"scores": scores(["a"]), "alerts": alerts([])}))],
    [("fraud", StepOutput(tables={"scores": scores(["a", "c"])}))],
    [("fraud", StepOutput(tables={"scores": scores(["a", "a"]), "alerts": alerts(["a"])}))],
    [("fraud", StepOutput(tables={"scores": scores(["a"])})),
     ("other", StepOutput(tables={"scores": scores(["a", "b"], "o:2"), "alerts": alerts(["b"])}))],
    [("fraud", StepOutput(tables={"alerts": alerts(["a"])}))],
])
def test_decisions_by_lookup_equal_the_joins(outputs: list[tuple[str, StepOutput]]) -> None:
    kept = pa.table({"event_id": ["a", "b", None, "a", "d"]})
    assert decided(kept, outputs, joins=False).equals(decided(kept, outputs, joins=True))
