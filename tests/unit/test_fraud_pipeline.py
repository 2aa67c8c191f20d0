"""The fraud flow without Ray: label events, the terminal stage, the fraud step, the runner.

Online equals offline: the features the two keyed stages stream equal the Polars batch
reference :func:`pipelines.fraud.features.handbook_features_batch` over the same history.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from cluster.driver import run_pipeline
from cluster.job import run_spec
from cluster.partitions import LocalPartitions
from models.fraud import MODEL_PRESETS, SHIPPED_RECIPE
from models.registry import ModelRegistry
from pipelines.envelope import PayloadSchema, envelope_schema
from pipelines.features import StateRestoreError
from pipelines.fraud.data import offline_features
from pipelines.fraud.features import (
    CUSTOMER_HISTORY_FEATURES,
    HISTORY_FEATURES,
    TERMINAL_HISTORY_FEATURES,
    HistoryFeatures,
    handbook_features_batch,
    history_features_batch,
    terminal_history_features,
)
from pipelines.fraud.flow import (
    POSITION,
    FraudStep,
    FraudStepSpec,
    ModelRef,
    TerminalRiskStage,
    TerminalStageSpec,
)
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.labels import LabelFeed
from pipelines.processing import StepContext
from pipelines.spec import EnrichSpec, PipelineSpec
from tests.support import FEATURES, fraud_spec, mismatches, normalised_batches, train_into

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def transactions() -> pa.Table:
    return simulate_transactions(SimulationSpec(n_customers=300, n_terminals=600, n_days=75, seed=3))


def stream_features(
    spec: PipelineSpec, table: pa.Table, size: int, restart_at: int | None = None
) -> pl.DataFrame:
    """Both stages in one process, the way the driver joins them (by row position); with
    ``restart_at``, both are replaced by fresh ones restored from their snapshots there."""
    feed = LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    step = FraudStep(FraudStepSpec(kind="fraud"))
    scores = []
    for i, events in enumerate(normalised_batches(spec, table, size)):
        if i == restart_at:
            states = json.loads(json.dumps([stage.snapshot(), step.snapshot()]))  # as checkpoints keep them
            stage, step = TerminalRiskStage(stage.spec), FraudStep(step.spec)
            stage.restore(states[0])
            step.restore(states[1])
        merged, _ = feed.merge(events)
        merged = merged.append_column(POSITION, pa.array(np.arange(merged.num_rows)))
        added = pl.from_arrow(stage.process(merged).derived)
        frame = pl.from_arrow(merged).join(added, on=POSITION, how="left", maintain_order="left")
        scores.append(pl.from_arrow(step.process(frame.to_arrow()).tables["scores"]))
    return pl.concat(scores)


@pytest.mark.parametrize("size", [997, 20_000])
def test_two_stage_stream_equals_the_batch_reference(transactions: pa.Table, size: int) -> None:
    online = stream_features(fraud_spec(), transactions, size)
    assert mismatches(online, handbook_features_batch(transactions)) == dict.fromkeys(FEATURES, 0)


@pytest.mark.parametrize(("size", "restart_at"), [(997, 40), (20_000, 2)])
def test_history_features_stream_equal_the_batch_reference(
    transactions: pa.Table, size: int, restart_at: int
) -> None:
    """The features beyond the handbook's 15 (customer history, customer-terminal novelty,
    terminal history): streamed through both stages, cut anywhere and restored from
    snapshots mid-stream, they equal the offline reference bit for bit."""
    online = stream_features(fraud_spec(), transactions, size, restart_at=restart_at)
    offline = history_features_batch(transactions)
    assert mismatches(online, offline, list(HISTORY_FEATURES)) == dict.fromkeys(HISTORY_FEATURES, 0)
    assert online.select(HISTORY_FEATURES).null_count().sum_horizontal().item() == 0
    # the features carry information: novel terminals, known frauds, amounts off the history
    assert (online["CUSTOMER_TERMINAL_NB_TX_BEFORE_30DAY_WINDOW"] == 0).any()
    assert (online["TERMINAL_ID_DAYS_SINCE_FIRST_KNOWN_FRAUD"] >= 7).any()
    assert online["CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW"].n_unique() > 100


def test_history_features_do_not_depend_on_how_the_events_are_batched(transactions: pa.Table) -> None:
    """One event at a time, as after a restart or in a live run, gives the very bits of a
    whole batch: Polars divides a one-row column by a scalar differently from a longer one,
    so the features must not divide by constants."""
    head = pl.from_arrow(transactions).head(400)
    online = HistoryFeatures()
    singles = pl.concat([online.update(head.slice(i, 1)) for i in range(head.height)])
    offline = history_features_batch(head).select(CUSTOMER_HISTORY_FEATURES)
    assert singles.equals(offline)
    assert (singles["CUSTOMER_ID_HOURS_SINCE_LAST_TX"] != 720.0).sum() > 50
    now = pl.Series(np.linspace(1.5e15, 1.6e15, 300))
    terminal = pl.DataFrame({name: np.zeros(300) for name in TERMINAL_HISTORY_FEATURES if "_RISK_" in name}
                            ).with_columns(_TERMINAL_FIRST_FRAUD_US=now - 12_345_678.0,
                                           _TERMINAL_LAST_FRAUD_US=now - 98_765.0)
    whole = terminal_history_features(now, terminal)
    assert pl.concat([terminal_history_features(now.slice(i, 1), terminal.slice(i, 1))
                      for i in range(300)]).equals(whole)


def test_history_features_never_read_a_label_before_its_delay(transactions: pa.Table) -> None:
    """Flipping the labels of the transactions of the last 7 days of the stream changes no
    feature: they are not known yet at any transaction of the stream."""
    frame = pl.from_arrow(transactions)
    last = frame["TX_DATETIME"].max() - dt.timedelta(days=7)
    flipped = frame.with_columns(
        TX_FRAUD=pl.when(pl.col("TX_DATETIME") > last).then(1 - pl.col("TX_FRAUD")).otherwise("TX_FRAUD"))
    assert history_features_batch(flipped).equals(history_features_batch(frame))
    # while labels 7 days old do count
    older = frame.with_columns(TX_FRAUD=pl.lit(1, pl.Int64))
    assert not history_features_batch(older).equals(history_features_batch(frame))


def test_label_events_come_a_delay_later_and_before_same_time_transactions(transactions: pa.Table) -> None:
    spec = fraud_spec()
    feed = LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))
    merged = [feed.merge(events)[0] for events in normalised_batches(spec, transactions, 5000)]
    rest = feed.flush()
    stream = pl.from_arrow(pa.concat_tables([*merged, rest]))
    labels = stream.filter(pl.col("event_type") == "fraud.reported")
    assert labels.height == transactions.num_rows and labels["event_id"].n_unique() == labels.height
    # each label is exactly 7 days after its transaction, and carries its label
    tx = pl.from_arrow(transactions).select(
        "TRANSACTION_ID", "TX_FRAUD",
        due=pl.col("TX_DATETIME").dt.replace_time_zone("UTC") + dt.timedelta(days=7))
    got = labels.select(pl.col("data").struct.field("TRANSACTION_ID", "TX_FRAUD"), "timestamp").join(
        tx, on="TRANSACTION_ID", suffix="_tx")
    assert (got["timestamp"].dt.cast_time_unit("us") == got["due"].dt.cast_time_unit("us")).all()
    assert (got["TX_FRAUD"] == got["TX_FRAUD_tx"]).all()
    # the stream never goes back in time, and a label precedes transactions of its instant
    times = stream["timestamp"].to_numpy()
    assert (np.diff(times.astype("int64")) >= 0).all()
    # a label's payload carries only its fields: no amount
    assert labels["data"].struct.field("TX_AMOUNT").null_count() == labels.height
    # the pipeline produced it: its type's current version, as text
    assert set(labels["metadata"].struct.field("version")) == {
        str(spec.registry().schema_for("fraud.reported").version)}


def test_label_feed_snapshot_restore_round_trip(transactions: pa.Table) -> None:
    spec = fraud_spec()
    schema = envelope_schema(spec.registry())
    batches = normalised_batches(spec, transactions, 4000)
    whole = LabelFeed(spec.labels, spec.registry(), schema)
    expected = [whole.merge(b)[0] for b in batches] + [whole.flush()]
    first = LabelFeed(spec.labels, spec.registry(), schema)
    got = [first.merge(b)[0] for b in batches[:5]]
    second = LabelFeed(spec.labels, spec.registry(), schema)
    second.restore(first.snapshot())
    got += [second.merge(b)[0] for b in batches[5:]] + [second.flush()]
    assert pa.concat_tables(got).equals(pa.concat_tables(expected))


def test_stage_state_survives_snapshot_restore(transactions: pa.Table) -> None:
    spec = fraud_spec()
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    step = FraudStep(FraudStepSpec(kind="fraud"))
    fresh_stage = TerminalRiskStage(stage.spec)
    fresh_step = FraudStep(step.spec)
    fresh_stage.restore(stage.snapshot())
    fresh_step.restore(step.snapshot())
    assert fresh_stage.snapshot() == stage.snapshot() and fresh_step.snapshot() == step.snapshot()
    assert stream_features(spec, transactions.slice(0, 3000), 1000).height == 3000


def test_the_step_scores_alerts_and_picks_up_a_new_version(tmp_path: Path, transactions: pa.Table) -> None:
    spec = fraud_spec()
    registry = tmp_path / "registry"
    train_into(registry, transactions, seed=0)
    step_spec = FraudStepSpec(kind="fraud", threshold=0.3,
                              model=ModelRef(registry=str(registry), name="fraud", reload_every=2))
    payloads = spec.registry()  # alert events carry their own type's current version
    payloads.register(PayloadSchema("fraud.suspected", None, version=3, key="CUSTOMER_ID"))
    step = FraudStep(step_spec, StepContext(envelope_schema(spec.registry()), payloads))
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    feed = LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))
    versions, alerts = [], 0
    for i, events in enumerate(normalised_batches(spec, transactions, 6000)):
        if i == 3:
            train_into(registry, transactions, seed=1)  # a new version while running
        merged = feed.merge(events)[0]
        merged = merged.append_column(POSITION, pa.array(np.arange(merged.num_rows)))
        added = pl.from_arrow(stage.process(merged).derived)
        frame = pl.from_arrow(merged).join(added, on=POSITION, how="left", maintain_order="left")
        out = step.process(frame.to_arrow())
        scores = pl.from_arrow(out.tables["scores"])
        assert scores["score"].is_between(0, 1).all() and scores["score"].null_count() == 0
        versions.append(scores["model"].unique().to_list())
        alerts += out.tables["alerts"].num_rows
        assert out.derived is None or out.derived.num_rows == out.tables["alerts"].num_rows
        if out.derived is not None:  # alert events carry the alert type's version
            assert set(pl.from_arrow(out.derived)["metadata"].struct.field("version")) <= {"3"}
    assert versions[0] == ["fraud:1"] and versions[-1] == ["fraud:2"]
    assert alerts > 0


def stage_frames(spec: PipelineSpec, transactions: pa.Table, size: int) -> list[pa.Table]:
    """The batches as the fraud step receives them (label events merged, terminal columns joined)."""
    feed = LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    frames = []
    for events in normalised_batches(spec, transactions, size):
        merged = feed.merge(events)[0]
        merged = merged.append_column(POSITION, pa.array(np.arange(merged.num_rows)))
        added = pl.from_arrow(stage.process(merged).derived)
        joined = pl.from_arrow(merged).join(added, on=POSITION, how="left", maintain_order="left")
        frames.append(joined.to_arrow())
    return frames


def test_a_restored_step_replays_with_the_model_version_of_its_checkpoint(
    tmp_path: Path, transactions: pa.Table
) -> None:
    """Snapshot with v1 in use, v2 appears in the registry, restore: the replayed batch is
    scored by v1 exactly as the first time, and ``latest`` is resolved again at the same
    batch count as before (v2 from there on)."""
    spec = fraud_spec()
    registry = tmp_path / "registry"
    train_into(registry, transactions, seed=0)
    step_spec = FraudStepSpec(kind="fraud", threshold=0.3,
                              model=ModelRef(registry=str(registry), name="fraud", reload_every=2))
    context = StepContext(envelope_schema(spec.registry()), spec.registry())
    frames = stage_frames(spec, transactions.slice(0, 30_000), 6000)
    step = FraudStep(step_spec, context)
    step.process(frames[0])
    checkpoint = json.loads(json.dumps(step.snapshot()))
    first = step.process(frames[1])
    assert checkpoint["model"] == {"version": 1, "batches": 1}
    train_into(registry, transactions, seed=1, model="hist_gradient_boosting")  # v2, while down
    restarted = FraudStep(step_spec, context)
    restarted.restore(checkpoint)
    replayed = restarted.process(frames[1])
    assert set(pl.from_arrow(replayed.tables["scores"])["model"]) == {"fraud:1"}
    assert replayed.tables["scores"].equals(first.tables["scores"])
    assert replayed.tables["alerts"].equals(first.tables["alerts"])
    assert replayed.derived is not None and first.derived is not None
    assert replayed.derived.equals(first.derived)  # the fraud.suspected events already stored
    after = pl.from_arrow(restarted.process(frames[2]).tables["scores"])
    assert set(after["model"]) == {"fraud:2"}  # batch 3: latest resolved again, as before the restart
    # a step that was never checkpointed with a model starts without one
    empty = FraudStep(step_spec, context)
    empty.restore(None)
    assert empty.slot.version is None and empty.slot.batches == 0


def test_the_shipped_recipe_scores_the_streamed_history_features(
    tmp_path: Path, transactions: pa.Table
) -> None:
    """A model on the 15 inputs plus the history features scores each streamed transaction
    as it scores the same transaction's offline features."""
    table = transactions.slice(0, 24_000)
    offline = offline_features(pl.from_arrow(table))
    model = MODEL_PRESETS[SHIPPED_RECIPE].build(seed=0, max_iter=10).fit(offline)
    registry = tmp_path / "registry"
    ModelRegistry(registry).save(model, name="fraud", created_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    spec = fraud_spec()
    step = FraudStep(FraudStepSpec(kind="fraud", model=ModelRef(registry=str(registry), name="fraud")),
                     StepContext(envelope_schema(spec.registry()), spec.registry()))
    scores = pl.concat([pl.from_arrow(step.process(frame).tables["scores"])
                        for frame in stage_frames(spec, table, 6000)])
    expected = offline.select("TRANSACTION_ID", expected=pl.Series(model.score(offline)))
    joined = scores.join(expected, on="TRANSACTION_ID")
    assert joined.height == table.num_rows and (joined["score"] == joined["expected"]).all()


def test_a_fraud_step_refuses_a_snapshot_that_is_not_its_own() -> None:
    step = FraudStep(FraudStepSpec(kind="fraud"))
    with pytest.raises(StateRestoreError):
        step.restore("an earlier format: the customer windows alone")
    with pytest.raises(StateRestoreError):
        step.restore(step.snapshot() | {"model": {"version": 1}})


def test_the_in_process_runner_stores_features_labels_and_no_transit_columns(tmp_path: Path) -> None:
    data = tmp_path / "tx"
    table = simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=45, seed=5))
    write_monthly(table, data)
    spec = fraud_spec(source={**fraud_spec().source.model_dump(exclude_none=True), "batch_size": 7000},
                      steps=[{"kind": "fraud"}])  # features only: no registry read
    summary = run_spec(spec, tmp_path / "store", inputs=[str(data)], in_process=True, progress=False)
    assert summary["events_in"] == table.num_rows
    assert summary["stored"] == 2 * table.num_rows  # transactions and their label events
    events = pl.scan_parquet(tmp_path / "store" / "events" / "**" / "*.parquet", hive_partitioning=True)
    assert not [c for c in events.collect_schema().names() if c.startswith("_")]
    scores = pl.read_parquet(tmp_path / "store" / "scores" / "**" / "*.parquet", hive_partitioning=True)
    assert mismatches(scores, handbook_features_batch(table)) == dict.fromkeys(FEATURES, 0)


