"""The ``redis`` source against a real redis-server: consumer group, acknowledgement only
after a committed checkpoint, re-delivery after a crash, XAUTOCLAIM of a dead consumer's
entries, and the fraud flow of ``configs/live-redis.yaml`` storing every event once."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import redis

from cluster.job import run_in_process
from pipelines.errors import ConfigError
from pipelines.event_ids import derived_event_ids
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
from pipelines.kinds import build_source
from pipelines.live import LiveSource
from pipelines.live_redis import (
    RedisDecisions,
    RedisSourceError,
    RedisStreamOptions,
    RedisStreamSource,
    add_events,
    stream_offsets,
)
from pipelines.normalise import Normaliser
from pipelines.pipeline import load_pipeline
from pipelines.sources import SourceError
from pipelines.spec import PipelineSpec, SourceSpec
from tests.live_driver import BoundedLiveRun
from tests.live_servers import Server, free_port, start_redis
from tests.seed_events import seed_event
from tests.support import KillingPartitions

ROOT = Path(__file__).resolve().parents[2]


def seed_transactions(count: int, seed: int = 3) -> list[bytes]:
    """``count`` simulated card transactions in the seed's JSON schema, in time order."""
    table = simulate_transactions(SimulationSpec(n_customers=300, n_terminals=600, n_days=40,
                                                 seed=seed)).slice(0, count)
    assert table.num_rows == count
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    when = pl.col("TX_DATETIME").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    events = frame.with_columns(when.alias("TX_DATETIME")).select(pl.struct(
        eventId=pl.format("tx-{}", "TRANSACTION_ID"), eventType=pl.lit("transaction.created"),
        timestamp=pl.col("TX_DATETIME"), source=pl.lit("card-network"),
        correlationId=pl.format("tx-{}", "TRANSACTION_ID"), data=pl.struct(pl.all()),
        metadata=pl.struct(version=pl.lit("1.0"), region=pl.lit("eu-west")),
    ).struct.json_encode())
    return [line.encode() for line in events.to_series()]


def live_redis_spec(server: Server, stream: str, **source: object):
    return load_pipeline(ROOT / "configs" / "live-redis.yaml", {"source": {
        "url": server.url, "stream": stream, **source}})


def client_of(server: Server) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def stored_events(store: Path, event_type: str) -> pl.DataFrame:
    frame = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    return frame.filter(pl.col("event_type") == event_type).select("event_id").collect()


def test_stream_offsets_keep_id_order_and_fit_int64() -> None:
    ids = [b"0-1", b"1-0", b"1-1048575", b"2-0", b"8796093022207-1048575"]
    offsets = stream_offsets(ids)
    assert offsets.dtype == np.int64 and (np.diff(offsets) > 0).all()
    assert offsets[1] == 1 << 20 and offsets[-1] == np.iinfo(np.int64).max
    # past the range (an explicit id a producer chose): the next free offset, still increasing
    odd = stream_offsets([b"5-0", b"99999999999999999-0", b"6-0"], after=3)
    assert odd.tolist() == [5 << 20, (5 << 20) + 1, 6 << 20]
    assert stream_offsets([b"1-0"], after=(1 << 20)).tolist() == [(1 << 20) + 1]


def test_options_are_validated_and_the_kind_is_registered(redis_server: Server) -> None:
    spec = live_redis_spec(redis_server, "tx-kind")
    source = build_source(spec)
    assert isinstance(source, RedisStreamSource) and isinstance(source, LiveSource)
    assert source.options.batch_size == spec.source.batch_size == 1000
    assert source.list_parts() == ["tx-kind"]
    with pytest.raises(Exception, match="block_ms"):
        build_source(live_redis_spec(redis_server, "tx-kind", block_ms=-1))
    with pytest.raises(Exception, match="url"):
        build_source(live_redis_spec(redis_server, "tx-kind", url="http://x"))


