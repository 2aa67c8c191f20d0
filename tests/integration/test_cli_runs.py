"""`eventray run` end to end, as a user runs it: a subprocess with an embedded local Ray."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.seed_events import (
    NON_VERSIONS,
    jsonl,
    seed_events,
    seed_file_with_malformed,
    stored_version,
)
from tests.support import ROOT, eventray, scan, summary_of, unscored_fraud_config


def seed_event(i: int, event_type: str = "user.login", **extra: object) -> str:
    event = {"eventId": f"evt-{i}", "eventType": event_type,
             "timestamp": f"2024-05-01T10:{i % 60:02d}:00Z", "source": "web",
             "correlationId": f"corr-{i % 7}", "data": {"n": i},
             "metadata": {"version": "1.0", "region": "us-east"}}
    event.update(extra)
    return json.dumps(event)


MALFORMED = [
    b'{"eventId": "broken", "eventType": ',
    b'{"eventId": "no-type", "timestamp": "2024-05-01T10:00:00Z", "correlationId": "c"}',
    b'{"eventId": "bad-ts", "eventType": "user.login", "timestamp": "soon", "correlationId": "c"}',
    b'{"eventId": "escape", "eventType": "../../x", "timestamp": "2024-05-01T10:00:00Z",'
    b' "correlationId": "c"}',
    b'{"eventId": "abs", "eventType": "/etc/passwd", "timestamp": "2024-05-01T10:00:00Z",'
    b' "correlationId": "c"}',
    b"\xff\xfe not utf-8",
    b"[1, 2, 3]",
]


def test_events_config_stores_valid_and_dead_letters_malformed(tmp_path: Path) -> None:
    lines = [seed_event(i).encode() for i in range(200)]
    for k, bad in enumerate(MALFORMED):
        lines.insert(7 + 23 * k, bad)
    source = tmp_path / "in" / "events.jsonl"
    source.parent.mkdir()
    source.write_bytes(b"\n".join(lines) + b"\n")
    store = tmp_path / "store"

    summary = summary_of(eventray("run", "configs/events.yaml", "--input", str(source),
                                  "--store", str(store)))

    assert summary["events_in"] == 207
    assert (summary["stored"], summary["dead_lettered"]) == (200, 7)
    events = scan(store, "events")
    assert events.height == 200
    assert sorted(events["event_id"]) == sorted(f"evt-{i}" for i in range(200))
    dead = scan(store, "deadletter")
    assert sorted(dead["raw"].to_list()) == sorted(MALFORMED)
    assert dead["reason"].null_count() == 0 and dead["message"].str.len_chars().min() > 0
    assert set(dead["event_type"]) <= {"_invalid", "user.login"}
    # Nothing outside the store: the tmp dir holds only the input and the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]
    for path in store.rglob("*"):
        assert path.resolve().is_relative_to(store.resolve())


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` (the git directory aside) with its size and modification time."""
    found = {}
    for path in root.rglob("*"):
        if ".git" not in path.relative_to(root).parts and not path.is_dir():
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_seed_example_events_with_version_1_0_are_stored_and_nothing_is_written_elsewhere(
        tmp_path: Path) -> None:
    """The seed's example shape, "version": "1.0", 5,000 times with 500 malformed lines."""
    source = tmp_path / "in" / "seed-events.jsonl"
    source.parent.mkdir()
    source.write_bytes(seed_file_with_malformed(5_000, MALFORMED, every=10))
    store = tmp_path / "store"
    # A private temporary directory: the embedded Ray's files must go and leave nothing.
    private_tmp = Path(tempfile.mkdtemp(prefix="er-"))
    # Bytecode caches are the interpreter's, not the run's: keep them out of the comparison.
    env = {"TMPDIR": str(private_tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    repo_before = files_under(ROOT)
    try:
        summary = summary_of(eventray("run", "configs/events.yaml", "--input", str(source),
                                      "--store", str(store), env=env))
        leftovers = sorted(p.name for p in private_tmp.iterdir())
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)

    assert (summary["events_in"], summary["stored"], summary["dead_lettered"]) == (5_500, 5_000, 500)
    assert summary["ray"] == "embedded" and "bad_version" not in summary["reasons"]
    events = scan(store, "events")
    assert events.height == events["event_id"].n_unique() == 5_000
    assert set(events["metadata"].struct.field("version")) == {"1.0"}
    assert set(events["metadata"].struct.field("region")) == {"us-east"}
    assert scan(store, "deadletter").height == 500
    # Nothing written outside the store: not in the repository (the run's working
    # directory), not beside the input, not in the temporary directory.
    assert files_under(ROOT) == repo_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]
    assert [p.name for p in source.parent.iterdir()] == [source.name]
    assert leftovers == []


