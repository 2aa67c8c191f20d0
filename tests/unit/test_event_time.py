"""The robust watermark and the event-time reorder buffer (pipelines.event_time)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.event_time import EventTimeOrderer, RobustWatermark, WatermarkPolicy
from pipelines.testing import FakeClock

MINUTE = 60_000_000
BASE = 1_522_540_800_000_000  # 2018-04-01T00:00:00Z in microseconds
TS = pa.timestamp("us", tz="UTC")


def envelope(times: np.ndarray, ids: np.ndarray, keys: np.ndarray | None = None) -> pa.Table:
    keys = ids % 7 if keys is None else keys
    return pa.table({
        "timestamp": pa.array(np.asarray(times, np.int64), pa.int64()).cast(TS),
        "key": pa.array([f"k{k}" for k in keys]),
        "event_id": pa.array([f"e{i:07d}" for i in ids]),
    })


def in_order_stream(rng: np.random.Generator, n: int, gap_max: int = 3 * MINUTE) -> np.ndarray:
    """Non-decreasing times (ties included)."""
    return BASE + np.cumsum(rng.integers(0, gap_max, n))


def delayed_arrival(times: np.ndarray, rng: np.random.Generator, delay_max: int) -> np.ndarray:
    """Arrival order when every event is delayed by a random 0..delay_max."""
    return np.argsort(times + rng.integers(0, delay_max + 1, len(times)), kind="stable")


def run(orderer: EventTimeOrderer, table: pa.Table, cuts: list[int]) -> tuple[pa.Table, pa.Table]:
    """Push ``table`` cut at ``cuts``, then flush; returns (released, late) in total."""
    released, late = [], []
    bounds = [0, *sorted(set(cuts)), table.num_rows]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        out = orderer.push(table.slice(lo, hi - lo))
        released.append(out.released)
        late.append(out.late)
    released.append(orderer.flush())
    return pa.concat_tables(released), pa.concat_tables(late)


def ids(table: pa.Table) -> list[str]:
    return table.column("event_id").to_pylist()


def policy(minutes: float, **kw: object) -> WatermarkPolicy:
    return WatermarkPolicy(lateness=dt.timedelta(minutes=minutes), **kw)  # type: ignore[arg-type]


def test_in_order_input_comes_out_unchanged() -> None:
    rng = np.random.default_rng(1)
    table = envelope(in_order_stream(rng, 5_000), np.arange(5_000))
    released, late = run(EventTimeOrderer(policy(0)), table, [1_000, 1_001, 2_500, 4_000])
    assert ids(released) == ids(table)
    assert late.num_rows == 0


def test_random_delays_within_lateness_give_the_in_order_sequence() -> None:
    rng = np.random.default_rng(2)
    times = in_order_stream(rng, 20_000)
    table = envelope(times, np.arange(len(times)))
    arrival = table.take(pa.array(delayed_arrival(times, rng, 20 * MINUTE)))
    released, late = run(EventTimeOrderer(policy(20)), arrival, list(range(0, 20_000, 997)))
    assert late.num_rows == 0
    assert ids(released) == ids(table)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    lateness_min=st.integers(0, 30),
    n_cuts=st.integers(0, 30),
)
def test_any_displacement_within_lateness_and_any_split_yield_the_in_order_sequence(
    seed: int, n: int, lateness_min: int, n_cuts: int
) -> None:
    rng = np.random.default_rng(seed)
    times = in_order_stream(rng, n)
    table = envelope(times, np.arange(n), rng.integers(0, 5, n))
    arrival = table.take(pa.array(delayed_arrival(times, rng, lateness_min * MINUTE)))
    cuts = rng.integers(0, n + 1, n_cuts).tolist()
    released, late = run(EventTimeOrderer(policy(lateness_min, min_support=3)), arrival, cuts)
    assert late.num_rows == 0
    # stable by (time, arrival): equal times keep the order they arrived in
    expected = arrival.take(pa.array(np.argsort(
        arrival.column("timestamp").cast(pa.int64()).to_numpy(), kind="stable")))
    assert ids(released) == ids(expected)
    # and per key, event-time order
    for key in set(released.column("key").to_pylist()):
        mine = released.filter(pa.compute.equal(released.column("key"), key))
        key_times = mine.column("timestamp").cast(pa.int64()).to_numpy()
        assert (np.diff(key_times) >= 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(50, 400))
def test_events_displaced_beyond_lateness_are_late_never_reordered(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    times = in_order_stream(rng, n, gap_max=MINUTE)
    table = envelope(times, np.arange(n))
    # hold some events back by two hours (lateness is 10 minutes)
    held = rng.random(n) < 0.05
    arrival_time = times + np.where(held, 120 * MINUTE, 0)
    arrival = table.take(pa.array(np.argsort(arrival_time, kind="stable")))
    released, late = run(EventTimeOrderer(policy(10, min_support=3)), arrival,
                         list(range(0, n, 17)))
    assert sorted(ids(released) + ids(late)) == sorted(ids(table))
    released_times = released.column("timestamp").cast(pa.int64()).to_numpy()
    assert (np.diff(released_times) >= 0).all()  # the stream stays in order
    late_ids = set(ids(late))
    assert late_ids <= {f"e{i:07d}" for i in np.flatnonzero(held)}
    # every late event really is older than lateness behind an earlier arrival
    arrived = arrival.column("timestamp").cast(pa.int64()).to_numpy()
    for pos in np.flatnonzero(np.isin(ids(arrival), list(late_ids))):
        assert arrived[:pos].max() - arrived[pos] > 10 * MINUTE


def test_late_events_come_back_apart_in_arrival_order() -> None:
    orderer = EventTimeOrderer(policy(5, min_support=1))
    orderer.push(envelope(BASE + np.arange(100) * MINUTE, np.arange(100)))
    assert orderer.watermark_us == BASE + 94 * MINUTE
    out = orderer.push(envelope(np.array([BASE + 3 * MINUTE, BASE + 95 * MINUTE, BASE]),
                                np.array([500, 501, 502])))
    assert ids(out.late) == ["e0000500", "e0000502"]
    assert "e0000501" not in ids(out.late)


def test_one_far_future_row_does_not_move_the_watermark() -> None:
    times = BASE + np.arange(10_000) * MINUTE // 10
    times[5_000] = BASE + 7 * 365 * 24 * 60 * MINUTE  # a 2025 row in a 2018 replay
    table = envelope(times, np.arange(len(times)))
    orderer = EventTimeOrderer(policy(20))
    released = []
    for lo in range(0, 10_000, 1_000):
        out = orderer.push(table.slice(lo, 1_000))
        assert out.late.num_rows == 0
        released.append(out.released)
        assert orderer.watermark_us is not None
        assert orderer.watermark_us <= BASE + (lo + 1_000) * MINUTE // 10
    assert orderer.buffered < 1_000  # the bulk is released as it goes; the outlier waits
    tail = orderer.flush()
    assert ids(tail)[-1] == "e0005000"
    assert ids(pa.concat_tables([*released, tail])) == ids(table.take(
        pa.array(np.argsort(times, kind="stable"))))


def test_a_few_scattered_outliers_never_move_the_watermark() -> None:
    mark = RobustWatermark(WatermarkPolicy(min_support=10, outlier_share=0.01))
    future = BASE + 10**15
    for step in range(100):
        batch = BASE + step * 100 * MINUTE + np.arange(100) * MINUTE
        batch[step % 100] = future + step  # one outlier per batch
        mark.observe(batch)
        assert mark.value is not None and mark.value < future


def test_the_bulk_moves_the_watermark_past_the_lateness() -> None:
    mark = RobustWatermark(WatermarkPolicy(lateness=dt.timedelta(minutes=1), min_support=2))
    assert mark.observe(np.array([BASE])) is None  # one event is not support enough
    assert mark.observe(np.array([BASE + 5 * MINUTE])) == BASE - MINUTE
    assert mark.observe(np.array([BASE + 2 * MINUTE, BASE + 6 * MINUTE])) == BASE + MINUTE


def test_snapshot_restore_mid_stream_equals_an_uninterrupted_run() -> None:
    rng = np.random.default_rng(3)
    times = in_order_stream(rng, 6_000)
    table = envelope(times, np.arange(len(times)))
    arrival = table.take(pa.array(delayed_arrival(times, rng, 15 * MINUTE)))
    cuts = list(range(0, 6_000, 500))
    whole, _ = run(EventTimeOrderer(policy(15)), arrival, cuts)

    first = EventTimeOrderer(policy(15))
    before = [first.push(arrival.slice(lo, 500)).released for lo in cuts[:5]]
    second = EventTimeOrderer(policy(15))
    second.restore(first.snapshot())
    assert second.watermark_us == first.watermark_us and second.buffered == first.buffered
    after = [second.push(arrival.slice(lo, 500)).released for lo in cuts[5:]]
    resumed = pa.concat_tables([*before, *after, second.flush()])
    assert ids(resumed) == ids(whole)
    assert resumed.schema == arrival.schema


def test_snapshot_of_a_fresh_orderer_restores() -> None:
    schema = envelope(np.array([BASE]), np.array([0])).schema
    orderer = EventTimeOrderer(policy(1), schema=schema)
    copy = EventTimeOrderer(policy(1), schema=schema)
    copy.restore(orderer.snapshot())
    assert copy.watermark_us is None and copy.flush().schema == schema


def test_an_idle_source_holds_its_watermark_by_default() -> None:
    orderer = EventTimeOrderer(policy(5, min_support=1))
    orderer.push(envelope(BASE + np.arange(10) * MINUTE, np.arange(10)))
    mark = orderer.watermark_us
    assert orderer.poll().released.num_rows == 0 and orderer.watermark_us == mark


def test_an_idle_source_advances_with_the_injected_clock() -> None:
    clock = FakeClock()
    orderer = EventTimeOrderer(
        policy(5, min_support=1, idle_timeout=dt.timedelta(minutes=1)), clock=clock.now)
    orderer.push(envelope(BASE + np.arange(10) * MINUTE, np.arange(10)))
    assert orderer.watermark_us == BASE + 4 * MINUTE and orderer.buffered == 6
    clock.advance(59)
    assert orderer.poll().released.num_rows == 0  # not idle yet
    clock.advance(1 + 2 * 60)  # idle for two minutes past the timeout
    assert ids(orderer.poll().released) == ["e0000004", "e0000005"]  # older than 6 minutes
    clock.advance(10 * 60)
    assert ids(orderer.poll().released) == ["e0000006", "e0000007", "e0000008", "e0000009"]
    # an arrival ends idleness: the watermark is the bulk's again, late rows are late
    out = orderer.push(envelope(np.array([BASE + 8 * MINUTE]), np.array([10])))
    assert ids(out.late) == ["e0000010"]


def test_idle_timeout_needs_a_clock() -> None:
    with pytest.raises(ValueError, match="clock"):
        EventTimeOrderer(policy(1, idle_timeout=dt.timedelta(seconds=1)))


def test_null_times_are_late() -> None:
    table = envelope(BASE + np.arange(3) * MINUTE, np.arange(3))
    times = pa.array([BASE, None, BASE + 1], pa.int64()).cast(TS)
    table = table.set_column(0, "timestamp", times)
    out = EventTimeOrderer(policy(0)).push(table)
    assert ids(out.late) == ["e0000001"]


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="lateness"):
        WatermarkPolicy(lateness=dt.timedelta(minutes=-1))
    with pytest.raises(ValueError, match="outlier_share"):
        WatermarkPolicy(outlier_share=1.0)


def test_a_tiebreak_orders_equal_times_whatever_the_arrival() -> None:
    times = BASE + np.repeat(np.arange(50), 4) * MINUTE
    table = envelope(times, np.arange(200))
    rng = np.random.default_rng(4)
    shuffled = table.take(pa.array(delayed_arrival(times, rng, 3 * MINUTE)))
    for source in (table, shuffled):
        released, late = run(EventTimeOrderer(policy(3), tiebreak="event_id"), source,
                             list(range(0, 200, 13)))
        assert late.num_rows == 0 and ids(released) == ids(table)


def test_a_tiebreak_may_name_a_payload_field() -> None:
    times = np.full(4, BASE)
    table = envelope(times, np.arange(4)).append_column(
        "data", pa.StructArray.from_arrays([pa.array([3, 1, 2, 0])], ["TRANSACTION_ID"]))
    out = EventTimeOrderer(policy(0), tiebreak="data.TRANSACTION_ID").push(table)
    assert out.released.num_rows == 0
    orderer = EventTimeOrderer(policy(0), tiebreak="data.TRANSACTION_ID")
    orderer.push(table)
    assert ids(orderer.flush()) == ["e0000003", "e0000001", "e0000002", "e0000000"]


def test_an_empty_push_changes_nothing() -> None:
    orderer = EventTimeOrderer(policy(1, min_support=2))
    table = envelope(BASE + np.arange(5) * MINUTE, np.arange(5))
    first = orderer.push(table)
    out = orderer.push(table.slice(0, 0))
    assert out.released.num_rows == 0 and out.late.num_rows == 0
    assert ids(first.released) + ids(orderer.flush()) == ids(table)


def test_a_far_past_row_at_the_head_of_the_stream_is_late() -> None:
    rng = np.random.default_rng(4)
    times = in_order_stream(rng, 500)
    times[3] = 0  # 1970, among the very first events, before any watermark exists
    released, late = run(EventTimeOrderer(policy(20)), envelope(times, np.arange(500)), [250])
    assert ids(late) == ["e0000003"]
    assert ids(released) == [f"e{i:07d}" for i in range(500) if i != 3]


def test_a_sparse_in_order_head_is_not_late() -> None:
    times = BASE + np.array([0, 5, 30, 31, 32, 33, 34, 35]) * MINUTE
    released, late = run(EventTimeOrderer(policy(0)), envelope(times, np.arange(8)), [])
    assert late.num_rows == 0 and released.num_rows == 8