def test_acknowledges_only_what_a_committed_checkpoint_covers(redis_server: Server) -> None:
    add_events(redis_server.url, "tx-ack", [seed_event(f"e{i}") for i in range(30)])
    source = RedisStreamSource("tx", RedisStreamOptions(url=redis_server.url, stream="tx-ack",
                                                        batch_size=10))
    source.open(None)
    client = client_of(redis_server)
    first = source.poll(100, 0.1)
    covered = source.positions()
    second = source.poll(100, 0.1)
    assert [b.num_rows for b in first + second] == [10, 10]
    assert second[0].offsets[0] > first[0].offsets[-1]
    assert client.xpending("tx-ack", "eventray")["pending"] == 20  # read, none acknowledged
    source.committed(covered)
    assert client.xpending("tx-ack", "eventray")["pending"] == 10  # only the covered read
    source.poll(100, 0.1)
    source.committed(source.positions())
    assert client.xpending("tx-ack", "eventray")["pending"] == 0
    assert source.poll(100, 0.05) == []
    source.close()


def test_reopened_source_reads_its_pending_entries_again_with_the_same_ids(
        redis_server: Server) -> None:
    # one event without an id: its id derives from (stream, entry id) on every delivery
    events = [seed_event(f"e{i}") for i in range(5)]
    del events[2]["eventId"]
    ids = add_events(redis_server.url, "tx-again", events)
    options = RedisStreamOptions(url=redis_server.url, stream="tx-again")
    source = RedisStreamSource("tx", options)
    source.open(None)
    before = source.poll(100, 0.1)
    source.close()  # a crash: nothing acknowledged
    again = RedisStreamSource("tx", options)
    again.open(source.positions())
    after = again.poll(100, 0.1)
    assert after[0].offsets.tolist() == before[0].offsets.tolist()
    assert after[0].records.equals(before[0].records)
    assert again.poll(100, 0.05) == []  # then new entries only: none
    spec = load_pipeline(ROOT / "configs" / "events.yaml",
                         {"source": {"format": "redis", "name": "tx", "stream": "tx-again"}})
    normalised = Normaliser(spec).normalise(after[0])
    expected = derived_event_ids("tx", "tx-again", stream_offsets([ids[2]]))[0].as_py()
    assert normalised.events.column("event_id")[2].as_py() == expected
    again.committed(again.positions())
    again.close()


def test_malformed_entries_are_dead_letters_not_errors(redis_server: Server) -> None:
    client = client_of(redis_server)
    client.xadd("tx-bad", {"event": json.dumps(seed_event("ok"))})
    client.xadd("tx-bad", {"event": b"{not json"})
    client.xadd("tx-bad", {"other": b"x"})
    client.xadd("tx-bad", {"event": json.dumps(seed_event("late", event_type="Bad Type"))})
    spec = load_pipeline(ROOT / "configs" / "events.yaml",
                         {"source": {"format": "redis", "name": "tx", "stream": "tx-bad",
                                     "url": redis_server.url}})
    source = build_source(spec)
    source.open(None)
    out = Normaliser(spec).normalise(source.poll(100, 0.1)[0])
    source.close()
    assert out.events.column("event_id").to_pylist() == ["ok"]
    assert out.deadletters.column("reason").to_pylist() == [
        "bad_json", "missing_event_type", "bad_event_type"]
    assert b'"other": "x"' in out.deadletters.column("raw")[1].as_py()


def test_a_dead_consumers_pending_entries_are_claimed(redis_server: Server) -> None:
    add_events(redis_server.url, "tx-claim", [seed_event(f"e{i}") for i in range(40)])
    dead = RedisStreamSource("tx", RedisStreamOptions(
        url=redis_server.url, stream="tx-claim", consumer="worker-a", batch_size=25))
    dead.open(None)
    read_by_dead = dead.poll(100, 0.1)[0]
    dead.close()  # it dies holding 25 pending entries
    client = client_of(redis_server)
    assert client.xpending("tx-claim", "eventray")["consumers"] == [
        {"name": b"worker-a", "pending": 25}]
    # a consumer that waits longer than the idle time takes nothing yet
    patient = RedisStreamSource("tx", RedisStreamOptions(
        url=redis_server.url, stream="tx-claim", consumer="worker-b", claim_idle=600_000))
    patient.open(None)
    assert sum(b.num_rows for b in patient.poll(100, 0.1)) == 15  # the 15 never delivered
    patient.close()  # it holds them, unacknowledged
    taker = RedisStreamSource("tx", RedisStreamOptions(
        url=redis_server.url, stream="tx-claim", consumer="worker-c", claim_idle=0))
    taker.open(None)
    batches = []
    while polled := taker.poll(100, 0.1):
        batches += polled
    offsets = np.concatenate([b.offsets for b in batches])
    assert (np.diff(offsets) > 0).all()  # one part, strictly increasing
    assert offsets[:25].tolist() == read_by_dead.offsets.tolist() and len(offsets) == 40
    taker.committed(taker.positions())
    assert client.xpending("tx-claim", "eventray")["pending"] == 0
    taker.close()


