"""The ingest journal (a live source read exactly once), the arrival-order late lane, the
group commit of store writes and the decisions a receipt carries: no Ray."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cluster.ingest import Ingest
from cluster.produce import simulated_events
from pipelines.arrival import ArrivalGuard, KeyOf
from pipelines.group_commit import GroupCommitSink
from pipelines.journal import JournalSource, JournalWriter
from pipelines.keyed import PartitionWorker, decisions_of
from pipelines.live import LiveSource
from pipelines.pipeline import load_pipeline
from pipelines.processing import StepOutput
from pipelines.sources import RawBatch
from pipelines.store import EventStore
from pipelines.testing import FakeClock, ListSink
from tests.support import ROOT


def lines(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"n": i}).encode() for i in range(start, start + n)]


def read_all(source: JournalSource) -> list[tuple[str, list[int]]]:
    """Every batch the source has now (one segment per poll at most)."""
    found = []
    while batches := source.poll(1000, 0.0):
        found += [(b.part, b.offsets.tolist()) for b in batches]
    return found


def test_journal_is_a_live_source_read_exactly_once_across_segments(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, "events", segment_bytes=64)
    for start in range(0, 30, 5):
        writer.append(lines(5, start))
    source = JournalSource("http", tmp_path, parts=("events",))
    assert isinstance(source, LiveSource)
    source.open(None)
    assert [o for _, offsets in read_all(source) for o in offsets] == list(range(30))
    positions = source.positions()
    assert positions == {"events": 30}
    segments = sorted((tmp_path / "events").glob("seg-*"))
    assert len(segments) > 2
    source.committed(positions)
    assert len(sorted((tmp_path / "events").glob("seg-*"))) == 1  # the one being written
    # a restart resumes after the committed position: nothing is read twice
    writer.append(lines(3, 30))
    again = JournalSource("http", tmp_path, parts=("events",))
    again.open({"events": 30})
    assert read_all(again) == [("events", [30, 31, 32])]
    for opened in (source, again, writer):
        opened.close()


def test_a_reader_waits_at_an_empty_segment_and_follows_the_writer_into_the_next(tmp_path: Path) -> None:
    """The reader stands at the start of a segment with nothing in it yet (a fresh journal,
    or just after a roll), then the writer fills it and rolls on: the reader waits without
    taking the segment for finished, and follows into the next with nothing lost."""
    writer = JournalWriter(tmp_path, "score", segment_bytes=40)
    source = JournalSource("http", tmp_path, parts=("score",))
    source.open(None)
    assert source.poll(1000, 0.0) == []  # an empty first segment is not a finished one
    got: list[int] = []
    for start in range(0, 12, 3):
        writer.append(lines(3, start))  # each append fills a segment: the next one rolls
        got += [o for _, offsets in read_all(source) for o in offsets]
        assert source.poll(1000, 0.0) == []
    assert got == list(range(12)) and len(list((tmp_path / "score").glob("seg-*"))) >= 2
    writer.close()
    source.close()


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "looking-again"])
def test_a_waiting_reader_wakes_when_the_writer_appends_or_rolls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool) -> None:
    """A poll that waits (an idle run) returns what a writer appends meanwhile, into the
    segment being read or a new one, long before its timeout: woken by the kernel, or,
    without inotify, by looking again."""
    import threading
    import time

    from pipelines import journal

    if not inotify:
        monkeypatch.setattr(journal._Changes, "watch", classmethod(lambda cls, folders: None))
    writer = JournalWriter(tmp_path, "score", segment_bytes=40)
    source = JournalSource("http", tmp_path, parts=("score",))
    source.open(None)
    assert (source._changes is not None) == inotify
    got: list[int] = []
    for start in range(0, 12, 3):  # each append fills a segment: the next one rolls
        late = threading.Timer(0.2, writer.append, [lines(3, start)])
        late.start()
        began = time.monotonic()
        batches = source.poll(1000, 30.0)  # returns early only with something read
        assert time.monotonic() - began < 15  # woken by the write, not the timeout
        got += [o for b in batches for o in b.offsets.tolist()]
        late.join()
        got += [o for _, offsets in read_all(source) for o in offsets]
    assert got == list(range(12))
    writer.close()
    source.close()
    assert source._changes is None


def test_journal_resumes_mid_segment_and_waits_for_whole_lines(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, "score")
    writer.append(lines(10))
    source = JournalSource("http", tmp_path, parts=("score",))
    source.open({"score": 4})
    batch = source.poll(3, 0.0)[0]
    assert batch.offsets.tolist() == [4, 5, 6]
    assert json.loads(batch.records.column("line")[0].as_py()) == {"n": 4}
    with open(tmp_path / "score" / "seg-000000000000000.ndjson", "ab") as torn:
        torn.write(b'{"n": 10')  # a crash mid-append: never acknowledged
    assert [b.offsets.tolist() for b in source.poll(100, 0.0)] == [[7, 8, 9]]
    assert source.poll(100, 0.01) == []
    reopened = JournalWriter(tmp_path, "score")  # a restarted ingress cuts the torn line
    assert reopened.next_offset == 10
    reopened.append([b'{"n": 10}'])
    assert [b.offsets.tolist() for b in source.poll(100, 0.0)] == [[10]]
    for opened in (source, writer, reopened):
        opened.close()


def test_arrival_guard_keeps_every_dimension_in_time_order() -> None:
    guard = ArrivalGuard({"key": KeyOf("key"), "terminal": KeyOf("terminal")}, horizon=100)
    t = pa.table({"key": ["a", "b", "a"], "terminal": ["x", "x", None],
                  "ts": pa.array([10, 5, 12], pa.int64())})
    # b is in order for its customer but goes back in time for terminal x
    assert guard.late(t, "ts").tolist() == [False, True, False]
    state = guard.snapshot()
    restored = ArrivalGuard({"key": KeyOf("key"), "terminal": KeyOf("terminal")}, horizon=100)
    restored.restore(state)
    later = pa.table({"key": ["a", "c"], "terminal": ["y", "x"], "ts": pa.array([11, 10, ], pa.int64())})
    assert restored.late(later, "ts").tolist() == [True, False]
    # a key silent for longer than the horizon is forgotten: memory stays bounded
    restored.late(pa.table({"key": ["z"], "terminal": ["w"], "ts": pa.array([500], pa.int64())}),
                  "ts")
    assert restored.latest["key"]["k"].to_list() == ["z"]


def test_live_ingest_sends_events_older_than_their_key_to_the_late_lane(tmp_path: Path) -> None:
    spec = load_pipeline(ROOT / "configs" / "live.yaml")
    store = EventStore(tmp_path)
    ingest = Ingest(spec, store, "r1", FakeClock(), live=True)
    events = simulated_events(40, seed=1)
    late = {**events[-1], "eventId": "late", "timestamp": "2018-03-01T00:00:00Z"}
    rows = [json.dumps(e).encode() for e in [*events, late]]
    raw = RawBatch("card-network", "events", np.arange(len(rows)),
                   pa.record_batch([pa.array(rows, pa.binary())], names=["line"]))
    from cluster.accounting import RunCounts

    counts = RunCounts()
    going = ingest.read(raw, counts)
    assert going.num_rows == 40 and "late" not in going.column("event_id").to_pylist()
    assert ingest.last_late.column("event_id").to_pylist() == ["late"]
    assert counts.stored == 1
    # group-committed, as a partition's writes are: not on this batch's turn, but by the
    # next checkpoint (whose first step is this flush)
    assert not list(tmp_path.rglob("*.parquet"))
    ingest.flush()
    stored = store.scan("events").collect()
    assert stored["event_id"].to_list() == ["late"]
    assert '"late":true' in stored["metadata"].struct.field("tags")[0]


def test_live_ingest_commits_its_writes_in_the_background_once_due(tmp_path: Path) -> None:
    """A live run's dead letters and late events are committed every store.commit_interval
    in a thread; a bounded run's are written as they come."""
    from cluster.accounting import RunCounts

    spec = load_pipeline(ROOT / "configs" / "live.yaml")
    every_batch = spec.store.model_copy(update={"commit_interval": dt.timedelta(0)})
    spec = spec.model_copy(update={"store": every_batch})
    bad = [json.dumps({"eventId": f"bad-{i}", "eventType": "transaction.created", "timestamp": "nope",
                       "data": {}}).encode() for i in range(3)]
    raw = RawBatch("card-network", "events", np.arange(3), pa.record_batch([pa.array(bad, pa.binary())],
                                                                             names=["line"]))
    live = Ingest(spec, EventStore(tmp_path / "live"), "r1", FakeClock(), live=True)
    live.read(raw, RunCounts())
    assert isinstance(live.sink, GroupCommitSink)
    live.sink.wait()  # the commit that fell due runs in a thread
    assert EventStore(tmp_path / "live").scan("deadletter").collect().height == 3
    bounded = Ingest(spec, EventStore(tmp_path / "bounded"), "r1", FakeClock())
    bounded.read(raw, RunCounts())
    assert EventStore(tmp_path / "bounded").scan("deadletter").collect().height == 3


