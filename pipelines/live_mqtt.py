"""The ``mqtt`` source kind: IoT telemetry from an MQTT broker, QoS 1, persistent session.

Each message's payload is one event's JSON in the seed's schema (a sensor reading: the
device in ``data``, so that the config keys it by device); a poll's messages become a
:class:`~pipelines.sources.RawBatch` of JSON lines, read by the normaliser as a JSON
Lines file is (a malformed payload is a dead letter with its reason).

Delivery follows the live-source contract (:mod:`pipelines.live`): the client keeps a
persistent session under a fixed client id (MQTT 5 ``clean_start`` false with a session
expiry, or 3.1.1 ``clean_session`` false), subscribes at QoS 1 and acknowledges by hand
(paho-mqtt's ``manual_ack``): the PUBACK of a message leaves only in ``committed`` once a
checkpoint covering it is durable. A message not acknowledged when the reader stops or
its connection drops is sent again by the broker on the next connection, as the same
event when it carries its ``eventId``.

Offsets count the messages the client id has handed over (``positions`` carries the
count into the checkpoint and ``open`` continues from it), so no two messages share an
offset; a re-delivered message gets a new one, so an event without its own ``eventId``
cannot be recognised when re-delivered: sensors should send ids (the seed schema has one).

Broker settings that matter: the number of unacknowledged messages in flight per client
(MQTT 5 ``receive_maximum`` here; mosquitto's ``max_inflight_messages`` for 3.1.1,
20 by default) bounds what one checkpoint interval can read, and the broker's queue limit
for an offline session (mosquitto's ``max_queued_messages``, 1000 by default) bounds what
a stopped reader finds again: set it to what an outage may hold.

Example config::

    source:
      format: mqtt
      name: sensors
      url: mqtt://127.0.0.1:1883
      topics: ["sensors/#"]
      client_id: eventray-iot
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import PipelineError
from pipelines.kinds import SourceKind
from pipelines.sources import RawBatch
from pipelines.spec import LimitsSpec, SourceSpec

__all__ = ["MQTT", "MqttOptions", "MqttSource", "MqttSourceError"]

_QOS = 1
_NEVER_EXPIRES = 0xFFFFFFFF
#: How long ``close`` waits for queued PUBACKs to leave.
_FLUSH_S = 2.0


class MqttSourceError(PipelineError):
    """The broker cannot be reached or refused the connection or the subscription."""


class MqttOptions(BaseModel):
    """The ``mqtt`` kind's own fields of the ``source`` section.

    Attributes:
        url: the broker, ``mqtt://HOST[:PORT]`` (``mqtts://`` for TLS; port 1883 / 8883).
        topics: topic filters to subscribe to at QoS 1 (``sensors/#``).
        client_id: the session's id: keep it fixed, so that a restarted reader gets back
            the messages it had not acknowledged.
        protocol: ``"5"`` (session expiry and ``receive_maximum``) or ``"3.1.1"``.
        session_expiry_s: how long the broker keeps the session of a stopped reader (MQTT 5;
            the default never expires it).
        receive_maximum: unacknowledged messages the broker may send at once (MQTT 5).
        keepalive_s: the connection's keep-alive.
        connect_timeout_s: how long ``open`` waits for the broker's answer.
        batch_size: messages per batch at most (the section's common ``batch_size``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^mqtts?://[^/]+/?$")
    topics: list[str] = Field(default_factory=lambda: ["sensors/#"], min_length=1)
    client_id: str = Field(default="eventray-1", min_length=1, max_length=128)
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry_s: int = Field(default=_NEVER_EXPIRES, ge=1, le=_NEVER_EXPIRES)
    receive_maximum: int = Field(default=65_535, ge=1, le=65_535)
    keepalive_s: int = Field(default=60, ge=5, le=65_535)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=10_000, gt=0, le=1_000_000)


class MqttSource:
    """Messages of an MQTT persistent session (a :class:`~pipelines.live.LiveSource`).

    Holds only its configuration until ``open`` (it pickles like a file source). Its one
    part is the client id.

    Example:
        >>> source = MqttSource("sensors", MqttOptions(client_id="plant-7"))
        >>> source.list_parts()
        ['plant-7']
    """

    def __init__(self, name: str, options: MqttOptions) -> None:
        self.name = name
        self.options = options
        self._client: Any = None
        self._arrived: deque[tuple[int, int, bytes]] = deque()  # (connection, mid, payload)
        self._signal = threading.Condition()
        self._connection = 0  # counts connections: a mid is only valid on its own
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._disconnected = threading.Event()
        self._refused: str | None = None
        self._next_offset = 0
        #: (last offset, connection, mids) of each batch handed over, until acknowledged
        self._unacked: deque[tuple[int, int, list[int]]] = deque()

    def list_parts(self) -> list[str]:
        return [self.options.client_id]

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["options"])  # type: ignore[misc]

    # -- the live-source contract ---------------------------------------------------------

    def open(self, resume: dict[str, Any] | None) -> None:
        """Connect with the persistent session and subscribe; offsets continue from
        ``resume``. The broker then sends what the session holds unacknowledged."""
        self._next_offset = int((resume or {}).get(self.options.client_id, 0))
        self._arrived.clear()
        self._unacked.clear()
        self._client = self._new_client()
        url = urlsplit(self.options.url)
        if url.scheme == "mqtts":
            self._client.tls_set()
        self._connect(url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883))

    def _new_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self.options.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.options.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = lambda *_: self._disconnected.set()
        return client

    def _connect(self, host: str, port: int) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        opts, kwargs = self.options, {}
        if opts.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = opts.session_expiry_s
            properties.ReceiveMaximum = opts.receive_maximum
            kwargs = {"clean_start": False, "properties": properties}
        self._connected.clear()
        self._subscribed.clear()
        try:
            self._client.connect(host, port, keepalive=opts.keepalive_s, **kwargs)
        except OSError as exc:
            raise MqttSourceError(f"cannot reach {opts.url}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + opts.connect_timeout_s
        if not self._connected.wait(opts.connect_timeout_s) or self._refused:
            self.close()
            raise MqttSourceError(f"{opts.url}: {self._refused or 'no answer to CONNECT'}")
        # the subscription is in place before open returns: a message published after it
        # is the session's (published before the broker has the SUBSCRIBE, it is not)
        if not self._subscribed.wait(max(0.0, deadline - time.monotonic())) or self._refused:
            self.close()
            raise MqttSourceError(f"{opts.url}: {self._refused or 'no answer to SUBSCRIBE'}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        """Runs in the client's network thread, on every (re)connection."""
        if reason.is_failure:
            self._refused = f"connection refused: {reason}"
        else:
            with self._signal:
                self._connection += 1
            # Subscribing again is harmless and covers a session the broker had expired.
            client.subscribe([(topic, _QOS) for topic in self.options.topics])
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        """Runs in the client's network thread: the broker's SUBACK, one code per topic."""
        codes = zip(self.options.topics, reasons, strict=False)
        refused = [f"{topic} ({reason})" for topic, reason in codes if reason.is_failure]
        if refused:
            self._refused = f"subscription refused: {', '.join(refused)}"
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        """Runs in the client's network thread: queue the message for ``poll``."""
        with self._signal:
            self._arrived.append((self._connection, message.mid, message.payload))
            self._signal.notify()

    def poll(self, max_rows: int, timeout: float) -> list[RawBatch]:
        """The messages that arrived within ``timeout`` seconds, as one batch."""
        take = max(1, min(max_rows, self.options.batch_size))
        with self._signal:
            if not self._arrived:
                self._signal.wait(timeout)
            taken = [self._arrived.popleft() for _ in range(min(take, len(self._arrived)))]
        if not taken:
            return []
        offsets = np.arange(self._next_offset, self._next_offset + len(taken), dtype=np.int64)
        self._next_offset += len(taken)
        for connection in sorted({c for c, _, _ in taken}):
            mids = [mid for c, mid, _ in taken if c == connection]
            self._unacked.append((int(offsets[-1]), connection, mids))
        lines = pa.array([payload for _, _, payload in taken], pa.binary())
        return [RawBatch(self.name, self.options.client_id, offsets,
                         pa.record_batch([lines], names=["line"]))]

    def positions(self) -> dict[str, Any]:
        """``{client id: offset of the next message}``."""
        return {self.options.client_id: self._next_offset}

    def committed(self, positions: dict[str, Any]) -> None:
        """PUBACK, in arrival order, the messages handed over before ``positions`` were
        taken; those of an earlier connection are not (the broker sends them again)."""
        through = int(positions.get(self.options.client_id, 0))
        while self._unacked and self._unacked[0][0] < through:
            _, connection, mids = self._unacked.popleft()
            if connection == self._connection and self._client is not None:
                for mid in mids:
                    self._client.ack(mid, _QOS)

    def close(self) -> None:
        """Disconnect; acknowledges nothing (the session keeps what was not acknowledged)."""
        client, self._client = self._client, None
        if client is not None:
            # PUBACKs already given leave first: the network thread stops at DISCONNECT,
            # and a PUBACK still queued then would make the broker send its message again.
            flushed = time.monotonic() + _FLUSH_S
            while client.want_write() and time.monotonic() < flushed:
                time.sleep(0.005)
            self._disconnected.clear()
            client.disconnect()
            # the network thread writes what is queued, DISCONNECT last, then calls
            # on_disconnect: stopping it sooner could drop a PUBACK still in its hands (the
            # broker would send that message again). A wait of its own: on a loaded machine
            # the flush above may have used its whole budget with PUBACKs still queued.
            self._disconnected.wait(_FLUSH_S)
            client.loop_stop()


def build_mqtt_source(spec: SourceSpec, paths: list[str], options: MqttOptions,
                      limits: LimitsSpec) -> MqttSource:
    """The ``mqtt`` kind's source (``paths`` are not used: the topics are the input)."""
    return MqttSource(spec.source_name, options.model_copy(update={"batch_size": spec.batch_size}))


#: The source kind, registered under ``mqtt`` (entry-point group ``eventray.sources``).
MQTT = SourceKind(MqttOptions, build_mqtt_source, json_lines=True)
