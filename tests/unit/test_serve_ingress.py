"""The HTTP endpoint's logic on a real aiohttp server (no Ray): auth, size, backpressure,
durable group commit, and /score answered from what the driver resolves."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster.ingress import Ingress, IngressChannel
from cluster.produce import simulated_events
from pipelines.journal import SCORE_PART, HttpSourceOptions, JournalSource
from pipelines.pipeline import load_pipeline
from tests.support import ROOT

TOKEN = "s3cret"


def ingress(tmp_path: Path, **options: Any) -> Ingress:
    spec = load_pipeline(ROOT / "configs" / "live.yaml")
    server = Ingress(spec, tmp_path / "_journal", HttpSourceOptions(port=0, **options), TOKEN)
    server.ready = True
    return server


async def post(port: int, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, Any, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, \
            session.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


def test_events_are_durable_before_2xx_and_refusals_say_why(tmp_path: Path) -> None:
    events = simulated_events(30)

    async def scenario() -> None:
        server = ingress(tmp_path, max_body_bytes=20_000, max_pending_events=35)
        port = await server.start()
        try:
            assert (await post(port, "/events", b"[]", token=None))[0] == 401
            assert (await post(port, "/events", b"[]", token="s3cre7"))[0] == 401
            assert (await post(port, "/events", b" " * 20_001))[0] == 413
            bodies = [json.dumps(events[i:i + 10]).encode() for i in range(0, 30, 10)]
            answers = await asyncio.gather(*(post(port, "/events", b) for b in bodies))
            assert [a[0] for a in answers] == [202, 202, 202]
            # durable: on disk, readable by the run, before the answer came
            journal = JournalSource("card-network", tmp_path / "_journal", parts=("events",))
            journal.open(None)
            assert sum(b.num_rows for b in journal.poll(100, 0.0)) == 30
            journal.close()
            status, _, headers = await post(port, "/events", bodies[0])
            assert status == 429 and headers["Retry-After"] == "1"  # 30 + 10 > 35 pending at most
            server.progress({"events": 30})  # the run has read them
            assert (await post(port, "/events", bodies[0]))[0] == 202
            status, answer, _ = await post(port, "/events", b'{"eventId": "x"}\nnot json\n')
            assert status == 202 and answer["accepted"] == 0
            assert [d["reason"] for d in answer["dead_lettered"]] == ["missing_event_type", "bad_json"]
        finally:
            await server.close()

    asyncio.run(scenario())


def test_score_answers_with_what_the_driver_resolves(tmp_path: Path) -> None:
    event = simulated_events(1)[0]

    async def scenario() -> None:
        server = ingress(tmp_path, score_timeout_s=5)
        port = await server.start()
        try:
            asked = asyncio.create_task(post(port, "/score", json.dumps(event).encode()))
            while event["eventId"] not in server.waiters:
                await asyncio.sleep(0.001)
            server.resolve([{"event_id": event["eventId"], "scores": [
                {"step": "fraud", "model": "fraud@1", "score": 0.7}], "alerts": []}])
            status, answer, _ = await asked
            assert status == 200
            assert answer["scores"][0]["model"] == "fraud@1" and answer["latency_ms"] > 0
            assert (await post(port, "/score", b"[1]"))[0] == 400  # only objects are decided
            server.options = server.options.model_copy(update={"score_timeout_s": 0.05})
            status, answer, _ = await post(port, "/score", json.dumps([event]).encode())
            assert status == 504 and answer["event_ids"] == [event["eventId"]]
        finally:
            await server.close()

    asyncio.run(scenario())


def test_a_score_event_is_read_before_its_fsync_and_answered_after_it(tmp_path: Path) -> None:
    """The decision does not wait for the disk, the answer does: the run reads a ``/score``
    event as soon as it is written, and the answer waits for its group commit's fsync."""
    event = simulated_events(1)[0]
    synced = threading.Event()

    async def scenario() -> None:
        server = ingress(tmp_path, score_timeout_s=5)
        writer = server.parts[SCORE_PART].writer
        plain_sync = writer.sync

        def slow_sync() -> None:
            synced.wait(10)  # the disk is slow: held until the test lets it go
            plain_sync()

        writer.sync = slow_sync  # type: ignore[method-assign]
        port = await server.start()
        try:
            asked = asyncio.create_task(post(port, "/score", json.dumps(event).encode()))
            while event["eventId"] not in server.waiters:
                await asyncio.sleep(0.001)
            journal = JournalSource("card-network", tmp_path / "_journal", parts=(SCORE_PART,))
            journal.open(None)
            read = journal.poll(10, 0.0)  # the run has it, while its fsync is still running
            assert [json.loads(line)["eventId"] for b in read
                    for line in b.records.column("line").to_pylist()] == [event["eventId"]]
            journal.close()
            server.resolve([{"event_id": event["eventId"], "scores": [], "alerts": []}])
            await asyncio.sleep(0.2)
            assert not asked.done()  # decided, not yet durable: no answer
            synced.set()
            status, answer, _ = await asked
            assert status == 200 and answer["event_id"] == event["eventId"]
        finally:
            synced.set()
            await server.close()

    asyncio.run(scenario())


