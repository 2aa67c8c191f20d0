"""``eventray produce``: simulated card transactions sent to a live endpoint at a fixed rate.

Open loop: request ``i`` is due at ``start + i / rate`` whatever the answers before it
took, and its latency is measured from when it was due, so a server that falls behind
shows its queueing in the percentiles instead of slowing the load down (no coordinated
omission). Every figure is taken here, client-side.

HTTP and Redis get the simulator's card transactions; MQTT gets simulated sensor readings
(``sensor.reading``, the device and its value in ``data``, as ``configs/iot-mqtt.yaml``
reads them), published at QoS 1 on ``<topic>/<device>``.

Example:
    eventray produce --to http://127.0.0.1:8080/score --rate 300 --duration 20
    eventray produce --to redis://127.0.0.1:6379/transactions --rate 2000 --duration 10
    eventray produce --to mqtt://127.0.0.1:1883/sensors --rate 500 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from pipelines.errors import ConfigError


def transactions_as_events(table: pa.Table, source: str = "card-network",
                           seed: int = 0) -> list[dict[str, Any]]:
    """Simulator transactions as events in the seed's JSON schema (the id is derived from
    the simulation's seed and the transaction id, so a resent transaction is the same
    event and another seed's are others).

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = simulate_transactions(SimulationSpec(n_customers=50, n_terminals=100, n_days=5))
        >>> events = transactions_as_events(t)
        >>> len(events) == t.num_rows > 0, events[0]["eventType"], events[0]["source"]
        (True, 'transaction.created', 'card-network')
    """
    import uuid

    rows = table.to_pylist()  # the client's side: one JSON document per event anyway
    namespace = uuid.UUID("6f1d7a52-3c3e-4d8e-9a55-0d2f0e7b9c11")
    events = []
    for row in rows:
        when = row["TX_DATETIME"]
        data = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        events.append({
            "eventId": str(uuid.uuid5(namespace, f"tx-{seed}-{row['TRANSACTION_ID']}")),
            "eventType": "transaction.created",
            "timestamp": when.isoformat() + ("" if when.tzinfo else "Z"),
            "source": source,
            "correlationId": str(row["CUSTOMER_ID"]),
            "data": data,
            "metadata": {"version": "1", "region": "eu-west"},
        })
    return events


def simulated_events(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """At least ``count`` simulated transactions as events (the first ``count``)."""
    from pipelines.fraud.simulator import SimulationSpec, simulate_transactions

    days = 1
    while True:
        table = simulate_transactions(SimulationSpec(n_customers=500, n_terminals=1000,
                                                     n_days=days, seed=seed))
        if table.num_rows >= count:
            return transactions_as_events(table.slice(0, count), seed=seed)
        days *= 2


def simulated_readings(count: int, seed: int = 0, devices: int = 20) -> list[dict[str, Any]]:
    """``count`` sensor readings in the seed's JSON schema, round-robin over ``devices``
    devices one second apart: each device a daily cycle with noise, and about one reading
    in 500 a spike (what the anomaly detectors are there to find).

    Example:
        >>> simulated_readings(3)[2]["data"]["device"]
        'device-02'
    """
    import datetime as dt
    import uuid

    rng = np.random.default_rng(seed)
    index = np.arange(count)
    device = index % devices
    level = 50 + 10 * device / max(1, devices - 1)
    value = level + 5 * np.sin(2 * np.pi * index / 86_400) + rng.normal(0, 1, count)
    value = np.where(rng.random(count) < 1 / 500, value + rng.choice([-1, 1], count) * 40, value)
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    namespace = uuid.UUID("0b9e1c3a-6d2f-4f7e-8a41-5c3d2e1f0a97")
    return [{"eventId": str(uuid.uuid5(namespace, f"reading-{seed}-{i}")),
             "eventType": "sensor.reading",
             "timestamp": (start + dt.timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
             "source": "simulated-plant", "correlationId": f"device-{d:02d}",
             "data": {"device": f"device-{d:02d}", "value": round(float(v), 4)},
             "metadata": {"version": "1", "region": "eu-west"}}
            for i, d, v in zip(index.tolist(), device.tolist(), value.tolist(), strict=True)]


async def _send(session: Any, url: str, body: bytes, headers: dict[str, str], due: float,
                latencies: list[float], statuses: dict[int, int]) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except Exception:  # a refused or broken connection is a result, counted as 0
        status = 0
    statuses[status] = statuses.get(status, 0) + 1
    if 200 <= status < 300:
        latencies.append(time.perf_counter() - due)


@contextmanager
def without_collection_pauses() -> Iterator[None]:
    """No garbage collection while a load generator sends (collected before and after).

    With thousands of requests in flight a full collection stalled the sender 70-80 ms
    while the server had answered in 26-48 ms: the run's worst latencies were the client's.
    """
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def run_open_loop(url: str, bodies: list[bytes], rate: float, token: str) -> dict[str, Any]:
    """:func:`open_loop` on uvloop (libuv's event loop, as Ray's async actors use when it is
    installed): the sender's own CPU shares the cores with the run it measures."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(open_loop(url, bodies, rate, token))