def test_live_ingest_remembers_one_horizon_of_arrivals_not_every_id_ever_seen(tmp_path: Path) -> None:
    """In arrival order there is no watermark: the duplicate filter keeps ids by arrival time
    and forgets those older than the horizon (7 days), so a long-running serve keeps about a
    horizon of ids. A retry is caught whatever its event time, even months behind the
    stream's latest (a client's retry comes soon after the first try)."""
    from cluster.accounting import RunCounts

    spec = load_pipeline(ROOT / "configs" / "live.yaml")
    clock = FakeClock(dt.datetime(2018, 9, 1, tzinfo=dt.UTC))
    ingest = Ingest(spec, EventStore(tmp_path), "r1", clock, live=True)
    counts = RunCounts()
    start = dt.datetime(2018, 4, 1, tzinfo=dt.UTC)
    events = [{**e, "timestamp": (start + dt.timedelta(hours=i)).isoformat()}  # 125 days
              for i, e in enumerate(simulated_events(3000, seed=2))]

    def post(batch: list[dict], first: int) -> None:
        rows = [json.dumps(e).encode() for e in batch]
        ingest.read(RawBatch("card-network", "events", np.arange(first, first + len(rows)),
                             pa.record_batch([pa.array(rows, pa.binary())], names=["line"])), counts)

    for day, at in enumerate(range(0, len(events), 100)):  # 100 events a day, for 30 days
        post(events[at:at + 100], at)
        if day == 3:  # a retry of the first day's events, 12 days of event time behind: caught
            post(events[:100], len(events))
        clock.advance(86_400)
    assert counts.duplicates == 100
    assert 0 < len(ingest.duplicates) <= 9 * 100  # about a horizon of days, not 30 days
    post(events[-200:-100], 2 * len(events))  # the events of two days ago, again: caught
    assert counts.duplicates == 200


