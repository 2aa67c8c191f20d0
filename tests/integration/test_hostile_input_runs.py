"""`eventray run` over files full of hostile rows, in process and on an embedded local Ray:
the run completes, every hostile row is a dead letter with its reason, every valid row is
stored, and the summary's counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support import eventray, scan, summary_of

RUNNERS = [pytest.param(["--in-process"], id="in-process"), pytest.param([], id="ray")]
HEADER = b"TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT"
CSV_CONFIG = {
    "name": "hostile-csv",
    "source": {"format": "csv", "name": "tx", "path": ["unused"], "batch_size": 7},
    "mapping": {"event_type": {"value": "transaction.created"}, "timestamp": "TX_DATETIME",
                "source": {"value": "card-network"}, "payload": {"columns": "all"}},
    "event_types": {"transaction.created": {"key": "CUSTOMER_ID", "payload": {
        "TRANSACTION_ID": "int", "TX_DATETIME": "datetime", "CUSTOMER_ID": "int",
        "TERMINAL_ID": "int", "TX_AMOUNT": "float"}}},
    "limits": {"max_key_length": 12},
    "runtime": {"partitions": 2},
}
#: (row without its TRANSACTION_ID, expected reason or None for a row that is stored)
CSV_ROWS: list[tuple[bytes, str | None]] = [
    (b"2018-04-01 00:00:31,596,3156,57.16", None),
    (b"2018-04-01 00:01:00,596,3156,nan", "bad_field"),
    (b"2018-04-01 00:01:00,596,3156,inf", "bad_field"),
    (b"2018-04-01 00:01:00,596,3156,-inf", "bad_field"),
    (b"2018-04-01 00:01:00,596,3156,1e400", "bad_field"),
    (b"1970-01-01 00:00:00,597,3156,10.0", None),  # the distant past: late, not hostile
    (b"2100-01-01 00:00:00,596,3156,10.0", "timestamp_out_of_range"),
    (b"9999-12-31 23:59:59,596,3156,10.0", "timestamp_out_of_range"),
    (b"2018-04-01 00:02:00,,3156,10.0", "missing_field"),
    (b"2018-04-01 00:02:00,1234567890123456,3156,10.0", "bad_field"),
    (b"2018-04-01 00:02:00,596,92233720368547758070,10.0", "bad_field"),
    (b"2018-04-01 00:03:00,596", "malformed_row"),
    (b"2018-04-01 00:03:00,596,3156,10.0,extra", "malformed_row"),
    (b'2018-04-01 00:03:00,"596,3156,10.0', "malformed_row"),
    (b"2018-04-01 00:03:00,5\xff6,3156,10.0", "bad_encoding"),
    (b"2018-04-02 00:00:00,598,3157,12.5", None),
]
ROW_FORMS = 5  # each hostile row appears after good rows, several times over


def csv_input(path: Path) -> dict[int, str | None]:
    """Write the CSV; return offset -> expected reason (None: stored)."""
    lines, expected, offset = [HEADER], {}, 0
    for copy in range(ROW_FORMS):
        for k, (row, reason) in enumerate(CSV_ROWS):
            lines.append(b"%d," % (1000 * copy + k) + row)
            expected[offset] = reason
            offset += 1
            if k % 4 == 0:
                lines.append(b"")  # empty lines are not rows
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return expected


def jsonl_event(i: int, timestamp: str = "2024-05-01T10:00:00Z", amount: object = 1.5,
                correlation: str | None = None) -> bytes:
    return json.dumps({"eventId": f"evt-{i}", "eventType": "payment.made", "timestamp": timestamp,
                       "correlationId": correlation if correlation is not None else f"c{i % 5}",
                       "data": {"amount": amount}}).encode()


JSONL_LIMIT = 4096


def jsonl_input(path: Path) -> tuple[dict[int, str | None], dict[int, str]]:
    """Write the JSON Lines file; return line -> expected reason and line -> event id."""
    rows: list[tuple[bytes, str | None]] = []
    for copy in range(ROW_FORMS):
        base = 100 * copy
        rows += [
            (jsonl_event(base), None),
            (jsonl_event(base + 1, amount="NaN"), "bad_field"),
            (jsonl_event(base + 2, amount="Infinity"), "bad_field"),
            (jsonl_event(base + 3, amount="-inf"), "bad_field"),
            (jsonl_event(base + 4, amount="1e999"), "bad_field"),
            (jsonl_event(base + 5, timestamp="1970-01-01T00:00:00Z"), None),
            (jsonl_event(base + 6, timestamp="2100-01-01T00:00:00Z"), "timestamp_out_of_range"),
            (jsonl_event(base + 7, timestamp="9999-12-31T23:59:59Z"), "timestamp_out_of_range"),
            (jsonl_event(base + 8, correlation=""), "missing_key"),
            (jsonl_event(base + 9, correlation="k" * 300), "bad_field"),
            (jsonl_event(base + 10)[:-5] + b"\xff\xfe}}", "bad_encoding"),
            (jsonl_event(base + 11, amount="x" * 2 * JSONL_LIMIT), "payload_too_large"),
            (jsonl_event(base + 12), None),
        ]
    giant = jsonl_event(999, amount="y" * 10 * JSONL_LIMIT)  # the last line, no newline
    rows.append((giant, "payload_too_large"))
    path.write_bytes(b"\n".join(raw for raw, _ in rows))
    ids = {i: json.loads(raw)["eventId"] for i, (raw, reason) in enumerate(rows) if reason is None}
    return {i: reason for i, (_, reason) in enumerate(rows)}, ids


def jsonl_config(directory: Path) -> Path:
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "events.yaml")
                            .read_text())
    config["limits"] = {"max_payload_bytes": JSONL_LIMIT}
    config["event_types"] = {"payment.made": {"key": "correlation_id",
                                              "payload": {"amount": "float"}}}
    path = directory / "events.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_run(summary: dict, store: Path, expected: dict[int, str | None]) -> None:
    dead = scan(store, "deadletter")
    hostile = {o: r for o, r in expected.items() if r is not None}
    assert dict(zip(dead["offset"].to_list(), dead["reason"].to_list(), strict=True)) == hostile
    assert summary["events_in"] == len(expected)
    assert summary["dead_lettered"] == len(hostile)
    assert summary["stored"] == len(expected) - len(hostile) == scan(store, "events").height
    assert summary["events_in"] == summary["stored"] + summary["dead_lettered"] + summary["filtered"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_csv_file_of_hostile_rows_runs_to_the_end(tmp_path: Path, runner: list[str]) -> None:
    expected = csv_input(tmp_path / "tx.csv")
    config = tmp_path / "csv.yaml"
    config.write_text(yaml.safe_dump(CSV_CONFIG))
    store = tmp_path / "store"
    summary = summary_of(eventray("run", str(config), "--input", str(tmp_path / "tx.csv"),
                                  "--store", str(store), *runner))
    check_run(summary, store, expected)
    dead = scan(store, "deadletter")
    malformed = dead.filter(dead["reason"].is_in(["malformed_row", "bad_encoding"]))
    assert malformed.height == 4 * ROW_FORMS
    assert all(raw.split(b",", 1)[1] in {r for r, _ in CSV_ROWS} for raw in malformed["raw"])
    stored = scan(store, "events")["data"].struct.field("TX_AMOUNT")
    assert stored.is_finite().all()


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_jsonl_file_of_hostile_lines_runs_to_the_end(tmp_path: Path, runner: list[str]) -> None:
    source = tmp_path / "in" / "events.jsonl"
    source.parent.mkdir()
    expected, ids = jsonl_input(source)
    store = tmp_path / "store"
    summary = summary_of(eventray("run", str(jsonl_config(tmp_path)), "--input", str(source),
                                  "--store", str(store), *runner))
    check_run(summary, store, expected)
    assert sorted(scan(store, "events")["event_id"]) == sorted(ids.values())
    dead = scan(store, "deadletter")
    assert dead["raw"].bin.size().max() <= JSONL_LIMIT  # over-long lines cut to the limit