@settings(max_examples=2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(seed_events(), min_size=20, max_size=60, unique_by=lambda e: e["eventId"]),
       st.lists(seed_events(NON_VERSIONS), min_size=1, max_size=20,
                unique_by=lambda e: e["eventId"]),
       st.randoms(use_true_random=False))
def test_seed_events_with_any_version_form_through_the_cli_on_ray(
        valid: list[dict[str, Any]], bad: list[dict[str, Any]], random: Any) -> None:
    """The in-process property of tests/unit/test_version_properties.py, on Ray."""
    events = valid + bad
    random.shuffle(events)
    with tempfile.TemporaryDirectory(prefix="eventray-cli-versions-") as tmp:
        source, store = Path(tmp) / "events.jsonl", Path(tmp) / "store"
        source.write_bytes(jsonl(events))
        summary = summary_of(eventray("run", "configs/events.yaml", "--input", str(source),
                                      "--store", str(store)))
        assert summary["ray"] == "embedded"
        assert (summary["stored"], summary["dead_lettered"]) == (len(valid), len(bad))
        assert summary["reasons"] == {"bad_version": len(bad)}
        stored = scan(store, "events").select(
            "event_id", version=pl.col("metadata").struct.field("version"))
        assert dict(stored.iter_rows()) == {
            e["eventId"]: stored_version(e["metadata"]["version"]) for e in valid}


def test_fraud_config_on_simulator_output(tmp_path: Path) -> None:
    sim = summary_of(eventray("simulate", "--out", str(tmp_path / "sim"), "--days", "20",
                              "--customers", "800", "--terminals", "1500", "--seed", "3"))
    store = tmp_path / "store"
    summary = summary_of(eventray("run", str(unscored_fraud_config(tmp_path)), "--input",
                                  str(tmp_path / "sim"), "--store", str(store), "--partitions", "3"))
    # every transaction, and its label event (fraud.reported, 7 days later)
    assert summary["events_in"] == summary["derived"] == sim["transactions"] > 10_000
    assert summary["stored"] == 2 * sim["transactions"]
    stored = scan(store, "events")
    events = stored.filter(pl.col("event_type") == "transaction.created")
    labels = stored.filter(pl.col("event_type") == "fraud.reported")
    assert labels["data"].struct.field("TRANSACTION_ID").sort().equals(
        events["data"].struct.field("TRANSACTION_ID").sort())
    ids = events["data"].struct.field("TRANSACTION_ID")
    assert ids.n_unique() == events.height == sim["transactions"]
    assert events.schema["data"].to_schema()["TX_AMOUNT"] == pl.Float64
    assert events["key"].cast(pl.Int64).equals(
        events["data"].struct.field("CUSTOMER_ID"), check_names=False)


def test_demo_from_a_fresh_directory_simulates_then_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    summary = summary_of(eventray("run", "configs/fraud.yaml", "--store", "demo-store",
                                  cwd=tmp_path))
    assert (tmp_path / "data" / "simulated").is_dir()
    assert summary["stored"] == summary["events_in"] + summary["derived"] > 200_000
    assert scan(tmp_path / "demo-store", "events").height == summary["stored"]
    assert scan(tmp_path / "demo-store", "scores").height == summary["events_in"]


def test_rerunning_the_same_input_rewrites_instead_of_doubling(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(seed_event(i) for i in range(50)) + "\n")
    store = tmp_path / "store"
    for _ in range(2):
        summary_of(eventray("run", "configs/events.yaml", "--input", str(source),
                            "--store", str(store), "--in-process"))
    assert scan(store, "events").height == 50


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "usage: eventray"),
        (["run"], "the following arguments are required: config"),
        (["run", "configs/nope.yaml"], "cannot read config"),
        (["run", "configs/events.yaml", "--partitions", "0"], "0 is not >= 1"),
        (["frobnicate"], "invalid choice"),
        # a mistyped store is refused, never read as an empty one
        (["actions", "retry", "--store", "no-such-store"], "no-such-store is not a store directory"),
        (["mine", "--store", "no-such-store", "--patterns", "configs/patterns/fraud.yaml",
          "--out", "mined"], "no-such-store is not a store directory"),
        (["compact", "--store", "no-such-store"], "no-such-store is not a store directory"),
        (["serve", "configs/live.yaml", "--port", "http"], "invalid int value"),
        (["report", "--store", "no-such-store", "--day", "2018-13-45"], "is not a date"),
    ],
)
def test_bad_arguments_print_usage_not_a_traceback(args: list[str], expected: str) -> None:
    result = eventray(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs" / "events.yaml").read_text().replace(
        "batch_size: 10000", "batch_size: -5"))
    result = eventray("run", str(config), "--in-process")
    assert result.returncode == 2
    assert "source.batch_size" in result.stderr
    assert "Traceback" not in result.stderr
