"""Unit tests for pipelines.normalise: source batches to envelope events and dead letters.

No Ray, no files: batches are built in memory, ``ingested_at`` comes from a FakeClock.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import uuid
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from pipelines.dedup import DuplicateFilter
from pipelines.envelope import INVALID_EVENT_TYPE, TIMESTAMP
from pipelines.normalise import Normaliser
from pipelines.spec import PipelineSpec
from pipelines.testing import FakeClock
from tests.support import (
    EVENTS_SPEC,
    FRAUD_ROWS,
    FRAUD_SPEC,
    PART,
    START,
    derived_id,
    fraud_csv_batch,
    fraud_parquet_batch,
    jsonl_batch,
    line,
    normalise_lines,
    reasons,
    run,
    with_changes,
)

UTC = dt.UTC

# ------------------------------------------------------------------------------------------
# valid seed-schema events -> envelope
# ------------------------------------------------------------------------------------------


def test_valid_seed_event_fills_every_envelope_field() -> None:
    out = normalise_lines([line()])
    assert out.deadletters.num_rows == 0
    (event,) = out.events.to_pylist()
    assert event["event_id"] == "evt-1"
    assert event["event_type"] == "user.login"
    assert event["timestamp"] == dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert event["source"] == "web"
    assert event["correlation_id"] == "c7"
    assert event["key"] == "c7"  # configs/events.yaml keys by correlation id
    assert json.loads(event["data"]["json"]) == {"n": 1, "user": "u1"}
    meta = event["metadata"]
    assert (meta["version"], meta["region"], meta["ingested_at"]) == ("1.0", "us-east", START)
    assert json.loads(meta["tags"]) == {"version": "1.0", "region": "us-east"}
    assert out.events.schema.field("timestamp").type == TIMESTAMP


def test_missing_event_id_is_a_uuid5_of_source_part_and_offset() -> None:
    normaliser = Normaliser(EVENTS_SPEC, FakeClock(START))
    lines = [line(eventId=...), line(eventId=..., correlationId=...)]
    out = run(normaliser, jsonl_batch(lines, offsets=[40, 1234]))
    ids = out.events.column("event_id").to_pylist()
    assert ids == [derived_id(40), derived_id(1234)]
    assert uuid.UUID(ids[0]).version == 5
    again = run(normaliser, jsonl_batch(lines, offsets=[40, 1234]))
    assert again.events.column("event_id").to_pylist() == ids  # a re-read is the same event
    elsewhere = run(normaliser, jsonl_batch(lines, offsets=[40, 1234], part="day-2.jsonl"))
    assert set(elsewhere.events.column("event_id").to_pylist()).isdisjoint(ids)


def test_given_event_id_is_kept_verbatim() -> None:
    out = normalise_lines([line(eventId="0b9c-Ünïcode/../id")])
    assert out.events.column("event_id").to_pylist() == ["0b9c-Ünïcode/../id"]


@pytest.mark.parametrize("event_id", ["evt-9", ...], ids=["given-id", "derived-id"])
def test_correlation_id_defaults_to_the_event_id(event_id: Any) -> None:
    out = normalise_lines([line(eventId=event_id, correlationId=...)])
    (event,) = out.events.to_pylist()
    expected = "evt-9" if event_id == "evt-9" else derived_id(0)
    assert event["event_id"] == event["correlation_id"] == event["key"] == expected


def test_key_comes_from_the_field_configured_per_event_type() -> None:
    spec = with_changes(EVENTS_SPEC, event_types={
        "user.login": {"key": "user"},  # a payload field (JSON path into data)
        "order.placed": {"key": "source"},  # an envelope field
    })
    out = normalise_lines([
        line(eventId="a", data={"user": "u42"}),
        line(eventId="b", eventType="order.placed", source="shop"),
        line(eventId="c", eventType="iot.reading", correlationId="c9"),  # the default type
    ], spec=spec)
    assert out.events.column("key").to_pylist() == ["u42", "shop", "c9"]


def test_ingested_at_is_stamped_by_the_injected_clock() -> None:
    clock = FakeClock(START)
    normaliser = Normaliser(EVENTS_SPEC, clock)
    first = run(normaliser, jsonl_batch([line(), b"{broken"]))
    clock.advance(90.5)
    second = run(normaliser, jsonl_batch([line(eventId="evt-2"), b"{broken"]))
    later = START + dt.timedelta(seconds=90.5)
    for out, moment in ((first, START), (second, later)):
        ingested = [m["ingested_at"] for m in out.events.column("metadata").to_pylist()]
        assert ingested == [moment]
        assert out.deadletters.column("ingested_at").to_pylist() == [moment]


def test_metadata_defaults_come_from_the_event_type_config() -> None:
    spec = with_changes(EVENTS_SPEC, default_event_type={"key": "correlation_id", "region": "eu-north"})
    out = normalise_lines([
        line(eventId="a", metadata=...),
        line(eventId="b", metadata={"region": "ap-south"}),
        line(eventId="c", metadata={"version": "1"}),
    ], spec=spec)
    metas = out.events.column("metadata").to_pylist()
    assert [(m["version"], m["region"]) for m in metas] == [
        ("1", "eu-north"), ("1", "ap-south"), ("1", "eu-north")]
    assert metas[0]["tags"] is None


def test_missing_payload_leaves_data_null_and_payload_is_compact_json() -> None:
    out = normalise_lines([line(eventId="a", data=...),
                           line(eventId="b", data={"nested": {"x": [1, 2, None]}, "s": "é\n"})])
    payloads = [d["json"] for d in out.events.column("data").to_pylist()]
    assert payloads[0] is None
    assert json.loads(payloads[1]) == {"nested": {"x": [1, 2, None]}, "s": "é\n"}


def test_an_empty_batch_gives_empty_tables() -> None:
    out = normalise_lines([])
    assert (out.read, out.events.num_rows, out.deadletters.num_rows) == (0, 0, 0)


# ------------------------------------------------------------------------------------------
# reason codes
# ------------------------------------------------------------------------------------------

LIMIT = 512
SMALL_LIMIT = with_changes(EVENTS_SPEC, limits={"max_payload_bytes": LIMIT})

REASON_CASES: list[tuple[str, bytes, str]] = [
    ("invalid-start-byte", b'{"eventId": "\xff"}', "bad_encoding"),
    ("truncated-utf8", line()[:-2] + b'\xc3"}', "bad_encoding"),
    ("utf8-surrogate", b"\xed\xa0\x80", "bad_encoding"),
    ("too-large", line(data={"blob": "x" * LIMIT}), "payload_too_large"),
    ("too-large-and-broken", b"{" + b"x" * LIMIT, "payload_too_large"),
    ("truncated-json", line()[:40], "bad_json"),
    ("trailing-garbage", line() + b" trailing", "bad_json"),
    ("two-objects", line() + line(), "bad_json"),
    ("single-quotes", b"{'eventType': 'user.login'}", "bad_json"),
    ("array", b"[1, 2]", "not_an_object"),
    ("number", b"42", "not_an_object"),
    ("string", b'"user.login"', "not_an_object"),
    ("no-event-type", line(eventType=...), "missing_event_type"),
    ("null-event-type", line(eventType=None), "missing_event_type"),
    ("empty-event-type", line(eventType=""), "missing_event_type"),
    ("empty-object", b"{}", "missing_event_type"),
    ("path-up", line(eventType="../../x"), "bad_event_type"),
    ("path-abs", line(eventType="/etc/passwd"), "bad_event_type"),
    ("path-sep", line(eventType="a/b"), "bad_event_type"),
    ("dotdot", line(eventType=".."), "bad_event_type"),
    ("hidden", line(eventType=".hidden"), "bad_event_type"),
    ("upper-case", line(eventType="User.Login"), "bad_event_type"),
    ("trailing-newline", line(eventType="user.login\n"), "bad_event_type"),
    ("too-long", line(eventType="a" * 129), "bad_event_type"),
    ("numeric-type", line(eventType=3), "bad_event_type"),
    ("list-type", line(eventType=["user.login"]), "bad_event_type"),
    ("object-type", line(eventType={"name": "user.login"}), "bad_event_type"),
    ("no-timestamp", line(timestamp=...), "missing_timestamp"),
    ("null-timestamp", line(timestamp=None), "missing_timestamp"),
    ("word-timestamp", line(timestamp="yesterday"), "bad_timestamp"),
    ("month-13", line(timestamp="2024-13-01T00:00:00Z"), "bad_timestamp"),
    ("feb-30", line(timestamp="2024-02-30"), "bad_timestamp"),
    ("bool-timestamp", line(timestamp=True), "bad_timestamp"),
    ("object-timestamp", line(timestamp={"at": "2024-05-01"}), "bad_timestamp"),
    ("huge-epoch", line(timestamp=1e300), "timestamp_out_of_range"),
    ("year-9999", line(timestamp="9999-12-31T00:00:00Z"), "timestamp_out_of_range"),
    ("year-2100", line(timestamp="2100-01-01T00:00:00Z"), "timestamp_out_of_range"),
    ("nan-timestamp", line(timestamp="NaN"), "bad_timestamp"),
    ("empty-event-id", line(eventId=""), "bad_event_id"),
    ("long-event-id", line(eventId="x" * 129), "bad_event_id"),
    ("future-version", line(metadata={"version": 2}), "bad_version"),
    ("zero-version", line(metadata={"version": 0}), "bad_version"),
    ("text-version", line(metadata={"version": "one"}), "bad_version"),
    ("fraction-version", line(metadata={"version": 1.5}), "bad_version"),
    ("float-version", line(metadata={"version": 1.0}), "bad_version"),
    ("future-text-version", line(metadata={"version": "2.0"}), "bad_version"),
    ("double-dot-version", line(metadata={"version": "1..2"}), "bad_version"),
    ("zero-text-version", line(metadata={"version": "0.9"}), "bad_version"),
    ("negative-version", line(metadata={"version": -1}), "bad_version"),
    ("empty-version", line(metadata={"version": ""}), "bad_version"),
    ("list-version", line(metadata={"version": [1]}), "bad_version"),
    ("object-version", line(metadata={"version": {"major": 1}}), "bad_version"),
    ("bool-version", line(metadata={"version": True}), "bad_version"),
    ("empty-key", line(correlationId=""), "missing_key"),
    ("long-key", line(correlationId="k" * 257), "bad_field"),
]


@pytest.mark.parametrize(("bad", "reason"), [(b, r) for _, b, r in REASON_CASES],
                         ids=[i for i, _, _ in REASON_CASES])
def test_each_bad_line_is_dead_lettered_with_its_reason(bad: bytes, reason: str) -> None:
    out = normalise_lines([bad], spec=SMALL_LIMIT)
    assert out.events.num_rows == 0
    assert reasons(out) == [reason]


def test_reasons_do_not_depend_on_the_other_rows_of_the_batch() -> None:
    good = [line(eventId=f"ok-{i}") for i in range(3)]
    lines = [good[0], *(b for _, b, _ in REASON_CASES), good[1], good[2]]
    out = normalise_lines(lines, spec=SMALL_LIMIT)
    assert out.events.column("event_id").to_pylist() == ["ok-0", "ok-1", "ok-2"]
    by_offset = dict(zip(out.deadletters.column("offset").to_pylist(), reasons(out), strict=True))
    assert by_offset == {i + 1: r for i, (_, _, r) in enumerate(REASON_CASES)}


@pytest.mark.parametrize(("bad", "words"), [
    (line(eventType="../../x"), ["../../x"]),
    (line(timestamp="yesterday"), ["yesterday"]),
    (line(metadata={"version": 7}), ["7", "1"]),
    (line(data={"blob": "x" * LIMIT}), ["limits.max_payload_bytes"]),
    (b"\xff", ["UTF-8"]),
])
def test_messages_say_what_was_wrong(bad: bytes, words: list[str]) -> None:
    (message,) = normalise_lines([bad], spec=SMALL_LIMIT).deadletters.column("message").to_pylist()
    for word in words:
        assert word in message


def test_first_failing_check_wins() -> None:
    out = normalise_lines([
        line(eventType="Bad/Type", timestamp="never", metadata={"version": 9}),
        line(timestamp="never", metadata={"version": 9}),
        line(eventType=..., timestamp=...),
        b"\xff" + b"x" * LIMIT,
    ], spec=SMALL_LIMIT)
    assert reasons(out) == ["bad_event_type", "bad_timestamp", "missing_event_type", "bad_encoding"]


def test_payload_at_the_limit_is_accepted() -> None:
    base = line(data={"blob": ""})
    exact = line(data={"blob": "x" * (LIMIT - len(base))})
    assert len(exact) == LIMIT
    out = normalise_lines([exact, line(eventId="evt-2", data={"blob": "x" * (LIMIT + 1 - len(base))})],
                          spec=SMALL_LIMIT)
    assert out.events.column("event_id").to_pylist() == ["evt-1"]
    assert reasons(out) == ["payload_too_large"]


def test_dead_letter_keeps_raw_bytes_part_offset_and_claimed_type() -> None:
    lines = [line(eventType="../../x"), b"\xfe\xff not utf-8", line(eventId="ok"),
             line(eventId="late", timestamp="soon"), b"  [1, 2]  "]
    out = run(Normaliser(EVENTS_SPEC, FakeClock(START)),
              jsonl_batch(lines, offsets=[3, 7, 8, 20, 21], part="in/2024-05-01.jsonl"))
    rows = out.deadletters.to_pylist()
    assert [r["raw"] for r in rows] == [lines[0], lines[1], lines[3], lines[4]]
    assert [r["offset"] for r in rows] == [3, 7, 20, 21]
    assert {(r["source"], r["part"]) for r in rows} == {("events", "in/2024-05-01.jsonl")}
    assert [r["claimed_event_type"] for r in rows] == ["../../x", None, "user.login", None]
    assert [r["event_type"] for r in rows] == [
        INVALID_EVENT_TYPE, INVALID_EVENT_TYPE, "user.login", INVALID_EVENT_TYPE]
    assert [r["event_id"] for r in rows] == [
        "evt-1", derived_id(7, part="in/2024-05-01.jsonl"), "late",
        derived_id(21, part="in/2024-05-01.jsonl")]


# ------------------------------------------------------------------------------------------
# duplicates
# ------------------------------------------------------------------------------------------


def test_repeated_event_ids_after_the_first_are_duplicates_within_and_across_batches() -> None:
    normaliser, seen = Normaliser(EVENTS_SPEC, FakeClock(START)), DuplicateFilter()
    first = run(normaliser, jsonl_batch([line(eventId="a"), line(eventId="b"),
                                         line(eventId="a", data={"n": 2})]), seen)
    assert first.events.column("event_id").to_pylist() == ["a", "b"]
    assert json.loads(first.events.column("data").to_pylist()[0]["json"]) == {"n": 1, "user": "u1"}
    assert reasons(first) == ["duplicate_event_id"]
    assert "a" in first.deadletters.column("message")[0].as_py()
    second = run(normaliser, jsonl_batch([line(eventId="b"), line(eventId="c")], offsets=[3, 4]), seen)
    assert second.events.column("event_id").to_pylist() == ["c"]
    assert second.deadletters.to_pylist()[0] | {"ingested_at": None} == {
        "event_id": "b", "event_type": "user.login", "claimed_event_type": "user.login",
        "source": "events", "part": PART, "offset": 3, "raw": line(eventId="b"),
        "reason": "duplicate_event_id", "message": "event id b was already stored",
        "ingested_at": None}


def test_a_rejected_line_does_not_claim_its_event_id() -> None:
    out = normalise_lines([line(eventId="a", timestamp="never"), line(eventId="a")],
                          duplicates=DuplicateFilter())
    assert reasons(out) == ["bad_timestamp"]
    assert out.events.column("event_id").to_pylist() == ["a"]


def test_without_a_duplicate_filter_repeats_are_not_checked() -> None:
    out = normalise_lines([line(), line()])
    assert out.events.num_rows == 2


# ------------------------------------------------------------------------------------------
# timestamps
# ------------------------------------------------------------------------------------------

T = dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
EPOCH_S = int(T.timestamp())


@pytest.mark.parametrize(("raw", "expected"), [
    ("2024-05-01T10:00:00Z", T),
    ("2024-05-01T10:00:00.123456Z", T.replace(microsecond=123456)),
    ("2024-05-01T12:00:00+02:00", T),
    ("2024-05-01T04:30:00-05:30", T),
    ("2024-05-01 10:00:00+00:00", T),
    ("2024-05-01T10:00:00", T),
    ("2024-05-01 10:00:00", T),
    ("2024-05-01", T.replace(hour=0)),
    (" 2024-05-01T10:00:00Z ", T),
    (EPOCH_S, T),
    (EPOCH_S + 0.5, T.replace(microsecond=500000)),
    (EPOCH_S * 1000 + 123, T.replace(microsecond=123000)),
    (EPOCH_S * 1_000_000 + 7, T.replace(microsecond=7)),
    (str(EPOCH_S), T),
    (str(EPOCH_S * 1000), T),
    (-86400, dt.datetime(1969, 12, 31, tzinfo=UTC)),
], ids=repr)
def test_timestamp_forms_land_as_utc_microseconds(raw: Any, expected: dt.datetime) -> None:
    out = normalise_lines([line(timestamp=raw)])
    assert out.events.column("timestamp").type == pa.timestamp("us", tz="UTC")
    assert out.events.column("timestamp").to_pylist() == [expected]


# ------------------------------------------------------------------------------------------
# typed payloads (configs/fraud.yaml)
# ------------------------------------------------------------------------------------------


def expected_fraud_data() -> list[dict[str, Any]]:
    rows = [dict(zip(FRAUD_ROWS, values, strict=True)) for values in zip(*FRAUD_ROWS.values(),
                                                                         strict=True)]
    return [row | {"TX_DATETIME": row["TX_DATETIME"].replace(tzinfo=UTC), "json": None}
            for row in rows]


@pytest.mark.parametrize("make_batch", [fraud_parquet_batch, fraud_csv_batch],
                         ids=["parquet-typed", "csv-strings"])
def test_typed_payloads_keep_their_types(make_batch: Any) -> None:
    normaliser = Normaliser(FRAUD_SPEC, FakeClock(START))
    batch = make_batch()
    out = run(normaliser, batch)
    assert out.deadletters.num_rows == 0
    data_type = out.events.schema.field("data").type
    assert {f.name: f.type for f in data_type} == {
        "TRANSACTION_ID": pa.int64(), "TX_DATETIME": TIMESTAMP, "CUSTOMER_ID": pa.int64(),
        "TERMINAL_ID": pa.int64(), "TX_AMOUNT": pa.float64(), "TX_TIME_SECONDS": pa.int64(),
        "TX_TIME_DAYS": pa.int64(), "TX_FRAUD": pa.int64(), "TX_FRAUD_SCENARIO": pa.int64(),
        "json": pa.string()}
    assert out.events.column("data").to_pylist() == expected_fraud_data()
    events = out.events.to_pylist()
    assert [e["key"] for e in events] == ["596", "4961"]
    assert [e["timestamp"] for e in events] == [r["TX_DATETIME"] for r in expected_fraud_data()]
    assert {(e["event_type"], e["source"]) for e in events} == {("transaction.created", "card-network")}
    assert [e["metadata"]["region"] for e in events] == ["eu-west", "eu-west"]
    assert [e["event_id"] for e in events] == [
        derived_id(i, source="transactions", part=batch.part) for i in (0, 1)]


@pytest.mark.parametrize(("changes", "drop", "reason", "field"), [
    ({"CUSTOMER_ID": ["1", None]}, None, "missing_field", "CUSTOMER_ID"),
    (None, "TX_AMOUNT", "missing_field", "TX_AMOUNT"),
    ({"CUSTOMER_ID": ["1", "x"]}, None, "bad_field", "CUSTOMER_ID"),
    ({"TX_FRAUD": ["0", "1.5"]}, None, "bad_field", "TX_FRAUD"),
    ({"TX_AMOUNT": ["1.0", "abc"]}, None, "bad_field", "TX_AMOUNT"),
    ({"TX_DATETIME": ["2018-04-01 00:00:31", "2018-04-01 00:00:31"],
      "TERMINAL_ID": ["1", "1e400"]}, None, "bad_field", "TERMINAL_ID"),
])
def test_typed_payload_field_errors(changes: dict | None, drop: str | None, reason: str,
                                    field: str) -> None:
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)), fraud_csv_batch(changes, drop))
    dead = out.deadletters.to_pylist()
    expected_offsets = [0, 1] if drop else [1]
    assert [d["offset"] for d in dead] == expected_offsets
    assert {d["reason"] for d in dead} == {reason}
    assert all(field in d["message"] for d in dead)
    assert out.events.num_rows == 2 - len(dead)


def test_columnar_dead_letter_raw_is_the_row_as_json() -> None:
    batch = fraud_csv_batch({"TX_AMOUNT": ["1.0", "abc"]})
    (dead,) = run(Normaliser(FRAUD_SPEC, FakeClock(START)), batch).deadletters.to_pylist()
    assert json.loads(dead["raw"]) == {name: batch.records.column(name)[1].as_py()
                                       for name in batch.records.schema.names}
    assert (dead["source"], dead["part"], dead["offset"]) == ("transactions", "tx.csv", 1)


def test_columnar_bad_timestamp_is_dead_lettered() -> None:
    batch = fraud_csv_batch({"TX_DATETIME": ["2018-04-01 00:00:31", "not a time"]})
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)), batch)
    assert reasons(out) == ["bad_timestamp"]


# ------------------------------------------------------------------------------------------
# versions and upcasters
# ------------------------------------------------------------------------------------------

TYPED_V2 = with_changes(EVENTS_SPEC, event_types={
    "user.login": {"version": 2, "key": "user", "payload": {"user": "str", "channel": "str"}}})


def upcast_lines() -> list[bytes]:
    return [
        line(eventId="v1", data={"user": "u1"}, metadata={"version": 1}),
        line(eventId="v2", data={"user": "u2", "channel": "app"}, metadata={"version": 2}),
        line(eventId="v3", data={"user": "u3"}, metadata={"version": 3}),
        line(eventId="other", eventType="iot.reading", metadata={"version": 1}),
    ]


def add_channel(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(json=pl.col("json").str.replace(r"^\{", '{"channel":"web",'))


@pytest.mark.parametrize(("given", "stored"), [
    ("1", "1"), ("1.0", "1.0"), ("1.2.3", "1.2.3"), ("1.10", "1.10"), (1, "1"), ("2", "2"),
    ("2.1", "2.1"), (2, "2"), ("2.0.7", "2.0.7")])
def test_integer_and_dotted_versions_are_stored_as_the_producer_gave_them(
        given: Any, stored: str) -> None:
    spec = with_changes(EVENTS_SPEC, event_types={"user.login": {"version": 2}})
    normaliser = Normaliser(spec, FakeClock(START))
    normaliser.registry.register_upcaster("user.login", from_version=1)(add_channel)
    out = run(normaliser, jsonl_batch([line(metadata={"version": given, "region": "us-east"})]))
    assert reasons(out) == []
    (event,) = out.events.to_pylist()
    if stored.split(".")[0] == "2":  # the current major: payload and version as given
        assert (event["metadata"]["version"], json.loads(event["data"]["json"])) == (
            stored, {"n": 1, "user": "u1"})
    else:  # an older major: upcast, with the producer's version kept in the tags
        assert event["metadata"]["version"] == "2"
        assert json.loads(event["data"]["json"])["channel"] == "web"
        assert json.loads(event["metadata"]["tags"])["version"] == given


def test_minor_versions_select_their_major_schema_and_upcaster() -> None:
    normaliser = Normaliser(TYPED_V2, FakeClock(START))
    normaliser.registry.register_upcaster("user.login", from_version=1)(add_channel)
    out = run(normaliser, jsonl_batch([
        line(eventId="a", data={"user": "u1"}, metadata={"version": "1.7"}),
        line(eventId="b", data={"user": "u2", "channel": "app"}, metadata={"version": "2.3"}),
        line(eventId="c", data={"user": "u3"}, metadata={"version": "3.0"}),
    ]))
    events = {e["event_id"]: e for e in out.events.to_pylist()}
    assert (events["a"]["metadata"]["version"], events["a"]["data"]["channel"]) == ("2", "web")
    assert (events["b"]["metadata"]["version"], events["b"]["data"]["channel"]) == ("2.3", "app")
    (dead,) = out.deadletters.to_pylist()
    assert (dead["event_id"], dead["reason"]) == ("c", "bad_version")
    assert "3.0" in dead["message"] and "current version 2" in dead["message"]


def test_a_fractional_json_number_is_not_a_version_but_its_string_is() -> None:
    out = normalise_lines([line(eventId="n", metadata={"version": 1.5}),
                           line(eventId="s", metadata={"version": "1.5"})])
    assert out.events.column("event_id").to_pylist() == ["s"]
    assert out.events.column("metadata").to_pylist()[0]["version"] == "1.5"
    (message,) = out.deadletters.column("message").to_pylist()
    assert "1.5 is not a version" in message


def test_upcaster_brings_version_1_payloads_to_version_2() -> None:
    normaliser = Normaliser(TYPED_V2, FakeClock(START))
    normaliser.registry.register_upcaster("user.login", from_version=1)(add_channel)
    out = run(normaliser, jsonl_batch(upcast_lines()))
    events = {e["event_id"]: e for e in out.events.to_pylist()}
    assert sorted(events) == ["other", "v1", "v2"]
    assert events["v1"]["metadata"]["version"] == "2"
    assert (events["v1"]["data"]["user"], events["v1"]["data"]["channel"]) == ("u1", "web")
    assert (events["v2"]["data"]["user"], events["v2"]["data"]["channel"]) == ("u2", "app")
    assert events["v1"]["key"] == "u1"
    assert events["other"]["metadata"]["version"] == "1"
    assert out.deadletters.to_pylist()[0]["event_id"] == "v3"
    assert reasons(out) == ["bad_version"]


def test_missing_upcaster_gives_bad_version() -> None:
    out = run(Normaliser(TYPED_V2, FakeClock(START)), jsonl_batch(upcast_lines()))
    assert sorted(out.events.column("event_id").to_pylist()) == ["other", "v2"]
    dead = {d["event_id"]: d for d in out.deadletters.to_pylist()}
    assert {k: d["reason"] for k, d in dead.items()} == {"v1": "bad_version", "v3": "bad_version"}
    assert "upcaster" in dead["v1"]["message"]


def test_failing_upcaster_gives_upcast_failed() -> None:
    normaliser = Normaliser(TYPED_V2, FakeClock(START))

    @normaliser.registry.register_upcaster("user.login", from_version=1)
    def broken(df: pl.DataFrame) -> pl.DataFrame:
        raise KeyError("channel")

    out = run(normaliser, jsonl_batch(upcast_lines()))
    dead = {d["event_id"]: d for d in out.deadletters.to_pylist()}
    assert dead["v1"]["reason"] == "upcast_failed"
    assert "KeyError" in dead["v1"]["message"]


def test_upcaster_changing_the_row_count_gives_upcast_failed() -> None:
    normaliser = Normaliser(TYPED_V2, FakeClock(START))
    normaliser.registry.register_upcaster("user.login", from_version=1)(lambda df: df.head(0))
    dead = run(normaliser, jsonl_batch(upcast_lines())).deadletters.to_pylist()
    assert {d["event_id"]: d["reason"] for d in dead}["v1"] == "upcast_failed"


@pytest.mark.parametrize("source", [..., None, 5], ids=["absent", "null", "number"])
def test_source_field_falls_back_to_the_source_name(source: Any) -> None:
    out = normalise_lines([line(eventId="a", source=source), line(eventId="b")])
    expected = "5" if source == 5 else "events"
    assert out.events.column("source").to_pylist() == [expected, "web"]


# ------------------------------------------------------------------------------------------
# regressions: bugs found by these tests, fixed
# ------------------------------------------------------------------------------------------


def test_registered_untyped_event_type_keeps_its_json_payload() -> None:
    spec = with_changes(EVENTS_SPEC, event_types={"user.login": {"key": "correlation_id"}})
    out = normalise_lines([line()], spec=spec)
    (data,) = out.events.column("data").to_pylist()
    assert data["json"] is not None and json.loads(data["json"]) == {"n": 1, "user": "u1"}


def test_upcaster_of_an_untyped_payload_rewrites_data_json() -> None:
    spec = with_changes(EVENTS_SPEC, event_types={"user.login": {"version": 2}})
    normaliser = Normaliser(spec, FakeClock(START))
    normaliser.registry.register_upcaster("user.login", from_version=1)(add_channel)
    out = run(normaliser, jsonl_batch([line(metadata={"version": 1})]))
    (event,) = out.events.to_pylist()
    assert event["metadata"]["version"] == "2"
    assert event["data"]["json"] is not None
    assert json.loads(event["data"]["json"]) == {"channel": "web", "n": 1, "user": "u1"}


@pytest.mark.parametrize("value", [True, False])
def test_boolean_event_type_is_a_bad_event_type(value: bool) -> None:
    assert reasons(normalise_lines([line(eventType=value)])) == ["bad_event_type"]


@pytest.mark.parametrize("value", [{"k": 1}, [1, 2], True], ids=["object", "array", "bool"])
def test_non_string_event_id_is_a_bad_event_id(value: Any) -> None:
    assert reasons(normalise_lines([line(eventId=value)])) == ["bad_event_id"]


@pytest.mark.parametrize("spec", [
    EVENTS_SPEC,
    FRAUD_SPEC,
], ids=["untyped", "yaml-typed"])
def test_normaliser_is_picklable(spec: PipelineSpec) -> None:
    normaliser = Normaliser(spec, FakeClock(START))
    clone = pickle.loads(pickle.dumps(normaliser))
    batch = jsonl_batch([line()]) if spec is EVENTS_SPEC else fraud_parquet_batch()
    assert run(clone, batch).events == run(normaliser, batch).events
