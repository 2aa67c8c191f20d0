"""Hostile values are dead letters, never state: far-off timestamps, NaN and infinite or
overflowing numbers, blank and over-long keys (pipelines.normalise, payloads, timestamps).

No Ray, no files: batches are built in memory, now comes from a FakeClock.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipelines.errors import ConfigError
from pipelines.normalise import Normaliser
from pipelines.pipeline import load_pipeline
from pipelines.sources import CsvSource, JsonLinesSource, RawBatch, iter_batches
from pipelines.spec import LimitsSpec, SourceSpec
from pipelines.testing import FakeClock
from pipelines.timestamps import MAX_TIME, MIN_TIME, parse_duration
from tests.support import (
    EVENTS_SPEC,
    FRAUD_SPEC,
    START,
    derived_id,
    fraud_csv_batch,
    fraud_parquet_batch,
    line,
    normalise_lines,
    reasons,
    run,
    with_changes,
)

UTC = dt.UTC


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------
# durations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("20m", 1200), ("1h", 3600), ("7d", 7 * 86400), ("1d12h", 129600),
    ("12h1d", 129600), ("1w", 604800), ("1.5h", 5400), ("90", 90), (" 2.5 ", 2.5), ("0s", 0),
    (45, 45), (0.25, 0.25), (dt.timedelta(minutes=3), 180), ("1H", 3600),
])
def test_parse_duration_reads_units_and_plain_seconds(text: Any, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "abc", "20", "-5s", "1y", "1d 12h", "h", "5 m",
                                 "1e3", -1, float("nan"), float("inf"), True, None, "999999d"])
def test_parse_duration_refuses_anything_else_naming_the_field(bad: Any) -> None:
    if bad == "20":
        assert parse_duration(bad) == dt.timedelta(seconds=20)  # plain seconds are fine
        return
    with pytest.raises(ValueError, match="source.max_future"):
        parse_duration(bad, "source.max_future")


def test_spec_defaults_and_a_bad_max_future_names_the_field(tmp_path: Path) -> None:
    assert SourceSpec(format="csv", path=["x"]).max_future == dt.timedelta(days=1)
    assert SourceSpec(format="csv", path=["x"], max_future="20m").max_future == dt.timedelta(
        minutes=20)
    assert LimitsSpec().max_key_length == 256
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\nsource: {format: jsonl, path: [x], max_future: soon}\n"
                      "mapping: {event_type: t, timestamp: ts}\n")
    with pytest.raises(ConfigError, match=r"source\.max_future.*'soon' is not a duration"):
        load_pipeline(config)


def test_spec_with_a_duration_round_trips_through_json() -> None:
    spec = with_changes(EVENTS_SPEC, source={**EVENTS_SPEC.source.model_dump(),
                                             "max_future": "1d12h"})
    again = type(spec).model_validate_json(spec.model_dump_json(by_alias=True))
    assert again.source.max_future == dt.timedelta(hours=36) == spec.source.max_future


# ------------------------------------------------------------------------------------------
# timestamps: the plausible range
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestamp", [
    "9999-12-31T23:59:59Z", "2100-01-01T00:00:00Z", "2262-04-11T00:00:00Z",
    "2263-01-01T00:00:00Z", iso(START + dt.timedelta(days=1, seconds=1)), 1e300, -1e300,
    "1e300", 9e15, "1500-01-01T00:00:00Z", "1677-01-01T00:00:00Z",
], ids=["year-9999", "year-2100", "2262", "2263", "just-past-max-future", "epoch-1e300",
        "epoch-minus-1e300", "epoch-text-1e300", "epoch-9e15-ns-as-us", "year-1500",
        "year-1677"])
def test_far_off_timestamps_are_out_of_range(timestamp: Any) -> None:
    out = normalise_lines([line(timestamp=timestamp)])
    assert out.events.num_rows == 0
    assert reasons(out) == ["timestamp_out_of_range"]


@pytest.mark.parametrize("timestamp", [
    "1970-01-01T00:00:00Z", 0, "1678-01-01T00:00:00Z", iso(START + dt.timedelta(hours=23)),
    iso(START + dt.timedelta(days=1)),
], ids=["1970", "epoch-0", "1678", "23h-ahead", "exactly-max-future"])
def test_the_distant_past_and_the_near_future_are_events(timestamp: Any) -> None:
    out = normalise_lines([line(timestamp=timestamp)])
    assert out.deadletters.num_rows == 0 and out.events.num_rows == 1


def test_max_future_is_configurable_and_follows_the_injected_clock() -> None:
    spec = with_changes(EVENTS_SPEC, source={**EVENTS_SPEC.source.model_dump(),
                                             "max_future": "20m"})
    clock = FakeClock(START)
    normaliser = Normaliser(spec, clock)
    in_30m = line(timestamp=iso(START + dt.timedelta(minutes=30)))
    batch = RawBatch("events", "p", np.arange(2), pa.record_batch(
        {"line": pa.array([line(timestamp=iso(START + dt.timedelta(minutes=10))), in_30m])}))
    out = run(normaliser, batch)
    assert reasons(out) == ["timestamp_out_of_range"]
    (message,) = out.deadletters.column("message").to_pylist()
    assert "source.max_future" in message and "0:20:00" in message
    clock.advance(15 * 60)  # now the 30-minutes-ahead event is 15 minutes ahead
    assert run(normaliser, batch).deadletters.num_rows == 0


def test_representable_bounds_are_what_int64_nanoseconds_hold() -> None:
    assert MIN_TIME.year == 1677 and (MAX_TIME.year, MAX_TIME.month, MAX_TIME.day) == (2262, 4, 11)
    spec = with_changes(EVENTS_SPEC, source={**EVENTS_SPEC.source.model_dump(),
                                             "max_future": "100000d"})
    out = normalise_lines([line(eventId="max", timestamp=iso(MAX_TIME)),
                           line(eventId="min", timestamp=iso(MIN_TIME)),
                           line(eventId="past", timestamp=iso(MAX_TIME + dt.timedelta(seconds=1)))],
                          spec=spec)
    assert out.events.column("timestamp").to_pylist() == [MAX_TIME, MIN_TIME]
    assert reasons(out) == ["timestamp_out_of_range"]
    assert "1677..2262" in out.deadletters.column("message")[0].as_py()


def test_far_off_typed_timestamp_columns_are_out_of_range() -> None:
    batch = fraud_csv_batch({"TX_DATETIME": ["2018-04-01 00:00:31", "9999-01-01 00:00:00"]})
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)), batch)
    assert reasons(out) == ["timestamp_out_of_range"]
    assert out.events.num_rows == 1


# ------------------------------------------------------------------------------------------
# numbers: finite and in range
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e999"])
def test_non_finite_float_fields_are_bad_fields(amount: str) -> None:
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)), fraud_csv_batch({"TX_AMOUNT": ["1.5", amount]}))
    (dead,) = out.deadletters.to_pylist()
    assert (dead["reason"], dead["offset"]) == ("bad_field", 1)
    assert "TX_AMOUNT" in dead["message"] and "finite" in dead["message"]
    assert out.events.column("data").to_pylist()[0]["TX_AMOUNT"] == 1.5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_in_typed_parquet_columns_are_bad_fields(value: float) -> None:
    batch = fraud_parquet_batch()
    amounts = pa.array([57.16, value])
    records = batch.records.set_column(batch.records.schema.get_field_index("TX_AMOUNT"),
                                       "TX_AMOUNT", amounts)
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              RawBatch(batch.source, batch.part, batch.offsets, records))
    assert reasons(out) == ["bad_field"]
    assert "TX_AMOUNT" in out.deadletters.column("message")[0].as_py()


def test_non_finite_json_numbers_are_bad_fields() -> None:
    spec = with_changes(EVENTS_SPEC, event_types={
        "user.login": {"key": "correlation_id", "payload": {"amount": "float"}}})
    out = normalise_lines([
        line(eventId="ok", data={"amount": 2.5}),
        b'{"eventId": "n", "eventType": "user.login", "timestamp": "2024-05-01T10:00:00Z",'
        b' "correlationId": "c", "data": {"amount": NaN}}',
        line(eventId="big", data={"amount": "1e999"}),
        line(eventId="inf", data={"amount": "-Infinity"}),
    ], spec=spec)
    assert out.events.column("event_id").to_pylist() == ["ok"]
    assert set(reasons(out)) <= {"bad_field", "bad_json"} and len(reasons(out)) == 3
    assert reasons(out)[1:] == ["bad_field", "bad_field"]


@pytest.mark.parametrize("value", ["9223372036854775808", "-9223372036854775809",
                                   "1e19", "99999999999999999999999"])
def test_integers_overflowing_int64_are_bad_fields(value: str) -> None:
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              fraud_csv_batch({"TERMINAL_ID": ["1", value]}))
    assert reasons(out) == ["bad_field"]
    assert "TERMINAL_ID" in out.deadletters.column("message")[0].as_py()


def test_large_integers_are_exact_not_rounded_through_a_float() -> None:
    big = [2**53 + 1, 2**63 - 1]
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              fraud_csv_batch({"TRANSACTION_ID": [str(v) for v in big]}))
    assert out.deadletters.num_rows == 0
    assert [d["TRANSACTION_ID"] for d in out.events.column("data").to_pylist()] == big
    batch = fraud_parquet_batch()
    column = batch.records.schema.get_field_index("TRANSACTION_ID")
    records = batch.records.set_column(column, "TRANSACTION_ID", pa.array(big, pa.int64()))
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              RawBatch(batch.source, batch.part, batch.offsets, records))
    assert [d["TRANSACTION_ID"] for d in out.events.column("data").to_pylist()] == big


def test_unsigned_integers_past_int64_are_bad_fields() -> None:
    batch = fraud_parquet_batch()
    column = batch.records.schema.get_field_index("TERMINAL_ID")
    records = batch.records.set_column(column, "TERMINAL_ID", pa.array([7, 2**64 - 1], pa.uint64()))
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              RawBatch(batch.source, batch.part, batch.offsets, records))
    assert reasons(out) == ["bad_field"]
    assert out.events.column("data").to_pylist()[0]["TERMINAL_ID"] == 7


# ------------------------------------------------------------------------------------------
# keys and correlation ids
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "], ids=["null", "empty", "blank"])
def test_a_missing_key_field_is_a_dead_letter_naming_it(value: str | None) -> None:
    out = run(Normaliser(FRAUD_SPEC, FakeClock(START)),
              fraud_csv_batch({"CUSTOMER_ID": ["596", value]}))
    (dead,) = out.deadletters.to_pylist()
    assert dead["reason"] == "missing_field" and "CUSTOMER_ID is missing" in dead["message"]
    assert out.events.column("key").to_pylist() == ["596"]


def test_blank_optional_fields_are_null_not_bad() -> None:
    spec = with_changes(EVENTS_SPEC, event_types={
        "user.login": {"key": "correlation_id", "payload": {"n": "int?", "note": "str"}}})
    out = normalise_lines([line(eventId="a", data={"n": "", "note": ""}),
                           line(eventId="b", data={"n": " 3 ", "note": "x"})], spec=spec)
    assert out.deadletters.num_rows == 0
    assert [(d["n"], d["note"]) for d in out.events.column("data").to_pylist()] == [
        (None, ""), (3, "x")]


def test_keys_and_correlation_ids_over_the_limit_are_bad_fields() -> None:
    limit = 256
    typed_key = with_changes(EVENTS_SPEC, event_types={
        "user.login": {"key": "user", "payload": {"user": "str"}}})
    out = normalise_lines([
        line(eventId="ok", correlationId="c" * limit),
        line(eventId="long-corr", correlationId="c" * (limit + 1)),
        line(eventId="long-key", eventType="order.placed", correlationId="k" * 1000),
    ])
    assert out.events.column("event_id").to_pylist() == ["ok"]
    assert reasons(out) == ["bad_field", "bad_field"]
    for message in out.deadletters.column("message").to_pylist():
        assert "limits.max_key_length" in message
    out = normalise_lines([line(eventId="u", data={"user": "é" * (limit + 1)})], spec=typed_key)
    assert reasons(out) == ["bad_field"]
    assert "partition key user" in out.deadletters.column("message")[0].as_py()


def test_max_key_length_is_configurable() -> None:
    spec = with_changes(EVENTS_SPEC, limits={"max_key_length": 4})
    out = normalise_lines([line(eventId="a", correlationId="abcd"),
                           line(eventId="b", correlationId="abcde")], spec=spec)
    assert out.events.column("event_id").to_pylist() == ["a"]
    assert reasons(out) == ["bad_field"]


# ------------------------------------------------------------------------------------------
# lines the sources could not read whole
# ------------------------------------------------------------------------------------------


def test_an_over_long_jsonl_line_is_payload_too_large_with_its_raw_cut_to_the_limit(
    tmp_path: Path,
) -> None:
    limit = 512
    spec = with_changes(EVENTS_SPEC, limits={"max_payload_bytes": limit})
    giant = line(eventId="giant", data={"blob": "x" * (6 * limit)})
    (tmp_path / "e.jsonl").write_bytes(line(eventId="a") + b"\n" + giant)  # no final newline
    source = JsonLinesSource("events", [tmp_path], max_line_bytes=limit, _chunk_size=64)
    outs = [run(Normaliser(spec, FakeClock(START)), raw) for raw in iter_batches(source)]
    events = [e for out in outs for e in out.events.column("event_id").to_pylist()]
    (dead,) = [d for out in outs for d in out.deadletters.to_pylist()]
    assert events == ["a"]
    assert (dead["reason"], dead["offset"], dead["raw"]) == ("payload_too_large", 1, giant[:limit])
    assert "limits.max_payload_bytes" in dead["message"]


def test_malformed_csv_rows_are_dead_letters_with_their_raw_line(tmp_path: Path) -> None:
    header = ",".join(FRAUD_ROWS_CSV[0]).encode()
    good = [",".join(row).encode() for row in FRAUD_ROWS_CSV[1:]]
    hostile = [b"1,2,3", b'9,2018-04-01 00:00:31,"596,3156,57.16,31,0,0,0', b"\xff,\xfe"]
    lines = [header, good[0], hostile[0], b"", hostile[1], good[1], hostile[2]]
    (tmp_path / "tx.csv").write_bytes(b"\n".join(lines) + b"\n")
    normaliser = Normaliser(FRAUD_SPEC, FakeClock(START))
    (out,) = [run(normaliser, raw) for raw in iter_batches(CsvSource("tx", [tmp_path]))]
    dead = out.deadletters.to_pylist()
    assert [(d["offset"], d["reason"], d["raw"]) for d in dead] == [
        (1, "malformed_row", hostile[0]), (2, "malformed_row", hostile[1]),
        (4, "bad_encoding", hostile[2])]
    assert "expected 9 columns, got 3" in dead[0]["message"]
    assert [d["TRANSACTION_ID"] for d in out.events.column("data").to_pylist()] == [0, 1]
    assert out.events.column("event_id").to_pylist() == [
        derived_id(0, source="tx", part="tx.csv"), derived_id(3, source="tx", part="tx.csv")]


FRAUD_ROWS_CSV = [
    ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT",
     "TX_TIME_SECONDS", "TX_TIME_DAYS", "TX_FRAUD", "TX_FRAUD_SCENARIO"],
    ["0", "2018-04-01 00:00:31", "596", "3156", "57.16", "31", "0", "0", "0"],
    ["1", "2018-04-01 00:02:10", "4961", "3412", "81.51", "130", "0", "1", "1"],
]


def test_a_derived_correlation_id_is_not_held_to_a_short_key_limit() -> None:
    spec = with_changes(EVENTS_SPEC, limits={"max_key_length": 8},
                        event_types={"user.login": {"key": "source"}})
    out = normalise_lines([line(eventId=..., correlationId=...)], spec=spec)
    assert out.deadletters.num_rows == 0 and len(out.events.column("correlation_id")[0].as_py()) == 36
