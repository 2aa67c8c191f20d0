"""Property tests of ingestion: JSON Lines files mixing valid and malformed events, whole runs.

Each example writes a seed-schema JSON Lines file into a fresh temporary directory, runs the
whole pipeline in process (``cluster.driver.run_pipeline`` with ``LocalPartitions``, no Ray)
into a store next to it, and checks DESIGN.md's invariants: nothing lost, nothing doubled,
every malformed line dead-lettered once with its raw bytes and a reason, nothing written
outside the store, and the store's layout.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import re
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.driver import run_pipeline
from cluster.partitions import LocalPartitions
from pipelines.envelope import EVENT_TYPE_PATTERN, INVALID_EVENT_TYPE
from pipelines.event_ids import EVENTRAY_NAMESPACE
from pipelines.pipeline import load_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore, safe_partition_value
from tests.seed_events import ACCEPTED_VERSIONS, NON_VERSIONS, stored_version

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LIMIT = 4096
# Valid moments reach 2200: source.max_future (against the wall clock) is widened past them;
# its own rule is tested with an injected clock in test_hostile_values.
BASE_SPEC = load_pipeline(CONFIGS / "events.yaml", {"limits": {"max_payload_bytes": LIMIT},
                                                   "source": {"max_future": "100000d",
                                                              "duplicates": "dead-letter"}})
SOURCE = BASE_SPEC.source.source_name
INPUT = "input.jsonl"
PIPELINE_RUNS = settings(
    max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
STORE_WRITES = settings(max_examples=100, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow])
#: The documented rule for a partition directory value (store.safe_partition_value).
SAFE_DIR = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,127}")
DATE_DIR = re.compile(r"date=(\d{4}-\d{2}-\d{2})")
#: Where a run keeps its checkpoints, beside the tables (pipelines.checkpoint).
CHECKPOINTS = "_checkpoints"
COMMIT_DIR = "_commits"

# ------------------------------------------------------------------------------------------
# the model of a file: what each line is and what must become of it
# ------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of the generated file and its expected fate."""

    raw: bytes
    kind: str  # "event", "bad" or "blank"
    reason: str | None = None
    expected: dict[str, Any] = field(default_factory=dict)  # envelope fields of a valid event


def safe_dir(value: str | None) -> str:
    if value is None or not SAFE_DIR.fullmatch(value) or ".." in value:
        return INVALID_EVENT_TYPE
    return value


def derived_id(line_no: int) -> str:
    return str(uuid.uuid5(EVENTRAY_NAMESPACE, f"{SOURCE}/{INPUT}#{line_no}"))


VALID_TYPES = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8}){0,2}", fullmatch=True)
SHORT_TEXT = st.text(max_size=10)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | SHORT_TEXT
PAYLOADS = st.dictionaries(st.text(max_size=8), JSON_SCALARS | st.lists(JSON_SCALARS, max_size=3),
                           max_size=4)
MOMENTS = st.datetimes(min_value=dt.datetime(1975, 1, 1), max_value=dt.datetime(2200, 1, 1))
TIME_FORMS = ("iso_z", "iso_offset", "naive_t", "naive_space", "date",
              "epoch_s", "epoch_ms", "epoch_s_text", "epoch_ms_text")

PATH_LIKE_TYPES = ["../../x", "/etc/passwd", "a/b", "..", ".hidden", "../events", "a/../../b",
                   "user.login/../../..", "A.B", "User.Login", "a..b", "a.", "a b", "a\\b", "é.x",
                   "x" * 129, "user.login\n", "C:\\x", "~/x", "%2e%2e/x", "event_type=x", "._", "-a"]
BAD_TIMESTAMPS = ["yesterday", "2024-13-45T00:00:00Z", "2024-02-30", "10:00:00", "", "  ",
                  "2024/05/01", "NaN", "1e400", "May 1 2024", "2024-05-01T25:00:00Z", "-inf",
                  "0x10", "2024-05-01T10:00:00+25:00", "2024-W18", "T"]
FAR_TIMESTAMPS = ["2263-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1500-01-01", 1e300, "-1e300"]
BROKEN_JSON = [b"{", b"}", b"{'eventType': 'a.b'}", b"not json", b'{"eventType": "a.b",}',
               b'{"a": 1} x', b'{"a": NaN}', b"NaN", b'{"a": 1}{"b": 2}', b'{"a" 1}', b"{]"]