def test_a_running_reader_takes_over_a_consumer_that_dies_meanwhile(redis_server: Server) -> None:
    """A consumer that dies while another runs: the running one's sweep takes its pending
    entries over (not only a reader that opens later), and never its own pending ones."""
    client = client_of(redis_server)
    add_events(redis_server.url, "tx-sweep", [seed_event(f"e{i}") for i in range(30)])
    runner = RedisStreamSource("tx", RedisStreamOptions(
        url=redis_server.url, stream="tx-sweep", consumer="runner", batch_size=10,
        claim_idle=300, claim_every=100))
    runner.open(None)
    mine = runner.poll(100, 0.1)  # 10 entries, pending with the runner until its checkpoint
    dying = RedisStreamSource("tx", RedisStreamOptions(
        url=redis_server.url, stream="tx-sweep", consumer="dying", batch_size=15))
    dying.open(None)
    lost = dying.poll(100, 0.1)[0]  # 15 entries
    dying.close()  # dies holding them
    time.sleep(0.5)  # both consumers' entries are now idle past claim_idle
    batches = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(b.num_rows for b in batches) < 20:
        batches += runner.poll(100, 0.05)
    got = [json.loads(line)["eventId"] for b in batches for line in b.records.column("line").to_pylist()]
    dead_ones = [json.loads(line)["eventId"] for line in lost.records.column("line").to_pylist()]
    assert sorted(got) == sorted(dead_ones + [f"e{i}" for i in range(25, 30)])  # no e0-e9 again
    assert runner.poll(100, 0.05) == []
    offsets = np.concatenate([b.offsets for b in [*mine, *batches]])
    assert (np.diff(offsets) > 0).all()  # still one strictly increasing part
    runner.committed(runner.positions())
    assert client.xpending("tx-sweep", "eventray")["pending"] == 0
    runner.close()


def test_add_events_paces_the_load() -> None:
    sleeps: list[float] = []
    now = [0.0]

    class FakeRedis:
        def pipeline(self, transaction: bool):
            return self

        def xadd(self, stream: str, fields: dict) -> None:
            self.count = getattr(self, "count", 0) + 1

        def execute(self) -> list[bytes]:
            done, self.count = self.count, 0
            return [b"1-0"] * done

        def close(self) -> None:
            pass

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    from unittest import mock

    with mock.patch.object(redis.Redis, "from_url", return_value=FakeRedis()):
        ids = add_events("redis://x:1", "s", [b"{}"] * 1000, rate=500, sleep=sleep,
                         clock=lambda: now[0])
    assert len(ids) == 1000
    assert now[0] == pytest.approx(1000 / 500 - 5 / 500)  # the last round leaves at 1.99 s


@pytest.mark.slow
def test_fraud_flow_stores_20000_transactions_once_across_a_crash(
        redis_server: Server, tmp_path: Path) -> None:
    lines = seed_transactions(20_000)
    ids = add_events(redis_server.url, "transactions", lines)
    assert len(ids) == 20_000
    spec = live_redis_spec(redis_server, "transactions")
    store = tmp_path / "store"
    first = BoundedLiveRun(spec, store).drive(resume=False, max_batches=13, crash=True)
    assert first.checkpoints == 1  # batches 1-10 covered, 11-13 not; none acknowledged
    client = client_of(redis_server)
    assert client.xpending("transactions", "eventray")["pending"] == 13_000
    second = BoundedLiveRun(spec, store).drive(resume=True, idle_s=1.0)
    assert second.counts.duplicates == 10_000  # re-delivered, covered by the checkpoint
    stored = stored_events(store, "transaction.created")
    assert stored.height == 20_000 and stored["event_id"].n_unique() == 20_000
    # alert events too, when a model is in the registry the config names
    assert second.counts.stored == 20_000 + second.counts.derived
    assert client.xpending("transactions", "eventray")["pending"] == 0
    assert second.counts.dead_lettered == 0


