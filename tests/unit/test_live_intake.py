"""How a live run takes its input under load: it reads the source only when the stages and
the partitions have room, so what arrives meanwhile is read later as one larger batch, and a
partition's queued pieces go to it as one batch. A batch's cost is mostly fixed, so batches
grow with the load instead of queueing (in process, with in-process partitions)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from cluster.accounting import RunCounts
from cluster.dispatch import Dispatcher
from cluster.driver import routed_schema
from cluster.live_run import LiveRun
from cluster.partitions import LocalPartitions
from cluster.produce import simulated_events
from pipelines.journal import SCORE_PART, JournalWriter
from pipelines.kinds import build_source
from pipelines.pipeline import load_pipeline
from pipelines.spec import PipelineSpec
from tests.support import ROOT
from tests.unit.test_routing_lanes import events, spec


class NarrowPartitions(LocalPartitions):
    """In-process partitions that take a batch only while ``room`` says so; each batch
    submitted is recorded (sequence number, event ids)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.room = 0
        self.batches: list[tuple[int, list[str]]] = []

    def capacity(self, partition: int) -> int:
        return self.room

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self.batches.append((seq, rows.column("event_id").to_pylist()))
        super().submit(partition, seq, rows)


class HeldStage(LocalPartitions):
    """An enrichment stage's in-process partitions whose batches stay in flight until
    :meth:`release` (as a busy actor's would)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[tuple[int, int, pa.Table]] = []

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        self.held.append((partition, seq, rows))

    def release(self) -> None:
        for partition, seq, rows in self.held:
            super().submit(partition, seq, rows)
        self.held.clear()

    def in_flight(self) -> int:
        return len(self.held)


def queued(pieces: int) -> list[pa.Table]:
    """``pieces`` routed batches of two events each (keys a and b), ids ``p<i>-<j>``."""
    out = []
    for i in range(pieces):
        batch = events([("tx.created", "a", float(i)), ("tx.created", "b", -float(i))])
        out.append(batch.set_column(0, "event_id", pa.array([f"p{i}-0", f"p{i}-1"])))
    return out


@pytest.mark.parametrize(("coalesce", "expected"), [
    (None, [(0, ["p0-0", "p0-1"]), (1, ["p1-0", "p1-1"]), (2, ["p2-0", "p2-1"])]),
    (1_000, [(0, ["p0-0", "p0-1", "p1-0", "p1-1", "p2-0", "p2-1"])]),
    (4, [(0, ["p0-0", "p0-1", "p1-0", "p1-1"]), (1, ["p2-0", "p2-1"])]),
])
def test_a_partitions_queued_pieces_go_as_one_batch_when_coalescing(
        tmp_path: Path, coalesce: int | None, expected: list[tuple[int, list[str]]]) -> None:
    pipeline = spec({"routes": [{"name": "all"}]})
    pipeline = pipeline.model_copy(update={"runtime": pipeline.runtime.model_copy(
        update={"partitions": 1})})
    executor = NarrowPartitions(1, tmp_path, "run", pipeline)
    dispatcher = Dispatcher(pipeline, executor, [0], RunCounts(), routed_schema(pipeline), coalesce)
    for batch in queued(3):
        dispatcher.route(batch)
    dispatcher.dispatch()
    assert executor.batches == [] and dispatcher.queued()  # no room: all three wait
    executor.room = 1
    dispatcher.dispatch()
    assert executor.batches == expected  # in order (each key's order kept), one seq each
    assert not dispatcher.queued() and dispatcher.counts.sent == 6


def live_spec() -> PipelineSpec:
    return load_pipeline(ROOT / "configs" / "live.yaml")


def lines(first: int, count: int) -> list[bytes]:
    return [json.dumps(e).encode() for e in simulated_events(first + count, seed=3)[first:]]


def test_a_live_run_reads_its_source_only_when_the_stages_have_room(tmp_path: Path) -> None:
    pipeline = live_spec()
    assert pipeline.enrich and pipeline.runtime.max_in_flight == 1
    store, journal = tmp_path / "store", tmp_path / "store" / "_journal"
    stages: list[HeldStage] = []

    def stage(run: str, enrich: Any) -> HeldStage:
        stages.append(HeldStage(enrich.partitions, store, run, pipeline, enrich, live=True))
        return stages[-1]

    source = build_source(pipeline, [str(journal)])
    run = LiveRun(pipeline, lambda r: LocalPartitions(1, store, r, pipeline, live=True),
                  store, source, stages=stage)
    run._start(resume=False)
    source.open(None)
    writer = JournalWriter(journal, SCORE_PART)
    try:
        writer.append(lines(0, 5))
        assert run.poll_once(0.0) == 5 and len(run.chain) == 1  # in the stage, held
        writer.append(lines(5, 7))
        writer.append(lines(12, 4))
        assert run.poll_once(0.0) is None and run.poll_once(0.0) is None  # no room: unread
        assert run.counts.read == 5 and not run.has_room()
        stages[0].release()
        run.pump()
        assert run.has_room() and run.counts.sent == 5  # on to the partitions
        assert run.poll_once(0.0) == 11 and run.counts.batches == 2  # both appends, one batch
        stages[0].release()
        run.pump()
        assert run.poll_once(0.0) == 0  # read, and nothing came
        run.pump()
        assert run.counts.sent == run.counts.stored == 16
    finally:
        writer.close()
        source.close()
        run.close()


class Recorded(LocalPartitions):
    """In-process partitions that answer a checkpoint in two steps, as actors do, and log
    each step in ``log``."""

    def __init__(self, name: str, log: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name, self.log = name, log

    def ask_checkpoint(self, epoch: int) -> Any:
        self.log.append(f"{self.name} asked")
        seqs = self.checkpoint(epoch)

        def collect() -> dict[int, int]:
            self.log.append(f"{self.name} answered")
            return seqs
        return collect


def test_a_checkpoint_asks_the_stages_and_the_partitions_at_once(tmp_path: Path) -> None:
    """The stall of a checkpoint is its slowest writer's, not the sum of all: the stages'
    and the partitions' actors are asked before either is waited for, and the driver writes
    its own state while they work."""
    pipeline = live_spec()
    store, journal = tmp_path / "store", tmp_path / "store" / "_journal"
    log: list[str] = []
    source = build_source(pipeline, [str(journal)])
    run = LiveRun(pipeline, lambda r: Recorded("partitions", log, 1, store, r, pipeline, live=True),
                  store, source, stages=lambda r, s: Recorded("stage", log, s.partitions, store,
                                                              r, pipeline, s, live=True))
    run._start(resume=False)
    source.open(None)
    writer = JournalWriter(journal, SCORE_PART)
    snapshot = run.ingest.snapshot
    run.ingest.snapshot = lambda: (log.append("driver state"), snapshot())[1]  # type: ignore[method-assign]
    try:
        writer.append(lines(0, 20))
        assert run.poll_once(0.0) == 20
        run.commit()
        assert log == ["stage asked", "partitions asked", "driver state", "partitions answered",
                       "stage answered"]
        latest = run.checkpointer.checkpoints.latest()
        assert latest is not None and latest.partition_seqs == {0: 1}
        assert latest.stage_seqs == {"terminal": {0: 1}} and latest.source_offsets["score"] == 20
    finally:
        writer.close()
        source.close()
        run.close()


def test_every_score_event_is_answered_once_whatever_became_of_it(tmp_path: Path) -> None:
    """The driver's side of /score (ScoreReplies, here with decisions from receipts):
    decided, dead-lettered, duplicate or late, every event read from the score part gets one
    answer under the id the ingress waits on (its own, or the one derived from its offset)."""
    from pipelines.event_ids import derived_event_ids

    valid = simulated_events(4, seed=8)
    no_id = {k: v for k, v in valid[2].items() if k != "eventId"}
    older = {**valid[3], "eventId": "older-than-its-key", "timestamp": "2018-03-01T00:00:00Z"}
    bad = {**valid[0], "eventId": "bad-time", "timestamp": "not a time"}
    bad_no_id = {k: v for k, v in bad.items() if k != "eventId"}
    with _scored_run(tmp_path) as (run, writer, sent):
        for batch in ((valid[0], valid[1], no_id, valid[3]), (bad, bad_no_id, valid[0], older)):
            assert _score(run, writer, batch) == 4
        derived = derived_event_ids(run.source.name, SCORE_PART, [2, 5]).to_pylist()
        by_id: dict[str, list[dict[str, Any]]] = {}
        for answer in sent:
            by_id.setdefault(answer["event_id"], []).append(answer)
        assert sorted(by_id) == sorted([valid[0]["eventId"], valid[1]["eventId"], derived[0],
                                        valid[3]["eventId"], "bad-time", derived[1], "older-than-its-key"])
        again = by_id[valid[0]["eventId"]].pop()  # a retry in a later batch: a duplicate
        assert again == {"event_id": valid[0]["eventId"], "duplicate": True}
        assert all(len(answers) == 1 for answers in by_id.values()), by_id
        for decided in (valid[0]["eventId"], valid[1]["eventId"], derived[0], valid[3]["eventId"]):
            assert by_id[decided][0]["scores"], by_id[decided]  # the fraud step's score
        assert by_id["bad-time"][0]["dead_letter"]["reason"] == "bad_timestamp"
        assert by_id[derived[1]][0]["dead_letter"]["reason"] == "bad_timestamp"
        assert by_id["older-than-its-key"][0]["late"] is True
        assert run.replies is not None and not run.replies.waiting


def test_an_id_twice_in_one_score_batch_waits_for_its_decision(tmp_path: Path) -> None:
    """A ``/score`` batch holding one event twice: the second copy is a duplicate skipped,
    but the id is answered by the first copy's decision, not told it is a duplicate (the
    ingress answers every waiter of an id with the first answer it gets). An id stored by an
    earlier batch, sent again, is answered as a duplicate."""
    valid = simulated_events(3, seed=9)
    with _scored_run(tmp_path) as (run, writer, sent):
        for batch in ((valid[0],), (valid[1], valid[1], valid[0])):
            _score(run, writer, batch)
        twice = [a for a in sent if a["event_id"] == valid[1]["eventId"]]
        assert len(twice) == 1 and twice[0]["scores"], twice  # its decision, once
        again = [a for a in sent if a["event_id"] == valid[0]["eventId"]]
        assert again[-1] == {"event_id": valid[0]["eventId"], "duplicate": True}
        assert run.counts.duplicates == 2


@contextlib.contextmanager
def _scored_run(tmp_path: Path) -> Iterator[tuple[LiveRun, JournalWriter, list[dict[str, Any]]]]:
    """``configs/live.yaml`` run in process with the driver's side of ``/score`` (decisions
    from receipts); yields the run, a writer of the journal's score part, and the answers."""
    from cluster.live_run import LiveProgress, ScoreReplies

    pipeline = live_spec()
    store, journal = tmp_path / "store", tmp_path / "store" / "_journal"
    source = build_source(pipeline, [str(journal)])
    run = LiveRun(pipeline, lambda r: LocalPartitions(1, store, r, pipeline, live=True),
                  store, source, stages=lambda r, s: LocalPartitions(s.partitions, store, r, pipeline, s,
                                                                     live=True))
    sent: list[dict[str, Any]] = []
    run.replies = ScoreReplies(sent.extend)
    run._start(resume=False)
    run.dispatcher.on_receipt = run._receipt_hook(LiveProgress(False))
    source.open(None)
    writer = JournalWriter(journal, SCORE_PART)
    try:
        yield run, writer, sent
    finally:
        writer.close()
        source.close()
        run.close()


def _score(run: LiveRun, writer: JournalWriter, events: tuple[dict[str, Any], ...]) -> int | None:
    """Journal ``events`` to the score part, read them and apply them; the rows read."""
    writer.append([json.dumps(e).encode() for e in events])
    rows = run.poll_once(0.0)
    while run.chain or run.dispatcher.queued():
        run.pump()
    return rows