class LateStageAnswers(LocalPartitions):
    """A stage executor whose answers come back late and out of order (a test double for
    slow, unevenly loaded stage actors): each batch is applied when submitted, but its
    receipt is held until a few more were submitted, then a random half of those held is
    handed back, shuffled."""

    def __init__(self, *args: object, lag: int = 3, seed: int = 0) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.lag, self.rng, self.held, self.most_held = lag, np.random.default_rng(seed), [], 0

    def poll(self, block: bool = False) -> list:
        self.held += super().poll()
        self.most_held = max(self.most_held, len(self.held))
        if len(self.held) <= self.lag and not block:
            return []
        # a waiting driver gets everything held; a look in passing a random half
        back = np.ones(len(self.held), bool) if block else self.rng.random(len(self.held)) < 0.5
        out = [r for r, b in zip(self.held, back, strict=True) if b]
        self.held = [r for r, b in zip(self.held, back, strict=True) if not b]
        return [out[i] for i in self.rng.permutation(len(out))]

    def in_flight(self) -> int:
        return len(self.held)


def test_slices_leave_the_stage_in_order_when_its_answers_come_back_out_of_order(tmp_path: Path) -> None:
    data = tmp_path / "tx"
    table = simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=45, seed=5))
    write_monthly(table, data)
    spec = fraud_spec(source={**fraud_spec().source.model_dump(exclude_none=True), "batch_size": 3000},
                      steps=[{"kind": "fraud"}])
    stages: list[LateStageAnswers] = []

    def stage_factory(run: str, stage: EnrichSpec) -> LateStageAnswers:
        stages.append(LateStageAnswers(stage.partitions, tmp_path / "store", run, spec, stage))
        return stages[-1]

    summary = run_pipeline(spec, lambda run: LocalPartitions(2, tmp_path / "store", run, spec),
                           tmp_path / "store", [str(data)], progress=False, stage_factory=stage_factory)
    assert stages[0].most_held >= 4  # answers were held back: several slices in the stage at once
    assert summary["stored"] == 2 * table.num_rows
    scores = pl.read_parquet(tmp_path / "store" / "scores" / "**" / "*.parquet", hive_partitioning=True)
    assert mismatches(scores, handbook_features_batch(table)) == dict.fromkeys(FEATURES, 0)
