"""HTTP ingestion: an aiohttp server inside a Ray actor, in front of the ingest journal.

Measured on 2 cores (see the project's Ray notes): Ray Serve's proxy saturates near
180 requests/s, an aiohttp server in one actor answers 1,000 requests/s with a p99 of
81 ms, so the endpoint is aiohttp in an async actor (:func:`ingress_actor_class`).

- ``GET /healthz``: 200 once the run is ready (its partitions started), 503 before.
- ``POST /events``: a JSON array or NDJSON of events. ``Authorization: Bearer <token>``
  (compared in constant time) or 401; a body over ``max_body_bytes`` gets 413; more than
  ``max_pending_events`` accepted and not yet read by the run gets 429 with
  ``Retry-After``. The events are appended to the journal and fsynced, concurrent requests
  together (a group commit), before the answer: 2xx means durable. Malformed events are
  journaled too (the run dead-letters them through its normal path) and listed in the
  answer with their reasons, found by the same :class:`~pipelines.normalise.Normaliser`,
  run once per group commit (in its thread, off the event loop).
- ``POST /score``: one event (an object) or a few (an array of objects). Journaled the
  same way, then answered when their keyed partition has applied them: the partition hands
  its batch's decisions straight to this actor (:meth:`Ingress.decided`), the driver only
  what never reaches a partition (dead letters, duplicates, the late lane:
  :meth:`Ingress.resolve`). The answer: scores with model versions, alerts, ``latency_ms``.

A chained run on the ingress's node sends its answers and its read positions over a Unix
socket of the ingress's own (:meth:`Ingress.open_replies`, :class:`IngressChannel`) instead
of a Ray call each.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pyarrow as pa
from aiohttp import web

from cluster.ray_runtime import settle_heap
from pipelines.decisions import answers
from pipelines.event_ids import derived_event_ids
from pipelines.journal import EVENTS_PART, SCORE_PART, HttpSourceOptions, JournalWriter
from pipelines.normalise import Normaliser
from pipelines.sources import RawBatch
from pipelines.spec import PipelineSpec

#: Seconds a client is asked to wait when the run is at its in-flight bound.
RETRY_AFTER_S = 1
#: Concurrent requests the ingress makes to itself before it reports ready (:meth:`Ingress.warm`).
WARM_CONNECTIONS = 32
#: How long a partition waits for the ingress to answer when it connects (:meth:`IngressReplies.connect`).
CONNECT_TIMEOUT_S = 10.0
#: How long a send on the replies socket may block (the ingress not reading) before the
#: channel gives it up for Ray calls.
SOCKET_TIMEOUT_S = 2.0
_LENGTH = struct.Struct(">I")


class BodyError(ValueError):
    """A request body that is not a JSON array, an object or NDJSON as the endpoint needs."""


def split_body(body: bytes, objects_only: bool = False) -> list[bytes]:
    """One JSON text per event: the items of a JSON array, an object, or NDJSON lines
    (kept as given: a line that is not JSON is the run's to dead-letter, with its reason).

    Example:
        >>> split_body(b'[{"a": 1}, {"b": 2}]')
        [b'{"a":1}', b'{"b":2}']
        >>> split_body(b'{"a": 1}\\n\\nnot json\\n')
        [b'{"a": 1}', b'not json']
    """
    text = body.strip()
    if text.startswith(b"["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise BodyError(f"body is not a JSON array: {exc}") from None
        if objects_only and not all(isinstance(item, dict) for item in items):
            raise BodyError("every event must be a JSON object")
        return [json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
                for item in items]
    lines = [line.strip() for line in text.split(b"\n")]
    lines = [line for line in lines if line]
    if objects_only:
        try:
            if not all(isinstance(json.loads(line), dict) for line in lines):
                raise BodyError("every event must be a JSON object")
        except ValueError as exc:
            raise BodyError(f"body is not JSON: {exc}") from None
    return lines


@dataclass
class _Append:
    """Lines waiting for the next group commit of their part."""

    lines: list[bytes]
    done: asyncio.Future[list[dict[str, Any]]]  # its malformed events, once durable
    written: bool = False  # in the file already (``score``): the commit only fsyncs


@dataclass
class _PartJournal:
    """One journal part: its writer, the offsets handed out, the appends queued."""

    part: str
    writer: JournalWriter
    assigned: int
    queue: list[_Append] = field(default_factory=list)
    committing: bool = False

    def queue_unwritten(self) -> bool:
        """Whether an append waits to be written by the commit (lines written now would
        come before it in the file, after it in offsets)."""
        return any(not item.written for item in self.queue)


class Ingress:
    """The endpoint's logic on the actor's event loop (Ray-free: tests run it directly).

    Args:
        spec: the pipeline (the normaliser and the event-id field come from it).
        journal: the journal's folder.
        options: the ``http`` source's options.
        token: the bearer token clients must present.
    """

    def __init__(self, spec: PipelineSpec, journal: str | Path, options: HttpSourceOptions,
                 token: str) -> None:
        self.spec, self.options, self.token = spec, options, token.encode()
        self.normaliser = Normaliser(spec)
        self.source_name = spec.source.source_name
        self.id_field = spec.mapping.event_id if isinstance(spec.mapping.event_id, str) else None
        self.parts = {part: self._journal(journal, part) for part in (EVENTS_PART, SCORE_PART)}
        self.consumed = {part: journal.assigned for part, journal in self.parts.items()}
        self.waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = defaultdict(list)
        self.ready = False
        self.accepting = True
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._replies: asyncio.AbstractServer | None = None
        self._reply_streams: set[asyncio.StreamWriter] = set()
        self.replies_path: str | None = None
        self.warmed = 0  # requests of the start-up warm-up (see :meth:`warm`)

    def _journal(self, folder: str | Path, part: str) -> _PartJournal:
        writer = JournalWriter(folder, part, self.options.segment_bytes)
        return _PartJournal(part, writer, writer.next_offset)

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        # the body limit is ours to answer (413 with a reason); aiohttp's own is set above it
        app = web.Application(client_max_size=self.options.max_body_bytes + 1)
        app.add_routes([web.get("/healthz", self.healthz), web.post("/events", self.events),
                        web.post("/score", self.score)])
        return app

    async def start(self) -> int:
        """Listen on the configured host and port; returns the port (for port 0)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.options.host, self.options.port,
                                 reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await self.warm(port)
        return port

    async def warm(self, port: int, connections: int = WARM_CONNECTIONS) -> None:
        """Take ``connections`` concurrent requests to ``/healthz`` on fresh connections
        before anyone else can: served in Ray, the first burst of concurrent connections
        cost the first ``/score`` answers 100-120 ms at the server (measured when a client
        went from one connection to 300 requests/s), and a burst beforehand removes it."""
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host
        url = f"http://{host}:{port}/healthz"
        async def ping() -> None:
            async with session.get(url) as answer:
                await answer.read()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                await asyncio.gather(*(ping() for _ in range(connections)))
        except (aiohttp.ClientError, OSError):
            return  # an optimisation only: serving does not depend on it
        self.warmed += connections

    async def stop_accepting(self) -> dict[str, int]:
        """Refuse new requests (503), wait until every accepted append is durable; returns
        each part's journal end, which the run reads up to before its last checkpoint."""
        self.accepting = False
        while any(p.queue or p.committing for p in self.parts.values()):
            await asyncio.sleep(0.001)
        return {part: journal.assigned for part, journal in self.parts.items()}

    async def open_replies(self) -> str:
        """Listen for a chained run's answers and read positions on a Unix socket, in a
        folder of its own (mode 0700: no other user can connect); returns its path. Each
        message is a 4-byte big-endian length and a JSON object, ``{"resolve": [answer,
        ...]}`` or ``{"progress": {part: offset}}``."""
        path = os.path.join(tempfile.mkdtemp(prefix="eventray-"), "replies.sock")
        self._replies = await asyncio.start_unix_server(self._read_replies, path=path)
        self.replies_path = path
        return path

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reply_streams.add(writer)
        try:
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                message = json.loads(await reader.readexactly(size))
                if "resolve" in message:
                    self.resolve(message["resolve"])
                if "progress" in message:
                    self.progress(message["progress"])
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the run went (a message cut short is sent again as a Ray call)
        finally:
            self._reply_streams.discard(writer)
            writer.close()

    async def close(self) -> None:
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(asyncio.CancelledError())
        if self._replies is not None:
            self._replies.close()
            for stream in list(self._reply_streams):
                stream.close()
            assert self.replies_path is not None
            shutil.rmtree(os.path.dirname(self.replies_path), ignore_errors=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for journal in self.parts.values():
            journal.writer.close()

    # -- from the driver ------------------------------------------------------------------

    def decided(self, decisions: pa.Table) -> None:
        """A partition's batch of decisions: answer the awaited events among them."""
        if self.waiters and decisions.num_rows:
            self.resolve(answers(decisions, pa.array(list(self.waiters), pa.string())))

    def resolve(self, results: list[dict[str, Any]]) -> None:
        """The answers of ``/score`` events (each a dict with ``event_id``)."""
        for result in results:
            for waiter in self.waiters.pop(result["event_id"], []):
                if not waiter.done():
                    waiter.set_result(result)

    def progress(self, consumed: dict[str, int]) -> None:
        """How far the run has read each part (the in-flight bound counts from there)."""
        self.consumed.update(consumed)

    def pending(self) -> int:
        return sum(j.assigned - self.consumed.get(p, 0) for p, j in self.parts.items())

    # -- handlers -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "pending": self.pending()})

    def _refusal(self, request: web.Request) -> web.Response | None:
        """401, 503, 413 or 429 before the body is read, or ``None``."""
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or \
                not hmac.compare_digest(given[len("Bearer "):].strip().encode(), self.token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        if not self.accepting or not self.ready:
            return web.json_response({"error": "not accepting events now"}, status=503,
                                     headers={"Retry-After": str(RETRY_AFTER_S)})
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        if self.pending() >= self.options.max_pending_events:
            return _busy()
        return None

    async def _body(self, request: web.Request, objects_only: bool) -> list[bytes] | web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large(self.options.max_body_bytes)
        if len(body) > self.options.max_body_bytes:
            return _too_large(self.options.max_body_bytes)
        try:
            lines = split_body(body, objects_only)
        except BodyError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not lines:
            return web.json_response({"error": "no events in the body"}, status=400)
        if self.pending() + len(lines) > self.options.max_pending_events:
            return _busy()
        return lines

    async def events(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        lines = await self._body(request, objects_only=False)
        if isinstance(lines, web.Response):
            return lines
        malformed = await self.append(EVENTS_PART, lines)
        return web.json_response({"accepted": len(lines) - len(malformed),
                                  "dead_lettered": malformed}, status=202)

    async def score(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        refused = self._refusal(request)
        if refused is not None:
            return refused
        lines = await self._body(request, objects_only=True)
        if isinstance(lines, web.Response):
            return lines
        first, done = self.enqueue(SCORE_PART, lines)
        ids = self.event_ids(lines, first)
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in ids]
        for event_id, waiter in zip(ids, waiters, strict=True):
            self.waiters[event_id].append(waiter)
        await done
        try:
            results = await asyncio.wait_for(asyncio.gather(*waiters),
                                             timeout=self.options.score_timeout_s)
        except TimeoutError:
            return web.json_response({"error": "no decision in time (the events are durable "
                                      "and will be processed)", "event_ids": ids}, status=504)
        latency = round((time.perf_counter() - started) * 1000, 3)
        one_object = len(results) == 1 and (await request.read()).lstrip().startswith(b"{")
        if not one_object:  # an array (or NDJSON) is answered with an array
            return web.json_response({"results": results, "latency_ms": latency})
        return web.json_response({**results[0], "latency_ms": latency})

    # -- the journal ----------------------------------------------------------------------

    def malformed(self, lines: list[bytes]) -> list[dict[str, Any]]:
        """The events of a body the run will dead-letter, with their reasons (index in the
        body, event id where given, reason code, message)."""
        raw = RawBatch(self.source_name, EVENTS_PART, np.arange(len(lines)),
                       pa.record_batch([pa.array(lines, pa.binary())], names=["line"]))
        dead = self.normaliser.normalise(raw).deadletters
        return [{"index": row["offset"], "event_id": row["event_id"], "reason": row["reason"],
                 "message": row["message"]}
                for row in dead.select(["offset", "event_id", "reason", "message"]).to_pylist()]

    def _durable(self, journal: _PartJournal, group: list[_Append]) -> list[list[dict[str, Any]]]:
        """Append a group and fsync; for bulk events, validate them in the same pass (one
        normaliser call per group, not per request: its cost is mostly fixed per call)."""
        lines = [line for item in group for line in item.lines if not item.written]
        journal.writer.write(lines)
        journal.writer.sync()
        if journal.part != EVENTS_PART:
            return [[] for _ in group]
        return _by_request(self.malformed(lines), group)

    def event_ids(self, lines: list[bytes], first: int) -> list[str]:
        """Each event's id: the producer's, or the one the run derives from its offset."""
        given = [json.loads(line).get(self.id_field) if self.id_field else None for line in lines]
        missing = [n for n, i in enumerate(given) if not (isinstance(i, str) and i)]
        # derived only where the producer gave none (a hash each: not for free)
        derived = dict(zip(missing, derived_event_ids(
            self.source_name, SCORE_PART, first + np.array(missing, dtype=np.int64)).to_pylist(),
            strict=True)) if missing else {}
        return [derived[n] if n in derived else given[n] for n in range(len(lines))]

    def enqueue(self, part: str, lines: list[bytes]) -> tuple[int, asyncio.Future[list[dict[str, Any]]]]:
        """Queue ``lines`` for the part's next group commit; returns their first offset and
        a future done once they are durable. Offsets are handed out here, in queue order,
        which is the order the commit writes them in.

        ``score`` lines are written to the journal here, and the run reads them at once:
        their fsync (the group commit) runs while the run decides, and a ``/score`` answer
        waits for both. An answered event is durable, as an accepted one is; one the run
        read but the disk lost in a crash was never answered (and a checkpoint fsyncs what
        it covers first: :meth:`~pipelines.journal.JournalSource.positions`)."""
        journal = self.parts[part]
        first = journal.assigned
        done: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        written = part == SCORE_PART and not journal.queue_unwritten()
        if written:
            try:
                journal.writer.write(lines)
            except OSError:
                self.accepting = False  # the file may hold part of them: offsets unknown
                raise
        journal.assigned += len(lines)
        journal.queue.append(_Append(lines, done, written))
        if not journal.committing:
            journal.committing = True
            asyncio.get_running_loop().create_task(self._commit(journal))
        return first, done

    async def append(self, part: str, lines: list[bytes]) -> list[dict[str, Any]]:
        """Append ``lines`` durably; returns the malformed ones (``events`` part), their
        ``index`` in ``lines``."""
        _, done = self.enqueue(part, lines)
        return await done

    async def _commit(self, journal: _PartJournal) -> None:
        """Write and fsync whatever is queued, in one go, until nothing is: requests that
        arrive during an fsync share the next one (``/score`` ones wait
        ``score_sync_wait_ms`` for company first)."""
        wait = self.options.score_sync_wait_ms / 1000 if journal.part == SCORE_PART else 0.0
        try:
            while journal.queue:
                if wait:  # /score: more requests share the fsync (the decision takes longer)
                    await asyncio.sleep(wait)
                group, journal.queue = journal.queue, []
                try:
                    found = await asyncio.to_thread(self._durable, journal, group)
                except OSError as exc:
                    self.accepting = False  # offsets handed out no longer match the file
                    for item in group:
                        item.done.set_exception(exc)
                    continue
                for item, malformed in zip(group, found, strict=True):
                    item.done.set_result(malformed)
        finally:
            journal.committing = False


def _by_request(dead: list[dict[str, Any]], group: list[_Append]) -> list[list[dict[str, Any]]]:
    """A group's malformed events, split by request, indexed within each request's body."""
    found: list[list[dict[str, Any]]] = []
    start = 0
    for item in group:
        end = start + len(item.lines)
        found.append([{**d, "index": d["index"] - start} for d in dead if start <= d["index"] < end])
        start = end
    return found


def _busy() -> web.Response:
    return web.json_response({"error": "the pipeline is at its in-flight bound"},
                             status=429, headers={"Retry-After": str(RETRY_AFTER_S)})


def _too_large(limit: int) -> web.Response:
    return web.json_response({"error": f"body over {limit} bytes"}, status=413)


class IngressReplies:
    """The ingress actor as a partition's :class:`~pipelines.decisions.DecisionSink`: each
    batch's decisions go to it unawaited, and it answers the waiting ``/score`` clients (a
    replayed batch's again: an event is answered once). An ingress gone answers nobody.

    Args:
        actor_name: the ingress actor's name.
        namespace: its namespace.
    """

    def __init__(self, actor_name: str, namespace: str = "eventray") -> None:
        self.actor_name, self.namespace = actor_name, namespace
        self._actor: Any = None  # looked up once, in the partition's process

    def __getstate__(self) -> dict[str, str]:
        return {"actor_name": self.actor_name, "namespace": self.namespace}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def connect(self) -> None:
        """Look the ingress up and open the channel to it (one call answered): lazily, the
        first ``/score`` answers waited some 30 ms for both."""
        import ray
        from ray.exceptions import RayError

        if self._lookup() is not None:
            try:
                ray.get(self._actor.__ray_ready__.remote(), timeout=CONNECT_TIMEOUT_S)
            except RayError:  # not answering yet: the calls to come wait for it
                pass

    def _lookup(self) -> Any:
        import ray

        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.actor_name, namespace=self.namespace)
            except ValueError:
                return None
        return self._actor

    def send(self, decisions: pa.Table) -> None:
        actor = self._lookup() if decisions.num_rows else None
        if actor is not None:
            actor.decided.remote(decisions)


class IngressChannel:
    """A chained run's calls to the ingress actor: :meth:`resolve` (the answers of awaited
    ``/score`` events) and :meth:`progress` (how far the run has read the journal).

    On the ingress's node they go over its replies socket (see :meth:`Ingress.open_replies`):
    a send of a few hundred bytes, where a Ray call cost the run's process 0.42 ms of CPU
    (0.18 ms in the calling thread), some 7 % of a poll of three events, at about a hundred
    calls a second. Elsewhere, or once the socket fails (a send cut short or blocked for
    :data:`SOCKET_TIMEOUT_S`), they are Ray calls, as a message that cannot be put in JSON.

    Args:
        actor: the ingress actor's handle.
        path: its replies socket (``None``: not on this node, Ray calls only).
    """

    def __init__(self, actor: Any, path: str | None) -> None:
        self.actor = actor
        self.socket: socket.socket | None = None
        if path is not None:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            channel.settimeout(SOCKET_TIMEOUT_S)
            try:
                channel.connect(path)
                self.socket = channel
            except OSError:
                channel.close()

    def resolve(self, results: list[dict[str, Any]]) -> None:
        if not self._send("resolve", results):
            self.actor.resolve.remote(results)

    def progress(self, consumed: dict[str, int]) -> None:
        if not self._send("progress", consumed):
            self.actor.progress.remote(consumed)

    def _send(self, kind: str, value: Any) -> bool:
        if self.socket is None:
            return False
        try:
            data = json.dumps({kind: value}).encode()
        except (TypeError, ValueError):
            return False
        try:
            self.socket.sendall(_LENGTH.pack(len(data)) + data)
            return True
        except OSError:  # the ingress gone or not reading: Ray calls from now on
            self.socket.close()
            self.socket = None
            return False


def ingress_actor_class() -> Any:
    """The Ray actor around :class:`Ingress` (async: its methods share the server's loop)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
    class IngressActor:
        def __init__(self, spec: PipelineSpec, journal: str, options: HttpSourceOptions,
                     token: str) -> None:
            self.ingress = Ingress(spec, journal, options, token)

        async def start(self) -> int:
            port = await self.ingress.start()
            try:
                await self.ingress.open_replies()
            except OSError:  # no socket here (a read-only temp folder): the run's Ray calls
                pass
            settle_heap()
            return port

        async def replies_address(self) -> tuple[str, str | None]:
            """This actor's node and its replies socket (see :class:`IngressChannel`)."""
            return ray.get_runtime_context().get_node_id(), self.ingress.replies_path

        async def set_ready(self) -> None:
            self.ingress.ready = True

        async def resolve(self, results: list[dict[str, Any]]) -> None:
            self.ingress.resolve(results)

        async def decided(self, decisions: pa.Table) -> None:
            self.ingress.decided(decisions)

        async def progress(self, consumed: dict[str, int]) -> None:
            self.ingress.progress(consumed)

        async def stop_accepting(self) -> dict[str, int]:
            return await self.ingress.stop_accepting()

        async def close(self) -> None:
            await self.ingress.close()

    return IngressActor