async def open_loop(url: str, bodies: list[bytes], rate: float, token: str) -> dict[str, Any]:
    """POST ``bodies`` to ``url`` at ``rate`` requests/s, open loop; client-side figures."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    with without_collection_pauses():
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = []
            start = time.perf_counter() + 0.05
            for i, body in enumerate(bodies):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_send(session, url, body, headers, due,
                                                       latencies, statuses)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
    return summarise(latencies, statuses, len(bodies), elapsed, rate)


def summarise(latencies: list[float], statuses: dict[int, int], sent: int, elapsed: float,
              rate: float) -> dict[str, Any]:
    """Percentiles in ms of the answered requests, and what was answered how."""
    values = np.array(latencies) * 1000
    p50, p90, p99, top = (np.percentile(values, [50, 90, 99, 100]).round(2).tolist()
                          if len(values) else [None] * 4)
    return {"requests": sent, "offered_per_s": rate, "elapsed_s": round(elapsed, 3),
            "ok": len(latencies), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": top}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True,
                        help="endpoint: http://HOST:PORT/score, http://HOST:PORT/events, "
                             "redis://HOST:PORT/STREAM (XADD STREAM * event <json>), or "
                             "mqtt://HOST:PORT/TOPIC (sensor readings, QoS 1, on TOPIC/<device>)")
    parser.add_argument("--rate", type=float, required=True,
                        help="requests per second (redis: events per second)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--batch", type=int, default=1, help="events per request (http)")
    parser.add_argument("--token-env", default="EVENTRAY_TOKEN",
                        help="environment variable holding the bearer token (http)")
    parser.add_argument("--seed", type=int, default=0)


def command(args: argparse.Namespace, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    target = urlsplit(args.to)
    if args.rate <= 0 or args.duration <= 0 or args.batch < 1:
        raise ConfigError("produce: --rate and --duration must be > 0, --batch >= 1")
    if target.scheme in ("redis", "rediss"):
        return _to_redis(args, target, log)
    if target.scheme == "mqtt":
        return _to_mqtt(args, target, log)
    if target.scheme not in ("http", "https"):
        raise ConfigError(f"produce --to {args.to}: give an http(s)://, redis:// or mqtt:// "
                          "endpoint")
    token = os.environ.get(args.token_env)
    if not token:
        raise ConfigError(f"produce: ${args.token_env} (the bearer token) is not set")
    requests = max(1, int(args.rate * args.duration))
    events = simulated_events(requests * args.batch, args.seed)
    single = args.batch == 1 and target.path.endswith("/score")
    bodies = [json.dumps(events[i] if single else events[i:i + args.batch]).encode()
              for i in range(0, len(events), args.batch)]
    log(f"sending {len(bodies)} requests of {args.batch} event(s) at {args.rate:g}/s to {args.to}")
    return run_open_loop(args.to, bodies, args.rate, token)


def _to_redis(args: argparse.Namespace, target: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """``XADD`` the simulated events to the stream the URL's path names, open loop at
    ``--rate`` events/s; what was sent, and how fast the server took it."""
    from redis.exceptions import RedisError

    from pipelines.live_redis import add_events

    stream = target.path.strip("/")
    if not stream or "/" in stream:
        raise ConfigError(f"produce --to {args.to}: name the stream, redis://HOST:PORT/STREAM")
    count = max(1, int(args.rate * args.duration))
    events = simulated_events(count, args.seed)
    server = target._replace(path="").geturl()
    log(f"adding {count} events at {args.rate:g}/s to stream {stream!r} on {server}")
    started = time.perf_counter()
    try:
        ids = add_events(server, stream, events, rate=args.rate)
    except (OSError, RedisError) as exc:  # a server down or refusing: say where, no traceback
        raise ConfigError(f"produce --to {args.to}: {exc}") from None
    elapsed = time.perf_counter() - started
    return {"stream": stream, "sent": len(ids), "offered_per_s": args.rate,
            "elapsed_s": round(elapsed, 3), "achieved_per_s": round(len(ids) / elapsed, 1),
            "first_id": ids[0].decode(), "last_id": ids[-1].decode()}


def _to_mqtt(args: argparse.Namespace, target: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Publish simulated sensor readings at QoS 1 on ``<topic>/<device>``, open loop at
    ``--rate`` messages/s; returns once the broker has acknowledged (PUBACK) every one."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = target.path.strip("/")
    if not topic or "#" in topic or "+" in topic:
        raise ConfigError(f"produce --to {args.to}: name the topic, mqtt://HOST:PORT/TOPIC")
    count = max(1, int(args.rate * args.duration))
    readings = simulated_readings(count, args.seed)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"eventray-produce-{os.getpid()}")
    client.max_inflight_messages_set(0)  # the broker's window, not the client's, paces QoS 1
    client.max_queued_messages_set(0)
    try:
        client.connect(target.hostname or "127.0.0.1", target.port or 1883)
    except OSError as exc:  # a broker down or refusing: say where, no traceback
        raise ConfigError(f"produce --to {args.to}: {exc}") from None
    client.loop_start()
    log(f"publishing {count} readings at {args.rate:g}/s on {topic}/<device> at {target.netloc}")
    started = time.perf_counter()
    try:
        sent = []
        for i, reading in enumerate(readings):
            wait = started + i / args.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent.append(client.publish(f"{topic}/{reading['data']['device']}",
                                       json.dumps(reading), qos=1))
        for info in sent:
            info.wait_for_publish(timeout=60)
        acknowledged = sum(info.is_published() for info in sent)
    finally:
        client.disconnect()
        client.loop_stop()
    elapsed = time.perf_counter() - started
    return {"topic": topic, "sent": count, "acknowledged": acknowledged,
            "offered_per_s": args.rate, "elapsed_s": round(elapsed, 3),
            "achieved_per_s": round(acknowledged / elapsed, 1)}