def test_sources_table_has_one_column_of_json_lines(redis_server: Server) -> None:
    add_events(redis_server.url, "tx-lines", [seed_event("a")])
    source = RedisStreamSource("tx", RedisStreamOptions(url=redis_server.url, stream="tx-lines"))
    source.open(None)
    batch = source.poll(10, 0.1)[0]
    source.close()
    assert batch.records.schema == pa.schema([pa.field("line", pa.binary())])
    assert batch.part == "tx-lines" and batch.source == "tx"


def test_a_live_source_needs_no_path_and_a_file_source_still_does(redis_server: Server) -> None:
    spec = PipelineSpec.model_validate({
        "name": "live", "source": {"format": "redis", "stream": "s", "url": redis_server.url},
        "mapping": {"event_type": "eventType", "timestamp": "timestamp"}})
    assert spec.source.path == [] and isinstance(build_source(spec), RedisStreamSource)
    files = spec.model_copy(update={"source": SourceSpec(format="jsonl")})
    with pytest.raises(SourceError, match="at least one path"):
        build_source(files)


def test_the_source_pickles_as_its_configuration(redis_server: Server) -> None:
    add_events(redis_server.url, "tx-pickle", [seed_event("p")])
    source = RedisStreamSource("tx", RedisStreamOptions(url=redis_server.url, stream="tx-pickle"))
    source.open(None)
    copy = pickle.loads(pickle.dumps(source))  # an open source ships without its connection
    source.close()
    assert copy.options == source.options and copy.name == "tx"
    copy.open(None)
    assert copy.poll(10, 0.1)[0].num_rows == 1  # the first reader's entry, still pending
    copy.committed(copy.positions())
    copy.close()


class TwoKills(KillingPartitions):
    """Kills a partition actor twice, each time mid-stream (a restart costs seconds here)."""

    def fault(self, submitted: int, partition: int) -> None:
        if self.kills < 2:
            super().fault(submitted, partition)


@pytest.mark.ray
@pytest.mark.slow
def test_partition_actors_killed_mid_stream_store_every_transaction_once(
        ray_local: object, redis_server: Server, tmp_path: Path) -> None:
    """... and every transaction's decision reaches the stream of decisions, at least once
    (a batch applied again after a kill adds its decisions again)."""
    lines = seed_transactions(20_000, seed=5)
    add_events(redis_server.url, "transactions-ray", lines)
    spec = live_redis_spec(redis_server, "transactions-ray", decisions_stream="decisions-ray")
    store, executors = tmp_path / "store", []
    sink = build_source(spec).decision_sink()
    assert isinstance(sink, RedisDecisions)

    def killing(run: str) -> TwoKills:
        executors.append(TwoKills(spec.runtime.partitions, store, run,
                                  spec.runtime.max_in_flight, None, spec, kill_every=15,
                                  live=True, decisions_to=sink))
        return executors[-1]

    session = BoundedLiveRun(spec, store, killing).drive(resume=False, idle_s=1.0)
    assert executors[0].kills == 2 and executors[0].restarts >= 2
    stored = stored_events(store, "transaction.created")
    assert stored.height == 20_000 and stored["event_id"].n_unique() == 20_000
    assert session.counts.stored == 20_000 + session.counts.derived and session.counts.dead_lettered == 0
    client = client_of(redis_server)
    assert client.xpending("transactions-ray", "eventray")["pending"] == 0
    entries = client.xrange("decisions-ray")
    decided = {fields[b"event_id"].decode() for _, fields in entries}
    assert set(stored["event_id"].to_list()) <= decided
    answer = json.loads(entries[0][1][b"decision"])
    assert set(answer) == {"event_id", "scores", "alerts"}
    assert [s["step"] for s in answer["scores"]] == ["fraud"] and "model" in answer["scores"][0]