def test_group_commit_writes_one_file_per_group_and_flushes_when_due(tmp_path: Path) -> None:
    now = [0.0]
    store = EventStore(tmp_path)
    grouped = GroupCommitSink(store, max_rows=1000, interval_s=1.0, clock=lambda: now[0])
    rows = pa.table({"event_type": ["t.a"] * 2, "timestamp": pa.array(
        [0, 1], pa.timestamp("us", "UTC")), "key": ["k", "k"]})
    for seq in range(5):
        grouped.write("events", rows, writer="r1-p0000", seq=seq)
    assert not grouped.due() and store.files("events") == []
    now[0] = 1.5
    assert grouped.due()
    grouped.flush_in_background()
    grouped.wait()
    assert [p.name for p in store.files("events")] == ["part-r1-p0000-000000000000.parquet"]
    assert store.scan("events").collect().height == 10
    grouped.write("events", rows, writer="r1-p0000", seq=5)
    grouped.flush()
    assert len(store.files("events")) == 2
    # a partition restored at seq 5 removes its files from 5 on, no one else's
    assert len(store.truncate_writers("r1", {"p0000": 5, "other": 0})) == 1


def test_a_commit_still_running_is_not_waited_for(tmp_path: Path) -> None:
    """A background commit that takes longer than the interval (a slow disk): the next is
    not due until it ends, so the partition that asks is never blocked on it, and nothing
    held is lost."""
    now, release = [0.0], threading.Event()
    store = EventStore(tmp_path)

    class SlowDisk:
        def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> object:
            release.wait(30)
            return store.write(table, rows, writer=writer, seq=seq)

    grouped = GroupCommitSink(SlowDisk(), max_rows=3, interval_s=1.0, clock=lambda: now[0])
    rows = pa.table({"event_type": ["t.a"], "timestamp": pa.array([0], pa.timestamp("us", "UTC")),
                     "key": ["k"]})
    grouped.write("events", rows, writer="r1-p0000", seq=0)
    now[0] = 1.5
    grouped.flush_in_background()  # stuck on the disk
    for seq in range(1, 5):  # past max_rows and the interval: held, not due
        grouped.write("events", rows, writer="r1-p0000", seq=seq)
    now[0] = 3.0
    assert not grouped.due()
    release.set()
    grouped.wait()
    assert grouped.due()
    grouped.flush()
    assert store.scan("events").collect().height == 5


def test_a_timed_group_commit_commits_after_a_pause_in_the_traffic(tmp_path: Path) -> None:
    """With ``on_time`` the last writes before a pause are committed about ``interval_s``
    after the first of them, with no batch coming to ask (a live run's commit lag); without
    it they wait for the next write or checkpoint."""
    store = EventStore(tmp_path)
    rows = pa.table({"event_type": ["t.a"], "timestamp": pa.array([0], pa.timestamp("us", "UTC")),
                     "key": ["k"]})
    timed = GroupCommitSink(store, max_rows=1000, interval_s=0.2, on_time=True)
    untimed = GroupCommitSink(store, max_rows=1000, interval_s=0.2)
    for seq in range(3):
        timed.write("events", rows, writer="r1-p0000", seq=seq)
        untimed.write("events", rows, writer="r1-p0001", seq=seq)
    deadline = time.monotonic() + 10
    while not store.files("events") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert [p.name for p in store.files("events")] == ["part-r1-p0000-000000000000.parquet"]
    assert timed.rows == 0 and untimed.rows == 3
    timed.write("events", rows, writer="r1-p0000", seq=3)  # the next group arms its own timer
    timed.flush()  # a checkpoint before it fires: the timer then finds nothing to do
    time.sleep(0.3)
    timed.wait()
    assert store.scan("events").collect().height == 4 and len(store.files("events")) == 2


