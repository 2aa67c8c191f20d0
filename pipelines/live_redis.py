"""The ``redis`` source kind: events from a Redis stream, read by a consumer group.

Each stream entry carries one event's JSON (the seed's schema) in its field ``event``; a
batch of entries becomes a :class:`~pipelines.sources.RawBatch` of JSON lines, which the
normaliser reads exactly as it reads a JSON Lines file (a malformed event is a dead letter
with its reason). The source follows the live-source contract (:mod:`pipelines.live`):

- ``open`` creates the group if needed (``XGROUP CREATE ... MKSTREAM``), takes over the
  pending entries of consumers idle for ``claim_idle`` (``XAUTOCLAIM``: a dead consumer's),
  then reads this consumer's pending entries again (``XREADGROUP`` from id 0) before new
  ones (``>``). The taken-over entries join this consumer's pending list first, so one
  history read returns them all in id order.
- ``poll`` reads up to ``batch_size`` entries per call (``BLOCK block_ms`` when none wait).
  Every ``claim_every`` ms a running reader also sweeps the group for entries pending for
  ``claim_idle`` ms with another consumer (``XAUTOCLAIM``, a batch per poll until the
  sweep is done): a consumer that dies while this one runs loses nothing either. Its own
  pending entries (read, waiting for the checkpoint that acknowledges them) are never
  handed on again: ``XAUTOCLAIM`` claims one idle past ``claim_idle`` for this consumer
  anew (its idle time reset, its delivery count up by one), and the sweep drops it.
- ``committed(positions)`` acknowledges (``XACK``) the entries the committed checkpoint
  covers, never before: after a crash, what was read but not covered is read again.
- With ``decisions_stream`` set, every applied event's decision (its scores with model
  versions, its alerts) is added to that stream by the partition as soon as its batch is
  scored (:class:`RedisDecisions`): the reply channel of a stream-fed decision service.
  Delivery is at least once: a batch applied again after a recovery adds its decisions
  again, under the same ``event_id``.

Offsets: the entry id ``ms-seq`` maps to the int64 ``ms * 2**20 + seq`` (ms up to year
2248, a million entries per millisecond), in id order, so a part (the stream) has strictly
increasing offsets and an event without an ``eventId`` derives the same id from
(stream, entry id) whenever it is delivered. An id past that range (an explicit id a
producer chose) takes the next free offset instead: still increasing, but such an event
needs its own ``eventId`` to be recognised when re-delivered.

Example config::

    source:
      format: redis
      name: transactions
      url: redis://127.0.0.1:6379
      stream: transactions
      group: eventray
      consumer: eventray-1
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipelines.decisions import answers
from pipelines.errors import PipelineError
from pipelines.kinds import SourceKind
from pipelines.sources import RawBatch
from pipelines.spec import LimitsSpec, SourceSpec

__all__ = ["REDIS_STREAMS", "RedisDecisions", "RedisSourceError", "RedisStreamOptions",
           "RedisStreamSource", "add_events", "stream_offsets"]

_log = logging.getLogger(__name__)

#: Bits of an offset that hold the entry id's sequence number; the rest hold its ms.
SEQ_BITS = 20
_MAX_MS = (1 << (63 - SEQ_BITS)) - 1
_MAX_SEQ = (1 << SEQ_BITS) - 1
_ACK_CHUNK = 10_000
#: Entries one read may return at most (a reply of 100k events is some 50 MB).
_MAX_READ = 100_000


class RedisSourceError(PipelineError):
    """The stream cannot be read as configured (server unreachable, wrong type of key)."""


class RedisStreamOptions(BaseModel):
    """The ``redis`` kind's own fields of the ``source`` section.

    Attributes:
        url: the server, ``redis://HOST:PORT[/DB]`` (``rediss://`` for TLS).
        stream: the stream's key.
        group: the consumer group (created at the stream's start, ``start_id``, if absent).
        consumer: this reader's name in the group: keep it fixed across restarts, so that a
            restarted reader finds its own pending entries.
        block_ms: how long one read waits for new entries at most.
        batch_size: entries per read at most (the source section's common ``batch_size``).
        claim_idle: milliseconds another consumer's entry must have waited unacknowledged
            before ``open``, or a sweep while running, takes it over (its consumer is taken
            for dead).
        claim_every: milliseconds between a running reader's sweeps for such entries
            (0: only at ``open``).
        field: the entry field holding the event's JSON.
        start_id: where a new group starts: ``0`` (the whole stream) or ``$`` (new entries).
        decisions_stream: where each applied event's decision is added (``XADD`` with the
            fields ``event_id`` and ``decision``, its JSON); none when unset.
        decisions_maxlen: the decision stream is trimmed to about this many entries.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(default="redis://127.0.0.1:6379", pattern=r"^(redis|rediss|unix)://")
    stream: str = Field(min_length=1)
    group: str = Field(default="eventray", min_length=1)
    consumer: str = Field(default="eventray-1", min_length=1)
    block_ms: int = Field(default=100, ge=0, le=60_000)
    batch_size: int = Field(default=1_000, gt=0, le=_MAX_READ)
    claim_idle: int = Field(default=60_000, ge=0)
    claim_every: int = Field(default=30_000, ge=0)
    field: str = Field(default="event", min_length=1)
    start_id: str = Field(default="0", pattern=r"^(0|\$|[0-9]+(-[0-9]+)?)$")
    decisions_stream: str | None = Field(default=None, min_length=1)
    decisions_maxlen: int = Field(default=1_000_000, gt=0)


def stream_offsets(entry_ids: Sequence[bytes | str], after: int = -1) -> np.ndarray:
    """The int64 offsets of stream entry ids given in id order (see the module docstring).

    Args:
        entry_ids: ``ms-seq`` ids, ascending.
        after: the offset of the entry before them (an id out of range follows it).

    Example:
        >>> stream_offsets([b"1-0", b"1-1", b"2-0"]).tolist()
        [1048576, 1048577, 2097152]
    """
    if not entry_ids:
        return np.empty(0, np.int64)
    text = pa.array(entry_ids, pa.binary()).cast(pa.string())
    pieces = pc.split_pattern(text, "-")
    ms = pc.cast(pc.list_element(pieces, 0), pa.float64()).to_numpy(zero_copy_only=False)
    seq = pc.cast(pc.list_element(pieces, 1), pa.float64()).to_numpy(zero_copy_only=False)
    in_range = (ms <= _MAX_MS) & (seq <= _MAX_SEQ)
    mapped = np.where(in_range, ms, 0).astype(np.int64) * (1 << SEQ_BITS) \
        + np.where(in_range, seq, 0).astype(np.int64)
    if in_range.all() and mapped[0] > after:
        return mapped
    # Rare: an id out of range, or below the last one, takes the next free offset.
    offsets = np.empty(len(mapped), np.int64)
    last = after
    for i, (value, ok) in enumerate(zip(mapped.tolist(), in_range.tolist(), strict=True)):
        last = value if ok and value > last else last + 1
        offsets[i] = last
    return offsets


class RedisStreamSource:
    """A Redis stream read by one consumer of a group (a :class:`~pipelines.live.LiveSource`).

    The object holds only its configuration until ``open``, so it pickles like a file
    source. Its one part is the stream's key.

    Example:
        >>> source = RedisStreamSource("tx", RedisStreamOptions(stream="transactions"))
        >>> source.list_parts()
        ['transactions']
    """

    def __init__(self, name: str, options: RedisStreamOptions) -> None:
        self.name = name
        self.options = options
        self._client: Any = None
        self._history = True  # reading this consumer's pending entries before new ones
        self._history_from = b"0"
        self._last_offset = -1
        #: (offsets, entry ids) of each read, in read order, until acknowledged
        self._unacked: list[tuple[np.ndarray, list[bytes]]] = []
        self._sweep_at = 0.0  # when the next sweep for a dead consumer's entries starts
        self._sweep_from: bytes | None = None  # the sweep's cursor, while one is under way

    def list_parts(self) -> list[str]:
        return [self.options.stream]

    def decision_sink(self) -> RedisDecisions | None:
        """Where the partitions add the decisions (``decisions_stream``), if anywhere."""
        opts = self.options
        if opts.decisions_stream is None:
            return None
        return RedisDecisions(opts.url, opts.decisions_stream, opts.decisions_maxlen)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["options"])  # type: ignore[misc]

    # -- the live-source contract ---------------------------------------------------------

    def open(self, resume: dict[str, Any] | None) -> None:
        """Connect, create the group if needed, take over a dead consumer's entries, and
        start with this consumer's pending entries. ``resume`` is not needed: the group's
        pending entries are where this consumer stands."""
        import redis

        opts = self.options
        self._client = redis.Redis.from_url(opts.url)
        try:
            self._client.xgroup_create(opts.stream, opts.group, id=opts.start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise RedisSourceError(f"stream {opts.stream!r}: {exc}") from None
        except redis.ConnectionError as exc:
            raise RedisSourceError(f"cannot reach {opts.url}: {exc}") from None
        self._claim_idle_entries()
        self._history, self._history_from, self._last_offset = True, b"0", -1
        self._unacked = []
        self._sweep_at, self._sweep_from = time.monotonic() + opts.claim_every / 1000, None

    def _claim_idle_entries(self) -> int:
        """Take over every entry pending for ``claim_idle`` ms or more; returns how many.
        The entries are read again from this consumer's pending list, in id order with its
        own (the client drops the cursor of a JUSTID reply, so the entries come too)."""
        opts, cursor, claimed = self.options, b"0-0", 0
        while True:
            reply = self._client.xautoclaim(opts.stream, opts.group, opts.consumer,
                                            min_idle_time=opts.claim_idle, start_id=cursor,
                                            count=opts.batch_size)
            cursor = reply[0]
            claimed += len(reply[1])
            if cursor in (b"0-0", "0-0"):
                return claimed

    def poll(self, max_rows: int, timeout: float) -> list[RawBatch]:
        """The entries that arrived within ``timeout`` seconds (one read of at most
        ``min(max_rows, batch_size)`` entries), as one batch of JSON lines.

        Raises:
            RedisSourceError: the server is gone (after the client's own retries), or the
                stream or its group was deleted under the reader.
        """
        import redis

        try:
            return self._read(max_rows, timeout)
        except redis.ConnectionError as exc:
            raise RedisSourceError(f"lost {self.options.url}: {exc}") from None
        except redis.ResponseError as exc:
            raise RedisSourceError(f"stream {self.options.stream!r}, group "
                                   f"{self.options.group!r}: {exc}") from None

    def _read(self, max_rows: int, timeout: float) -> list[RawBatch]:
        opts = self.options
        count = max(1, min(max_rows, opts.batch_size))
        if self._history:
            reply = self._client.xreadgroup(opts.group, opts.consumer,
                                            {opts.stream: self._history_from}, count=count)
            entries = reply[0][1] if reply else []
            if entries:
                self._history_from = entries[-1][0]
                return self._batches(entries)
            self._history = False
        if opts.claim_every and (self._sweep_from is not None or time.monotonic() >= self._sweep_at):
            claimed = self._sweep(count)
            if claimed:
                return claimed
        block = int(min(timeout * 1000, opts.block_ms))
        reply = self._client.xreadgroup(opts.group, opts.consumer, {opts.stream: ">"},
                                        count=count, block=block if block > 0 else None)
        return self._batches(reply[0][1] if reply else [])

    def _sweep(self, count: int) -> list[RawBatch]:
        """One step of a sweep for entries another consumer left pending past
        ``claim_idle``: up to ``count`` of them, taken over, as a batch."""
        opts = self.options
        cursor, entries = self._sweep_from or b"0-0", []
        mine: set[bytes] | None = None
        while not entries:
            reply = self._client.xautoclaim(opts.stream, opts.group, opts.consumer,
                                            min_idle_time=opts.claim_idle, start_id=cursor,
                                            count=count)
            cursor, claimed = reply[0], reply[1]
            if claimed:
                if mine is None:
                    mine = {i for _, ids in self._unacked for i in ids}
                # one of ours that waited long for its checkpoint: already in a batch
                entries = [entry for entry in claimed if entry[0] not in mine]
            if cursor in (b"0-0", "0-0"):
                break
        done = cursor in (b"0-0", "0-0")
        self._sweep_from = None if done else cursor
        if done:
            self._sweep_at = time.monotonic() + opts.claim_every / 1000
        return self._batches(entries)

    def positions(self) -> dict[str, Any]:
        """``{stream: offset after the last entry read}``."""
        return {self.options.stream: self._last_offset + 1}

    def committed(self, positions: dict[str, Any]) -> None:
        """Acknowledge (``XACK``) the entries read before ``positions`` were taken."""
        if self._client is None:  # closed: what it read stays pending, and comes again
            return
        through = int(positions.get(self.options.stream, 0))
        ids: list[bytes] = []
        while self._unacked and self._unacked[0][0][-1] < through:
            ids += self._unacked.pop(0)[1]
        if self._unacked and self._unacked[0][0][0] < through:  # a read split by positions
            offsets, entry_ids = self._unacked[0]
            cut = int(np.searchsorted(offsets, through))
            ids += entry_ids[:cut]
            self._unacked[0] = (offsets[cut:], entry_ids[cut:])
        for start in range(0, len(ids), _ACK_CHUNK):
            self._client.xack(self.options.stream, self.options.group,
                              *ids[start:start + _ACK_CHUNK])

    def close(self) -> None:
        """Disconnect; acknowledges nothing (what was not acknowledged stays pending)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- entries to batches ---------------------------------------------------------------

    def _batches(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> list[RawBatch]:
        """One batch of the entries' events; an entry deleted from the stream (no fields)
        carries no event but is still acknowledged with the others."""
        if not entries:
            return []
        ids = [entry_id for entry_id, _ in entries]
        offsets = stream_offsets(ids, self._last_offset)
        self._last_offset = int(offsets[-1])
        self._unacked.append((offsets, ids))
        field = self.options.field.encode()
        present = np.array([bool(fields) for _, fields in entries])
        lines = [_event_line(fields, field) for _, fields in entries if fields]
        if not lines:
            return []
        return [RawBatch(self.name, self.options.stream, offsets[present],
                         pa.record_batch([pa.array(lines, pa.binary())], names=["line"]))]


class RedisDecisions:
    """A :class:`~pipelines.decisions.DecisionSink` adding one entry per decided event to a
    stream: ``XADD <stream> MAXLEN ~ <maxlen> * event_id <id> decision <json>``, a batch in
    one pipelined round trip. It connects in the partition's process (:meth:`connect`).

    Args:
        url: the server.
        stream: the decisions' stream.
        maxlen: about how many entries the stream keeps (older ones are trimmed).
    """

    def __init__(self, url: str, stream: str, maxlen: int = 1_000_000) -> None:
        self.url, self.stream, self.maxlen = url, stream, maxlen
        self._client: Any = None
        self.lost = 0  # decisions the server did not take (they are in the store's scores)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "stream": self.stream, "maxlen": self.maxlen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def connect(self) -> None:
        """Open the connection now (a ``PING``); a server not there yet is tried again by
        the first :meth:`send`."""
        import redis

        try:
            self._connected().ping()
        except redis.RedisError as exc:
            _log.warning("decisions' stream %r at %s not reachable yet: %s", self.stream, self.url, exc)

    def _connected(self) -> Any:
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def send(self, decisions: pa.Table) -> None:
        import redis

        found = answers(decisions)
        if not found:
            return
        pipe = self._connected().pipeline(transaction=False)
        for answer in found:  # one entry per event: the stream's unit, as XADD takes it
            pipe.xadd(self.stream, {"event_id": answer["event_id"],
                                    "decision": json.dumps(answer, separators=(",", ":"))},
                      maxlen=self.maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:  # the decisions are in the store: the run goes on
            self.lost += len(found)
            _log.warning("could not add %d decisions to %r at %s (%d so far): %s",
                         len(found), self.stream, self.url, self.lost, exc)


def _event_line(fields: dict[bytes, bytes], field: bytes) -> bytes:
    """The event's JSON; an entry without the field keeps its fields, under a name no
    event has, so that it is a dead letter that shows what arrived."""
    line = fields.get(field)
    if line is not None:
        return line
    shown = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()}
    return json.dumps({"redis_entry_without_event_field": shown}).encode()


def build_redis_source(spec: SourceSpec, paths: list[str], options: RedisStreamOptions,
                       limits: LimitsSpec) -> RedisStreamSource:
    """The ``redis`` kind's source (``paths`` are not used: the stream is the input)."""
    return RedisStreamSource(spec.source_name, options.model_copy(
        update={"batch_size": min(spec.batch_size, _MAX_READ)}))


#: The source kind, registered under ``redis`` (entry-point group ``eventray.sources``).
REDIS_STREAMS = SourceKind(RedisStreamOptions, build_redis_source, json_lines=True)


def add_events(url: str, stream: str, events: Iterable[dict[str, Any] | str | bytes],
               rate: float | None = None, *, field: str = "event", chunk: int = 500,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> list[bytes]:
    """Add events to a stream (``XADD stream * event <json>``), at ``rate`` events/s.

    Args:
        url: the server, ``redis://HOST:PORT``.
        stream: the stream's key.
        events: events as dicts (written as JSON) or JSON text.
        rate: events per second (None: as fast as the server takes them); the load is
            open loop: each chunk leaves at its scheduled time whatever the server does.
        field: the entry field for the event's JSON.
        chunk: entries per round trip (pipelined) when no rate or a high one is asked.
        sleep, clock: injected for tests.

    Returns:
        The entry ids, in order.

    Example:
        >>> events = [{"eventId": "e-1", "eventType": "transaction.created"}]
        >>> ids = add_events("redis://127.0.0.1:6379", "transactions", events)  # doctest: +SKIP
    """
    import redis

    client = redis.Redis.from_url(url)
    per_round = chunk if rate is None else max(1, min(chunk, int(rate // 100) or 1))
    ids: list[bytes] = []
    started, sent = clock(), 0
    try:
        pending: list[bytes] = []
        for event in events:
            pending.append(_as_json(event))
            if len(pending) == per_round:
                sent = _send(client, stream, field, pending, ids, sent, started, rate, sleep, clock)
                pending = []
        if pending:
            _send(client, stream, field, pending, ids, sent, started, rate, sleep, clock)
    finally:
        client.close()
    return ids


def _as_json(event: dict[str, Any] | str | bytes) -> bytes:
    if isinstance(event, bytes):
        return event
    return event.encode() if isinstance(event, str) else json.dumps(event).encode()


def _send(client: Any, stream: str, field: str, lines: list[bytes], ids: list[bytes], sent: int,
          started: float, rate: float | None, sleep: Callable[[float], None],
          clock: Callable[[], float]) -> int:
    """XADD ``lines`` in one pipelined round trip, once their time has come."""
    if rate is not None:
        wait = started + sent / rate - clock()
        if wait > 0:
            sleep(wait)
    pipe = client.pipeline(transaction=False)
    for line in lines:
        pipe.xadd(stream, {field: line})
    ids += pipe.execute()
    return sent + len(lines)