NOT_OBJECTS = [b"[1, 2]", b"42", b'"user.login"', b"true", b"[]", b"  [ ]", b"-1.5e3"]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
                b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]
BLANKS = [b"", b" ", b"\t", b"  \t ", b"\x0b\x0c "]
WHITESPACE = b" \t\n\x0b\x0c\r"


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[Any, dt.datetime]:
    """A timestamp in one of the accepted forms, and the UTC instant it must become."""
    moment = draw(MOMENTS)
    utc = moment.replace(tzinfo=dt.UTC)
    form = draw(st.sampled_from(TIME_FORMS))
    seconds = calendar.timegm(moment.timetuple())
    if form == "iso_z":
        return moment.isoformat() + "Z", utc
    if form == "iso_offset":
        offset = dt.timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60)))
        return (utc + offset).replace(tzinfo=dt.timezone(offset)).isoformat(), utc
    if form == "naive_t":
        return moment.isoformat(), utc
    if form == "naive_space":
        return moment.isoformat(sep=" "), utc
    if form == "date":
        return moment.date().isoformat(), dt.datetime.combine(moment.date(), dt.time(), dt.UTC)
    millis = seconds * 1000 + moment.microsecond // 1000
    value, instant = (
        (seconds, utc.replace(microsecond=0)) if form.startswith("epoch_s")
        else (millis, utc.replace(microsecond=moment.microsecond // 1000 * 1000)))
    return (str(value) if form.endswith("_text") else value), instant


@st.composite
def valid_events(draw: st.DrawFn, event_id: str | None) -> tuple[dict[str, Any], dt.datetime]:
    """A valid seed-schema event and its UTC instant; ``event_id`` None leaves the id out."""
    stamp, instant = draw(timestamps())
    event: dict[str, Any] = {"eventType": draw(VALID_TYPES), "timestamp": stamp}
    if event_id is not None:
        event["eventId"] = event_id
    if draw(st.booleans()):
        event["source"] = draw(st.none() | SHORT_TEXT)
    if draw(st.booleans()):
        event["correlationId"] = draw(st.text(min_size=1, max_size=10))
    if draw(st.booleans()):
        event["data"] = draw(PAYLOADS)
    if draw(st.booleans()):
        event["metadata"] = {"version": draw(ACCEPTED_VERSIONS), "region": draw(SHORT_TEXT)}
    return event, instant


def encode(event: dict[str, Any], ascii_only: bool) -> bytes:
    return json.dumps(event, ensure_ascii=ascii_only).encode()


def expected_envelope(event: dict[str, Any], line_no: int) -> dict[str, Any]:
    event_id = event.get("eventId", derived_id(line_no))
    correlation = event.get("correlationId", event_id)
    return {
        "event_id": event_id,
        "event_type": event["eventType"],
        "source": event.get("source") if event.get("source") is not None else SOURCE,
        "correlation_id": correlation,
        "key": correlation,
        "data": event.get("data"),
        "version": stored_version(event["metadata"]["version"]) if "metadata" in event else "1",
    }


@st.composite
def valid_lines(draw: st.DrawFn, line_no: int, event_id: str | None) -> Line:
    event, instant = draw(valid_events(event_id))
    raw = encode(event, draw(st.booleans()))
    if len(raw) > LIMIT:  # keep valid events under the size limit
        event.pop("data")
        raw = encode(event, True)
    expected = expected_envelope(event, line_no)
    expected["timestamp"] = instant
    return Line(raw, "event", expected=expected)


@st.composite
def bad_lines(draw: st.DrawFn, line_no: int) -> Line:
    """A malformed line with exactly one defect, and the reason it must be rejected with."""
    base, _ = draw(valid_events(f"bad-{line_no}"))
    base.pop("data", None)
    kind = draw(st.sampled_from([
        "truncated", "broken", "not_object", "no_type", "null_type", "numeric_type", "list_type",
        "object_type", "path_type", "text_type", "no_time", "null_time", "bool_time",
        "object_time", "list_time", "bad_time", "far_time", "non_utf8", "binary", "huge", "bad_version",
        "empty_id", "long_id", "empty_key",
    ]))
    if kind == "truncated":
        whole = encode(base, True)
        return Line(whole[: draw(st.integers(1, len(whole) - 1))], "bad", "bad_json")
    if kind == "broken":
        return Line(draw(st.sampled_from(BROKEN_JSON)), "bad", "bad_json")
    if kind == "not_object":
        return Line(draw(st.sampled_from(NOT_OBJECTS)), "bad", "not_an_object")
    if kind == "non_utf8":
        whole = encode(base, True)
        at = draw(st.integers(0, len(whole)))
        return Line(whole[:at] + draw(st.sampled_from(INVALID_UTF8)) + whole[at:], "bad",
                    "bad_encoding")
    if kind == "binary":
        raw = draw(st.binary(min_size=1, max_size=30).filter(_is_binary_line))
        return Line(raw, "bad", "bad_encoding")
    if kind == "huge":
        base["data"] = {"blob": "x" * (LIMIT + draw(st.integers(0, 64)))}
        return Line(encode(base, True), "bad", "payload_too_large")
    changes: dict[str, tuple[Any, str]] = {
        "no_type": (..., "missing_event_type"),
        "null_type": (None, "missing_event_type"),
        "numeric_type": (draw(st.integers() | st.floats(allow_nan=False, allow_infinity=False)),
                         "bad_event_type"),
        "list_type": (draw(st.lists(VALID_TYPES, max_size=2)), "bad_event_type"),
        "object_type": ({"name": draw(VALID_TYPES)}, "bad_event_type"),
        "path_type": (draw(st.sampled_from(PATH_LIKE_TYPES)), "bad_event_type"),
        "text_type": (draw(st.text(min_size=1, max_size=12).filter(_not_a_type_name)),
                      "bad_event_type"),
        "no_time": (..., "missing_timestamp"),
        "null_time": (None, "missing_timestamp"),
        "bool_time": (draw(st.booleans()), "bad_timestamp"),
        "object_time": ({"at": "2024-05-01T10:00:00Z"}, "bad_timestamp"),
        "list_time": (["2024-05-01T10:00:00Z"], "bad_timestamp"),
        "bad_time": (draw(st.sampled_from(BAD_TIMESTAMPS)), "bad_timestamp"),
        "far_time": (draw(st.sampled_from(FAR_TIMESTAMPS)), "timestamp_out_of_range"),
        "bad_version": ({"version": draw(NON_VERSIONS)},
                        "bad_version"),
        "empty_id": ("", "bad_event_id"),
        "long_id": ("i" * 129, "bad_event_id"),
        "empty_key": ("", "missing_key"),
    }
    value, reason = changes[kind]
    name = {"type": "eventType", "time": "timestamp", "version": "metadata", "id": "eventId",
            "key": "correlationId"}[kind.rsplit("_", 1)[1]]
    if value is ...:
        base.pop(name)
    else:
        base[name] = value
    return Line(encode(base, draw(st.booleans())), "bad", reason)


def _is_binary_line(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return b"\n" not in raw and not raw.endswith(b"\r") and raw.strip(WHITESPACE) != b""
    return False


def _not_a_type_name(text: str) -> bool:
    return re.fullmatch(EVENT_TYPE_PATTERN.strip("^$"), text) is None and text != ""


@st.composite
def jsonl_files(draw: st.DrawFn) -> tuple[bytes, list[Line]]:
    """A JSON Lines file (bytes) and the model of its lines."""
    lines: list[Line] = []
    given_ids: list[tuple[str, int]] = []  # (event id, line) of stored events with a given id
    for line_no in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["event", "event", "event", "bad", "bad", "duplicate", "blank"]))
        if kind == "duplicate" and given_ids:
            event_id, first = draw(st.sampled_from(given_ids))
            repeat = draw(st.booleans())
            raw = lines[first].raw if repeat else draw(valid_lines(line_no, event_id)).raw
            lines.append(Line(raw, "bad", "duplicate_event_id"))
        elif kind == "bad":
            lines.append(draw(bad_lines(line_no)))
        elif kind == "blank":
            lines.append(Line(draw(st.sampled_from(BLANKS)), "blank"))
        else:
            event_id = draw(st.none() | st.text(max_size=20).map(lambda t, n=line_no: f"ok-{n}-{t}"))
            lines.append(draw(valid_lines(line_no, event_id)))
            if event_id is not None:
                given_ids.append((event_id, line_no))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    text = newline.join(line.raw for line in lines)
    if draw(st.booleans()):
        text += newline
    return text, lines


# ------------------------------------------------------------------------------------------
# the run and its checks
# ------------------------------------------------------------------------------------------


def run_file(root: Path, content: bytes, batch_size: int, partitions: int) -> dict[str, Any]:
    spec = PipelineSpec.model_validate(BASE_SPEC.model_dump(by_alias=True) | {
        "source": BASE_SPEC.source.model_dump() | {"batch_size": batch_size},
        "runtime": BASE_SPEC.runtime.model_dump() | {"partitions": partitions},
    })
    source = root / "in" / INPUT
    source.parent.mkdir()
    source.write_bytes(content)
    store = root / "store"
    return run_pipeline(spec, lambda prefix: LocalPartitions(partitions, store, prefix), store,
                        inputs=[str(source)], progress=False)


def read_table(store: EventStore, table: str) -> pl.DataFrame | None:
    return store.scan(table).collect() if store.files(table) else None


def check_events(store: EventStore, lines: list[Line]) -> None:
    expected = {line.expected["event_id"]: line.expected for line in lines if line.kind == "event"}
    frame = read_table(store, "events")
    if frame is None:
        assert not expected
        return
    ids = frame["event_id"].to_list()
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == set(expected)
    for row in frame.to_dicts():
        want = expected[row["event_id"]]
        for name in ("event_type", "timestamp", "source", "correlation_id", "key"):
            assert row[name] == want[name], (name, row, want)
        payload = row["data"]["json"]
        assert (None if payload is None else json.loads(payload)) == want["data"]
        assert row["metadata"]["version"] == want["version"]


def check_dead_letters(store: EventStore, lines: list[Line]) -> None:
    bad = {no: line for no, line in enumerate(lines) if line.kind == "bad"}
    frame = read_table(store, "deadletter")
    if frame is None:
        assert not bad
        return
    offsets = frame["offset"].to_list()
    assert len(offsets) == len(set(offsets)), "a line was dead-lettered twice"
    assert set(offsets) == set(bad)
    for row in frame.to_dicts():
        line = bad[row["offset"]]
        assert row["raw"] == line.raw[:LIMIT]  # over-long lines are cut to the limit
        assert row["reason"] == line.reason, (row["reason"], row["message"], line)
        assert row["message"]
        assert (row["source"], row["part"]) == (SOURCE, INPUT)


def check_files(root: Path, store_root: Path, normalised: bool = True) -> None:
    """Only the input and the store's data files exist, each where the layout says.

    ``normalised``: rows carry the directory's event type verbatim (as the pipeline writes
    them); otherwise rows may hold any value whose safe form is the directory's.
    """
    for path in root.rglob("*"):
        if path.is_dir():
            continue
        if path == root / "in" / INPUT:
            continue
        assert path.resolve().is_relative_to(store_root.resolve()), f"file outside the store: {path}"
        assert not path.name.endswith(".tmp"), f"temporary file left behind: {path}"
        parts = path.relative_to(store_root).parts
        if parts[0] in {CHECKPOINTS, COMMIT_DIR}:  # bookkeeping: checkpoints, the commit log
            continue
        assert len(parts) == 4, parts
        table, type_dir, date_dir, name = parts
        assert table in {"events", "deadletter"}
        assert type_dir.startswith("event_type=")
        value = type_dir.removeprefix("event_type=")
        assert safe_dir(value) == value and value not in {"", ".", ".."}
        match = DATE_DIR.fullmatch(date_dir)
        assert match and dt.date.fromisoformat(match.group(1))
        assert name.startswith("part-") and name.endswith(".parquet"), name
        rows = pq.read_table(path)
        types = set(rows.column("event_type").to_pylist())
        assert (types if normalised else {safe_dir(t) for t in types}) == {value}
        time_column = "ingested_at" if table == "deadletter" else "timestamp"
        dates = {t.date().isoformat() for t in rows.column(time_column).to_pylist()}
        assert dates == {match.group(1)}


@PIPELINE_RUNS
@given(jsonl_files(), st.integers(2, 10), st.integers(1, 3))
def test_a_run_stores_each_valid_event_once_and_dead_letters_each_bad_line(
    generated: tuple[bytes, list[Line]], batch_size: int, partitions: int
) -> None:
    content, lines = generated
    with tempfile.TemporaryDirectory(prefix="eventray-prop-") as tmp:
        root = Path(tmp)
        summary = run_file(root, content, batch_size, partitions)
        non_blank = [line for line in lines if line.kind != "blank"]
        bad = [line for line in lines if line.kind == "bad"]
        assert summary["events_in"] == summary["stored"] + summary["dead_lettered"] == len(non_blank)
        assert summary["dead_lettered"] == len(bad)
        assert summary["reasons"] == dict(sorted(Counter(line.reason for line in bad).items()))
        store = EventStore(root / "store")
        check_events(store, lines)
        check_dead_letters(store, lines)
        check_files(root, root / "store")


def test_the_example_file_runs_cleanly(tmp_path: Path) -> None:
    """The repository's own example file: a fixed, readable instance of the property."""
    content = (CONFIGS.parent / "examples" / "events.jsonl").read_bytes()
    summary = run_file(tmp_path, content, batch_size=5, partitions=2)
    assert summary["events_in"] == summary["stored"] + summary["dead_lettered"]
    # The seed's example shape, string versions included, is stored; one line sends "1..2".
    assert (summary["stored"], summary["dead_lettered"]) == (20, 5)
    assert summary["reasons"] == {"bad_event_type": 1, "bad_json": 1, "bad_timestamp": 1,
                                  "bad_version": 1, "missing_event_type": 1}
    assert summary["events_in"] == len([ln for ln in content.splitlines() if ln.strip()])
    store = EventStore(tmp_path / "store")
    dead = store.scan("deadletter").collect()
    lines = content.splitlines()
    assert all(lines[row["offset"]] == row["raw"] for row in dead.to_dicts())
    versions = store.scan("events").select(pl.col("metadata").struct.field("version")).collect()
    assert set(versions["version"]) == {"1.0", "1.2", "1"}
    check_files(tmp_path, tmp_path / "store")


# ------------------------------------------------------------------------------------------
# the store alone: no event type names a path outside the root
# ------------------------------------------------------------------------------------------

NASTY_TYPES = PATH_LIKE_TYPES + ["", ".", "/", "//", "\\..\\..", "..\\..", "a/./b", "\x00",
                                 "a\x00b", "ok.type", "user.login", "_invalid", "event_type=a",
                                 "con", "*", "?", "[a]", "a" * 128, "a" * 300]
STORE_TYPES = st.none() | st.text(max_size=40) | st.sampled_from(NASTY_TYPES) | VALID_TYPES
STORE_TIMES = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1))


