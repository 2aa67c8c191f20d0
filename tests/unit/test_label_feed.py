"""The label feed released by the source's robust watermark (pipelines.labels + event_time)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipelines.envelope import envelope_schema
from pipelines.event_time import EventTimeOrderer, WatermarkPolicy
from pipelines.fraud.features import handbook_features_batch
from pipelines.fraud.flow import POSITION, FraudStep, FraudStepSpec, TerminalRiskStage, TerminalStageSpec
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
from pipelines.labels import LabelFeed
from pipelines.spec import PipelineSpec
from tests.support import FEATURES, fraud_spec, mismatches, normalised_batches

LATENESS = dt.timedelta(minutes=20)


@pytest.fixture(scope="module")
def transactions() -> pa.Table:
    return simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=40, seed=5))


def feed_for(spec: PipelineSpec) -> LabelFeed:
    assert spec.labels is not None
    return LabelFeed(spec.labels, spec.registry(), envelope_schema(spec.registry()))


def label_times(table: pa.Table) -> np.ndarray:
    labels = table.filter(pa.compute.equal(table.column("event_type"), "fraud.reported"))
    return labels.column("timestamp").cast(pa.int64()).to_numpy()


def ordered_stream(spec: PipelineSpec, arrivals: list[pa.Table]) -> list[pa.Table]:
    """Arrival batches through the reorder buffer and the label feed, as the driver should."""
    # the handbook's transactions of one instant are ordered by id, as in its files
    orderer = EventTimeOrderer(WatermarkPolicy(lateness=LATENESS), tiebreak="data.TRANSACTION_ID")
    feed = feed_for(spec)
    out = []
    for events in arrivals:
        ordered = orderer.push(events)
        assert ordered.late.num_rows == 0
        out.append(feed.merge(ordered.released, orderer.watermark_us)[0])
    rest = orderer.flush()
    out += [feed.merge(rest, orderer.watermark_us)[0], feed.flush()]
    return out


def features_of(stream: list[pa.Table]) -> pl.DataFrame:
    stage = TerminalRiskStage(TerminalStageSpec(name="terminal", key="TERMINAL_ID"))
    step = FraudStep(FraudStepSpec(kind="fraud"))
    scores = []
    for merged in stream:
        if merged.num_rows == 0:
            continue
        merged = merged.append_column(POSITION, pa.array(np.arange(merged.num_rows)))
        added = pl.from_arrow(stage.process(merged).derived)
        frame = pl.from_arrow(merged).join(added, on=POSITION, how="left", maintain_order="left")
        tables = step.process(frame.to_arrow()).tables
        if "scores" in tables:  # a batch of labels only scores nothing
            scores.append(pl.from_arrow(tables["scores"]))
    return pl.concat(scores)


def test_delayed_arrival_through_the_orderer_gives_the_batch_reference(transactions: pa.Table) -> None:
    rng = np.random.default_rng(7)
    times = transactions.column("TX_DATETIME").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()
    delay = rng.integers(0, LATENESS // dt.timedelta(microseconds=1) + 1, len(times))
    arrived = transactions.take(pa.array(np.argsort(times + delay, kind="stable")))
    spec = fraud_spec()
    online = features_of(ordered_stream(spec, normalised_batches(spec, arrived, 1_500)))
    assert mismatches(online, handbook_features_batch(transactions)) == dict.fromkeys(FEATURES, 0)


def test_an_explicit_watermark_at_the_batch_maximum_changes_nothing(transactions: pa.Table) -> None:
    spec = fraud_spec()
    default, explicit = feed_for(spec), feed_for(spec)
    for events in normalised_batches(spec, transactions, 3_000):
        top = int(events.column("timestamp").cast(pa.int64()).to_numpy().max())
        assert default.merge(events)[0].equals(explicit.merge(events, top)[0])
    assert default.flush().equals(explicit.flush())


def test_many_small_batches_equal_one_large_one(transactions: pa.Table) -> None:
    # >64 batches make the feed merge its chunks: the stream must not change
    spec = fraud_spec()
    small, large = feed_for(spec), feed_for(spec)
    got = [small.merge(b)[0] for b in normalised_batches(spec, transactions, 250)] + [small.flush()]
    want = [large.merge(b)[0] for b in normalised_batches(spec, transactions, 50_000)]
    assert pa.concat_tables(got).equals(pa.concat_tables([*want, large.flush()]))


def test_one_far_future_row_releases_no_label_early(transactions: pa.Table) -> None:
    spec = fraud_spec()
    batches = normalised_batches(spec, transactions, 2_000)
    # one transaction dated 2030 in the middle of the replay
    victim = batches[len(batches) // 2]
    times = victim.column("timestamp").cast(pa.int64()).to_numpy().copy()
    times[100] = int(dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
    column = pa.array(times, pa.int64()).cast(victim.schema.field("timestamp").type)
    batches[len(batches) // 2] = victim.set_column(
        victim.schema.get_field_index("timestamp"), victim.schema.field("timestamp"), column)

    # the batch maximum as watermark leaks every pending label at once
    leaky = feed_for(spec)
    leaked = [leaky.merge(b)[0] for b in batches]
    assert label_times(leaked[len(batches) // 2]).max() > times[:100].max() + 8 * 86_400_000_000

    # the orderer's watermark does not: no label is released ahead of the bulk's time
    orderer, feed = EventTimeOrderer(WatermarkPolicy(lateness=LATENESS)), feed_for(spec)
    released_labels = 0
    for events in batches:
        released = orderer.push(events).released
        merged = feed.merge(released, orderer.watermark_us)[0]
        assert orderer.watermark_us is not None
        assert orderer.watermark_us < dt.datetime(2019, 1, 1, tzinfo=dt.UTC).timestamp() * 1e6
        assert (label_times(merged) <= orderer.watermark_us).all()
        released_labels += len(label_times(merged))
    assert 0 < released_labels < transactions.num_rows


def test_a_watermark_alone_releases_due_labels(transactions: pa.Table) -> None:
    # an idle source's watermark moves without new events: its due labels still flow
    spec = fraud_spec()
    feed = feed_for(spec)
    events = normalised_batches(spec, transactions, 1_000)[0]
    assert feed.merge(events, watermark_us=None)[1] == 0
    times = events.column("timestamp").cast(pa.int64()).to_numpy()
    week = 7 * 86_400_000_000
    cut = int(np.median(times)) + week
    merged, released = feed.merge(events.slice(0, 0), watermark_us=cut)
    assert released == merged.num_rows == int((times + week <= cut).sum()) > 0
    assert (label_times(merged) <= cut).all()
    assert feed.flush().num_rows == events.num_rows - released
