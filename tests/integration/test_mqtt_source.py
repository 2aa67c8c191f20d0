"""The ``mqtt`` source against a real broker (mosquitto): QoS 1 in a persistent session,
PUBACK only after a committed checkpoint, unacknowledged messages sent again after a
reconnect, and the sensor flow of ``configs/iot-mqtt.yaml`` scoring each device."""

from __future__ import annotations

import datetime as dt
import json
import math
import pickle
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import polars as pl
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipelines.kinds import build_source
from pipelines.live import LiveSource
from pipelines.live_mqtt import MqttOptions, MqttSource
from pipelines.pipeline import load_pipeline
from tests.live_driver import BoundedLiveRun
from tests.live_servers import Server

ROOT = Path(__file__).resolve().parents[2]


def publish(server: Server, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait for every PUBACK from the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect("127.0.0.1", server.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def reading(device: str, index: int, value: float) -> bytes:
    moment = dt.datetime(2026, 12, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=index)
    return json.dumps({
        "eventId": f"{device}-{index}", "eventType": "sensor.reading",
        "timestamp": moment.isoformat().replace("+00:00", "Z"), "source": "plant-7",
        "correlationId": f"{device}-{index}", "data": {"device": device, "value": value},
        "metadata": {"version": "1.0", "region": "eu-west"}}).encode()


def drain(source: MqttSource, expected: int, max_rows: int = 1_000, wait_s: float = 5.0) -> list:
    """Poll until ``expected`` messages arrived (or ``wait_s`` passed without any), never
    taking more than ``expected``: the positions taken after it cover exactly those."""
    batches, count = [], 0
    while count < expected:
        polled = source.poll(min(max_rows, expected - count), wait_s)
        if not polled:
            break
        batches += polled
        count += sum(b.num_rows for b in polled)
    return batches


def payloads(batches: list) -> list[bytes]:
    return [line for b in batches for line in b.records.column("line").to_pylist()]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_unacknowledged_messages_come_again_after_reconnect(mqtt_broker: Server,
                                                            protocol: str) -> None:
    options = MqttOptions(url=mqtt_broker.url, topics=[f"redeliver-{protocol}/#"],
                          client_id=f"reader-{protocol}", protocol=protocol)
    first = MqttSource("sensors", options)
    first.open(None)  # creates the persistent session and its subscription
    sent = [(f"redeliver-{protocol}/d1", f"m{i}".encode()) for i in range(30)]
    publish(mqtt_broker, sent)
    covered = drain(first, 10, max_rows=10)
    positions = first.positions()
    rest = drain(first, 20)
    assert payloads(covered + rest) == [p for _, p in sent]
    first.committed(positions)  # PUBACK for the first 10 only
    first.close()
    publish(mqtt_broker, [(f"redeliver-{protocol}/d1", b"while-away")])
    second = MqttSource("sensors", options)
    second.open(positions)
    again = drain(second, 21)
    assert payloads(again) == [p for _, p in sent[10:]] + [b"while-away"]
    offsets = np.concatenate([b.offsets for b in again])
    assert offsets[0] == positions[options.client_id] and (np.diff(offsets) == 1).all()
    second.committed(second.positions())
    second.close()
    assert second._connection == 1, "the second session reconnected: its PUBACKs were skipped"
    third = MqttSource("sensors", options)
    third.open(second.positions())
    assert payloads(third.poll(100, 1.0)) == []  # everything acknowledged
    third.close()


def test_the_kind_is_registered_and_validated(mqtt_broker: Server) -> None:
    spec = load_pipeline(ROOT / "configs" / "iot-mqtt.yaml", {"source": {"url": mqtt_broker.url}})
    source = build_source(spec)
    assert isinstance(source, MqttSource) and isinstance(source, LiveSource)
    assert source.options.batch_size == 1000 and source.list_parts() == ["eventray-iot"]
    with pytest.raises(Exception, match="protocol"):
        build_source(load_pipeline(ROOT / "configs" / "iot-mqtt.yaml",
                                   {"source": {"protocol": "4"}}))


@pytest.mark.slow
def test_sensor_flow_scores_each_reading_once_across_a_crash(mqtt_broker: Server,
                                                             tmp_path: Path) -> None:
    spec = load_pipeline(ROOT / "configs" / "iot-mqtt.yaml", {
        "source": {"url": mqtt_broker.url, "client_id": "iot-e2e", "batch_size": 300},
        "runtime": {"checkpoint_every": 4}})
    # the detector learns each device for about a thousand readings before it judges
    devices, per_device, spike_at = ["pump-1", "pump-2", "fan-1"], 1_200, 1_100
    rng = np.random.default_rng(7)
    messages = []
    for i in range(per_device):
        for device in devices:
            value = 20 + 5 * math.sin(i / 10) + rng.normal(0, 0.2)
            if device == "pump-2" and i == spike_at:
                value = 400.0
            messages.append((f"sensors/{device}", reading(device, i, round(value, 3))))
    store = tmp_path / "store"
    warm = BoundedLiveRun(spec, store)
    warm.source.open(None)  # the session exists before the sensors publish
    warm.source.close()
    publish(mqtt_broker, messages)
    first = BoundedLiveRun(spec, store).drive(resume=False, max_batches=6, crash=True)
    assert first.checkpoints == 1  # 4 batches covered, 2 more read; nothing acknowledged
    second = BoundedLiveRun(spec, store).drive(resume=True, idle_s=1.5)
    # the covered readings came again (their PUBACKs never left) and were skipped
    assert second.counts.duplicates > 0
    assert second.counts.read == len(messages) + second.counts.duplicates
    events = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    readings = events.filter(pl.col("event_type") == "sensor.reading").collect()
    assert readings.height == len(messages) and readings["event_id"].n_unique() == len(messages)
    assert sorted(readings["key"].unique()) == sorted(devices)
    scores = pl.scan_parquet(store / "scores" / "**" / "*.parquet", hive_partitioning=True).collect()
    assert scores["event_id"].n_unique() == len(messages)
    alerts = pl.scan_parquet(store / "alerts" / "**" / "*.parquet", hive_partitioning=True).collect()
    assert "pump-2-1100" in alerts["event_id"].to_list()
    # all acknowledged: a new session under the same client id gets nothing
    last = MqttSource("sensors", build_source(spec).options)
    last.open(None)
    assert last.poll(100, 1.0) == []
    last.close()


def test_the_source_pickles_as_its_configuration(mqtt_broker: Server) -> None:
    source = MqttSource("sensors", MqttOptions(url=mqtt_broker.url, client_id="pickled"))
    source.open(None)
    copy = pickle.loads(pickle.dumps(source))  # an open source ships without its connection
    source.close()
    assert copy.options == source.options and copy.positions() == {"pickled": 0}


def test_produce_publishes_simulated_readings_that_the_sensor_flow_reads(mqtt_broker: Server) -> None:
    """`eventray produce --to mqtt://HOST:PORT/TOPIC`: readings at QoS 1 on TOPIC/<device>,
    paced at the rate asked, every one acknowledged by the broker and valid for
    ``configs/iot-mqtt.yaml`` (no dead letter when normalised)."""
    from pipelines.normalise import Normaliser
    from tests.support import eventray, summary_of

    spec = load_pipeline(ROOT / "configs" / "iot-mqtt.yaml", {
        "source": {"url": mqtt_broker.url, "client_id": "produce-reader", "topics": ["plant/#"]}})
    reader = MqttSource("sensors", build_source(spec).options)
    reader.open(None)  # the session exists before the producer publishes
    try:
        summary = summary_of(eventray("produce", "--to", f"{mqtt_broker.url}/plant", "--rate", "300",
                                      "--duration", "1", "--seed", "2"))
        assert summary["sent"] == summary["acknowledged"] == 300
        assert summary["elapsed_s"] >= 0.9  # paced, not published as fast as the broker takes them
        batches = drain(reader, 300)
    finally:
        reader.close()
    lines = payloads(batches)
    assert len(lines) == 300 and len({json.loads(line)["eventId"] for line in lines}) == 300
    normalised = Normaliser(spec).normalise(batches[0])
    assert normalised.deadletters.num_rows == 0 and normalised.events.num_rows == batches[0].num_rows
    assert {json.loads(line)["data"]["device"] for line in lines} == {f"device-{d:02d}" for d in range(20)}