@STORE_WRITES
@given(st.lists(st.tuples(STORE_TYPES, STORE_TIMES), min_size=1, max_size=12),
       st.sampled_from(["events", "deadletter"]))
def test_event_type_values_never_name_a_path_outside_the_store(
    rows: list[tuple[str | None, dt.datetime]], table: str
) -> None:
    types = [t for t, _ in rows]
    times = pa.array([m.replace(tzinfo=dt.UTC) for _, m in rows], pa.timestamp("us", "UTC"))
    time_column = "ingested_at" if table == "deadletter" else "timestamp"
    batch = pa.table({"event_type": pa.array(types, pa.string()), time_column: times,
                      "key": [str(i) for i in range(len(rows))]})
    with tempfile.TemporaryDirectory(prefix="eventray-store-") as tmp:
        root = Path(tmp) / "store"
        store = EventStore(root)
        written = store.write(table, batch, writer="w0", seq=0)
        for path in written:
            assert path.resolve().is_relative_to(root.resolve())
        check_files(Path(tmp), root, normalised=False)
        assert sorted(map(str, written)) == sorted(str(p) for p in root.rglob("*.parquet"))
        expected = Counter(safe_dir(t) for t in types)
        stored = Counter()
        for path in written:
            stored[path.parent.parent.name.removeprefix("event_type=")] += pq.read_metadata(path).num_rows
        assert stored == expected
        assert store.scan(table).select(pl.len()).collect().item() == len(rows)


def test_safe_partition_value_rejects_a_trailing_newline() -> None:
    assert safe_partition_value("user.login\n") == INVALID_EVENT_TYPE