def test_score_requests_within_the_sync_wait_share_one_fsync(tmp_path: Path) -> None:
    """``/score`` requests that arrive within ``score_sync_wait_ms`` of each other are made
    durable by one fsync, and none is answered before it; with no wait, each may have its own."""
    events = simulated_events(8)

    async def scenario(wait_ms: float) -> list[int]:
        server = ingress(tmp_path / f"w{wait_ms:g}", score_timeout_s=5, score_sync_wait_ms=wait_ms)
        writer = server.parts[SCORE_PART].writer
        plain_sync = writer.sync
        counted: list[int] = []

        def counting_sync() -> None:
            counted.append(writer.next_offset)  # how many lines the fsync covers
            plain_sync()

        writer.sync = counting_sync  # type: ignore[method-assign]
        port = await server.start()
        try:
            asked = [asyncio.create_task(post(port, "/score", json.dumps(e).encode()))
                     for e in events]
            while len(server.waiters) < len(events):
                await asyncio.sleep(0.001)
            server.resolve([{"event_id": e["eventId"], "scores": [], "alerts": []}
                            for e in events])
            answers = await asyncio.gather(*asked)
            assert [status for status, _, _ in answers] == [200] * len(events)
            assert counted and counted[-1] == len(events)  # every answered line was fsynced
            return counted
        finally:
            await server.close()

    syncs = asyncio.run(scenario(1000.0))  # all eight arrive within the wait: one fsync
    assert syncs == [len(events)]
    assert len(asyncio.run(scenario(0.0))) >= 1


def test_score_waits_on_the_producer_s_id_or_the_one_the_run_derives(tmp_path: Path) -> None:
    """The id /score waits on is the event's own, or, where it has none, the one the run
    derives from its journal offset (as the normaliser does): the same id either way."""
    from pipelines.event_ids import derived_event_ids

    server = ingress(tmp_path)
    lines = [b'{"eventId": "given-1"}', b'{"data": {}}', b'{"eventId": ""}', b'{"eventId": "given-2"}']
    expected = derived_event_ids(server.source_name, SCORE_PART, [7, 8, 9, 10]).to_pylist()
    assert server.event_ids(lines, first=7) == ["given-1", expected[1], expected[2], "given-2"]
    assert server.event_ids(lines[:1], first=3) == ["given-1"]


def test_the_ingress_warms_its_connections_before_anyone_is_answered(tmp_path: Path) -> None:
    """start() has taken a burst of concurrent connections to its own /healthz, before it
    reports ready; nothing of it reaches the journal."""
    from cluster.ingress import WARM_CONNECTIONS

    async def scenario() -> None:
        server = ingress(tmp_path)
        server.ready = False
        port = await server.start()
        try:
            assert server.warmed == WARM_CONNECTIONS and server.pending() == 0
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/healthz") as answer:
                assert answer.status == 503  # not ready: the warm-up did not change that
        finally:
            await server.close()
    asyncio.run(scenario())


def test_the_load_generator_sends_open_loop_and_counts_the_answers(tmp_path: Path) -> None:
    import gc

    from cluster.produce import open_loop

    async def scenario() -> dict[str, Any]:
        server = ingress(tmp_path)
        port = await server.start()
        try:
            bodies = [json.dumps(e).encode() for e in simulated_events(20, seed=4)]
            return await open_loop(f"http://127.0.0.1:{port}/events", bodies, 200.0, TOKEN)
        finally:
            await server.close()
    figures = asyncio.run(scenario())
    assert figures["ok"] == figures["requests"] == 20 and figures["statuses"] == {"202": 20}
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert gc.isenabled()  # collection is back on once the run is over