def test_timed_commits_racing_the_caller_lose_and_double_nothing(tmp_path: Path) -> None:
    """Writes, due checks, background commits and flushes from the caller while a timer
    with a short interval commits from its thread: every row is committed once, each group
    under its first write's number."""
    store = EventStore(tmp_path)
    grouped = GroupCommitSink(store, max_rows=50, interval_s=0.003, on_time=True)
    for seq in range(400):
        rows = pa.table({"event_type": ["t.a"], "key": [str(seq)],
                         "timestamp": pa.array([seq], pa.timestamp("us", "UTC"))})
        grouped.write("events", rows, writer="r1-p0000", seq=seq)
        if grouped.due():
            grouped.flush_in_background()
        if seq % 97 == 0:
            grouped.flush()
        time.sleep(0.0005 * (seq % 3))
    grouped.flush()
    time.sleep(0.05)
    grouped.wait()
    keys = store.scan("events").collect()["key"].to_list()
    assert sorted(map(int, keys)) == list(range(400))
    firsts = sorted(int(p.stem.rsplit("-", 1)[1]) for p in store.files("events"))
    assert firsts[0] == 0 and len(firsts) == len(set(firsts)) > 1


def test_receipts_carry_each_applied_event_s_decisions() -> None:
    kept = pa.table({"event_id": ["a", "b"]})
    scores = pa.table({"event_id": ["a", "b"], "model": ["fraud@3", "fraud@3"], "score": [0.9, 0.1]})
    alerts = pa.table({"event_id": ["a"], "event_type": ["fraud.suspected"], "threshold": [0.5]})
    decided = decisions_of(kept, [("fraud", StepOutput(tables={"scores": scores, "alerts": alerts}))])
    assert decided.to_pylist() == [
        {"event_id": "a", "step": "fraud", "model": "fraud@3", "score": 0.9,
         "alert": "fraud.suspected", "threshold": 0.5},
        {"event_id": "b", "step": "fraud", "model": "fraud@3", "score": 0.1, "alert": None,
         "threshold": None}]
    worker = PartitionWorker(0, ListSink(), clock=FakeClock())
    assert worker.apply(0, kept).decisions is None  # off unless asked for
    worker.decisions = True
    assert worker.apply(1, kept).decisions.column("event_id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("body", [b"[1, 2", b"\n"])
def test_bodies_that_hold_no_events_are_refused(body: bytes) -> None:
    from cluster.ingress import BodyError, split_body

    try:
        assert split_body(body) == []
    except BodyError:
        pass


def test_a_key_of_a_payload_field_is_read_for_its_event_types_only() -> None:
    """The terminal dimension of the fraud flow: ``data.TERMINAL_ID`` as text, for the
    stage's event types; other types, and a missing payload, have no key there."""
    data = pa.array([{"TERMINAL_ID": 7}, {"TERMINAL_ID": 7}, None, {"TERMINAL_ID": None}],
                    pa.struct([("TERMINAL_ID", pa.int64())]))
    events = pa.table({"event_type": ["tx.created", "label", "tx.created", "tx.created"],
                       "data": data})
    keys = KeyOf("data", "TERMINAL_ID", "^(?:tx\\.created)$").of(events)
    assert keys.type == pa.large_string() and keys.to_pylist() == ["7", None, None, None]
    assert KeyOf("event_type").of(events).to_pylist() == events.column("event_type").to_pylist()


def test_a_group_of_pieces_whose_types_differ_is_committed_as_one_table() -> None:
    """Pieces of one group normally share a schema (and are joined as they are); one whose
    column is all null, typed null, is promoted to the others' type, not refused."""
    sink = ListSink()
    grouped = GroupCommitSink(sink, max_rows=100, interval_s=60)
    grouped.write("scores", pa.table({"score": pa.array([0.5]), "model": ["m:1"]}), writer="p0", seq=0)
    grouped.write("scores", pa.table({"score": pa.array([None]), "model": ["m:1"]}), writer="p0", seq=1)
    grouped.write("scores", pa.table({"score": pa.array([0.25]), "model": ["m:2"]}), writer="p0", seq=2)
    assert grouped.flush() == 1
    committed = sink.batches["scores"][("p0", 0)]
    assert committed.schema.field("score").type == pa.float64()
    assert committed.column("score").to_pylist() == [0.5, None, 0.25]