def test_the_decisions_sink_connects_before_the_first_decision(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A partition connects its sink as it starts; a server not there yet is no failure,
    and the first decisions reach it once it is."""
    port = free_port()
    sink = RedisDecisions(f"redis://127.0.0.1:{port}", "decisions-later")
    sink.connect()  # nothing listens yet: a warning, not an error
    assert "not reachable yet" in caplog.text
    server = start_redis(tmp_path / "redis", port=port)
    try:
        client = client_of(server)
        before = len(client.client_list())
        sink = pickle.loads(pickle.dumps(sink))  # as it reaches a partition's process
        sink.connect()
        assert len(client.client_list()) == before + 1  # the connection is open already
        decisions = pa.table({"event_id": ["e1"], "step": ["fraud"], "model": ["m@1"],
                              "score": [0.9], "alert": ["fraud.suspected"], "threshold": [0.5]})
        sink.send(decisions)
        entries = client.xrange("decisions-later")
        assert [fields[b"event_id"] for _, fields in entries] == [b"e1"]
        assert len(client.client_list()) == before + 1  # the same connection
    finally:
        server.stop()


def test_a_lost_server_ends_the_read_with_one_clear_error(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        source = RedisStreamSource("tx", RedisStreamOptions(url=server.url, stream="gone"))
        source.open(None)
    finally:
        server.stop()
    with pytest.raises(RedisSourceError, match="lost redis://127.0.0.1"):
        source.poll(10, 0.1)
    source.close()
    source.committed(source.positions())  # closed: nothing to acknowledge, no error


def test_run_refuses_a_live_source_in_one_line(redis_server: Server, tmp_path: Path) -> None:
    spec = live_redis_spec(redis_server, "tx-run")
    with pytest.raises(ConfigError, match="live source: `eventray serve` runs it"):
        run_in_process(spec, tmp_path / "store")


def test_a_group_deleted_under_the_reader_is_one_clear_error(redis_server: Server) -> None:
    source = RedisStreamSource("tx", RedisStreamOptions(url=redis_server.url, stream="tx-drop"))
    source.open(None)
    client_of(redis_server).xgroup_destroy("tx-drop", "eventray")
    with pytest.raises(RedisSourceError, match="NOGROUP"):
        source.poll(10, 0.1)
    source.close()


def test_pending_entries_trimmed_from_the_stream_are_acknowledged_without_an_event(
        redis_server: Server) -> None:
    ids = add_events(redis_server.url, "tx-trim", [seed_event(f"e{i}") for i in range(3)])
    options = RedisStreamOptions(url=redis_server.url, stream="tx-trim")
    first = RedisStreamSource("tx", options)
    first.open(None)
    assert first.poll(10, 0.1)[0].num_rows == 3
    first.close()  # all three pending
    client = client_of(redis_server)
    client.xdel("tx-trim", ids[1])  # trimmed away (XDEL, MAXLEN) while pending
    again = RedisStreamSource("tx", options)
    again.open(None)
    batch = again.poll(10, 0.1)[0]
    assert batch.num_rows == 2 and batch.offsets.tolist() == stream_offsets([ids[0], ids[2]]).tolist()
    again.committed(again.positions())
    assert client.xpending("tx-trim", "eventray")["pending"] == 0
    again.close()


def test_produce_adds_simulated_events_to_a_stream_at_the_rate_asked(redis_server: Server) -> None:
    """`eventray produce --to redis://HOST:PORT/STREAM`: one entry per event, in the seed's
    schema under the field `event`, at about the rate asked (open loop)."""
    from tests.support import eventray, summary_of

    summary = summary_of(eventray("produce", "--to", f"{redis_server.url}/tx-load", "--rate", "400",
                                  "--duration", "1.5", "--seed", "4"))
    client = redis.Redis.from_url(redis_server.url)
    entries = client.xrange("tx-load")
    client.close()
    assert summary["sent"] == 600 == len(entries)
    assert summary["elapsed_s"] >= 1.4  # paced, not sent as fast as the server takes them
    events = [json.loads(fields[b"event"]) for _, fields in entries]
    assert {e["eventType"] for e in events} == {"transaction.created"}
    assert len({e["eventId"] for e in events}) == 600
    assert entries[0][0].decode() == summary["first_id"]


def test_a_redis_server_starts_in_a_relative_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`eventray bench --live` starts its redis-server under its relative --work folder:
    the server enters --dir before it opens --logfile, so both must be absolute."""
    monkeypatch.chdir(tmp_path)
    server = start_redis(Path("bench-work") / "redis")
    try:
        assert redis.Redis.from_url(server.url).ping()
        assert (tmp_path / "bench-work" / "redis" / "redis.log").is_file()
    finally:
        server.stop()