def test_the_load_generator_runs_on_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``eventray produce`` and the bench send from libuv's event loop (less of the cores the
    measured run shares); the server here runs on its own loop in a thread."""
    import uvloop

    from cluster import produce

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ingress(tmp_path)
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    loops: list[type] = []
    send = produce._send

    async def noting_the_loop(*args: Any) -> None:
        loops.append(type(asyncio.get_running_loop()))
        await send(*args)

    monkeypatch.setattr(produce, "_send", noting_the_loop)
    try:
        bodies = [json.dumps(e).encode() for e in simulated_events(5, seed=4)]
        figures = produce.run_open_loop(f"http://127.0.0.1:{port}/events", bodies, 200.0, TOKEN)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert figures["statuses"] == {"202": 5}
    assert set(loops) == {uvloop.Loop}


def test_the_load_generator_does_not_collect_while_it_sends() -> None:
    import gc

    from cluster.produce import without_collection_pauses

    assert gc.isenabled()
    with without_collection_pauses():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with without_collection_pauses():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_settling_the_heap_takes_what_is_alive_out_of_full_collections() -> None:
    """What a long-lived process holds once set up is frozen (``gc.freeze``): a full
    collection no longer scans it, and garbage made before is collected first."""
    import gc
    import weakref

    from cluster.ray_runtime import settle_heap

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    kept, dropped = [Cycle() for _ in range(1000)], Cycle()
    garbage = weakref.ref(dropped)
    del dropped
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert garbage() is None  # a cycle nothing held: collected, not frozen
        assert not any(o is kept[0] for o in gc.get_objects())  # frozen: out of the scans
    finally:
        gc.unfreeze()


class RecordingActor:
    """A stand-in for the ingress actor's Ray handle (Ray is not run in unit tests): records
    the calls a channel falls back to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.resolve = self._method("resolve")
        self.progress = self._method("progress")

    def _method(self, name: str) -> Any:
        actor = self

        class Method:
            @staticmethod
            def remote(value: Any) -> None:
                actor.calls.append((name, value))
        return Method


def test_a_chained_run_answers_score_over_the_ingress_s_socket(tmp_path: Path) -> None:
    """The chained run's answers and read positions reach the ingress over its replies
    socket, not as Ray calls; a message that is not JSON, and every message once the ingress
    has gone, fall back to the actor's calls. The socket's folder is the ingress's alone."""
    event = simulated_events(1)[0]
    actor = RecordingActor()

    async def scenario() -> None:
        server = ingress(tmp_path, score_timeout_s=5)
        port = await server.start()
        path = await server.open_replies()
        assert oct(Path(path).parent.stat().st_mode & 0o777) == "0o700"
        channel = await asyncio.to_thread(IngressChannel, actor, path)
        try:
            asked = asyncio.create_task(post(port, "/score", json.dumps(event).encode()))
            while event["eventId"] not in server.waiters:
                await asyncio.sleep(0.001)
            answer = {"event_id": event["eventId"], "scores": [
                {"step": "fraud", "model": "fraud@1", "score": float("nan")}], "alerts": []}
            await asyncio.to_thread(channel.resolve, [answer])
            await asyncio.to_thread(channel.progress, {"score": 1})
            status, body, _ = await asked
            assert status == 200 and body["event_id"] == event["eventId"]
            assert body["scores"][0]["model"] == "fraud@1"
            while server.consumed.get("score") != 1:
                await asyncio.sleep(0.001)
            await asyncio.to_thread(channel.progress, {"score": {2}})  # not JSON: a Ray call
            assert actor.calls == [("progress", {"score": {2}})]
        finally:
            await server.close()
        assert not Path(path).parent.exists()
        for _ in range(3):  # the socket is gone: Ray calls (the first send may still go out)
            await asyncio.to_thread(channel.progress, {"score": 3})
        assert actor.calls[-1] == ("progress", {"score": 3}) and channel.socket is None

    asyncio.run(scenario())
