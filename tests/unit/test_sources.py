"""Unit tests for pipelines.sources: file sources yielding Arrow batches, with resume."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.sources import (
    MALFORMED_MESSAGE,
    MALFORMED_RAW,
    MALFORMED_REASON,
    CsvSource,
    JsonLinesSource,
    ParquetSource,
    RawBatch,
    Source,
    SourceError,
    iter_batches,
)

HANDBOOK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fraud-handbook"
HANDBOOK_ROWS = 1_466_282
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def write_parquet(path: Path, ids: range, row_group_size: int) -> None:
    table = pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array([f"r{i}" for i in ids])})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_csv(path: Path, ids: range, blank_every: int = 0) -> None:
    lines = ["id,label,note"]
    for i in ids:
        lines.append(f'{i:04d},"r,{i}",')
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def jsonl_reference(data: bytes) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line: the obvious per-line definition."""
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    rows = [(i, p[:-1] if p.endswith(b"\r") else p) for i, p in enumerate(pieces)]
    return [(i, line) for i, line in rows if line.strip()]


def read_all(source: Source, resume: dict[str, int] | None = None) -> list[RawBatch]:
    return list(iter_batches(source, resume))


MALFORMED = [MALFORMED_REASON, MALFORMED_MESSAGE, MALFORMED_RAW]


def data_of(records: pa.RecordBatch) -> pa.RecordBatch:
    """The data columns of a batch (without a CSV batch's malformed-row columns)."""
    return records.drop_columns([c for c in MALFORMED if c in records.schema.names])


def rows_of(batches: list[RawBatch]) -> list[tuple[str, int, tuple]]:
    """Flatten batches into (part, offset, row values) triples."""
    out: list[tuple[str, int, tuple]] = []
    for b in batches:
        values = zip(*(c.to_pylist() for c in data_of(b.records).columns), strict=True)
        out.extend(zip([b.part] * b.num_rows, b.offsets.tolist(), values, strict=True))
    return out


def same_batches(left: list[RawBatch], right: list[RawBatch]) -> bool:
    return len(left) == len(right) and all(
        a.source == b.source
        and a.part == b.part
        and np.array_equal(a.offsets, b.offsets)
        and a.records.equals(b.records)
        for a, b in zip(left, right, strict=True)
    )


def read_part(source: Source, part: str, start: int) -> list[RawBatch]:
    with source.open_part(part, start) as reader:
        return list(iter(reader.next_batch, None))


# ------------------------------------------------------------------------------------------
# shared fixtures: a few files of each kind, built once per module
# ------------------------------------------------------------------------------------------

JSONL_A = (
    b'{"a": 1}\r\n'
    b"\n"
    b"   \t \r\n"
    b'{"bad utf8": "\xff\xfe"}\n'
    + b'{"big": "'
    + b"x" * 300
    + b'"}\n'
    + b"not json at all\n"
    + b"\r\n"
    + b'  {"indented": true}  \n'
    + b'{"last": "no newline"}'
)
JSONL_B = b"".join(b'{"n": %d}\n' % i + (b"\n" if i % 5 == 0 else b"") for i in range(57))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    (root / "pq").mkdir()
    write_parquet(root / "pq" / "a.parquet", range(0, 53), row_group_size=7)
    write_parquet(root / "pq" / "b.parquet", range(53, 53 + 40), row_group_size=40)
    write_parquet(root / "pq" / "c.parquet", range(0), row_group_size=5)
    (root / "csv").mkdir()
    write_csv(root / "csv" / "a.csv", range(0, 45), blank_every=4)
    write_csv(root / "csv" / "b.csv", range(45, 70))
    (root / "csv" / "header-only.csv").write_text("id,label,note\n")
    (root / "jsonl").mkdir()
    (root / "jsonl" / "a.jsonl").write_bytes(JSONL_A)
    (root / "jsonl" / "b.jsonl").write_bytes(JSONL_B)
    (root / "jsonl" / "empty.jsonl").write_bytes(b"")
    return root


def make_source(kind: str, root: Path, batch_size: int) -> Source:
    if kind == "parquet":
        return ParquetSource("pq", [root / "pq"], batch_size=batch_size)
    if kind == "csv":
        return CsvSource("csv", [root / "csv"], batch_size=batch_size, _block_size=64)
    return JsonLinesSource("js", [root / "jsonl"], batch_size=batch_size, _chunk_size=16)


KINDS = ["parquet", "csv", "jsonl"]


def expected_rows(kind: str) -> list[tuple[str, int, tuple]]:
    if kind == "parquet":
        return [("a.parquet", i, (i, f"r{i}")) for i in range(53)] + [
            ("b.parquet", i - 53, (i, f"r{i}")) for i in range(53, 93)
        ]
    if kind == "csv":
        return [("a.csv", i, (f"{i:04d}", f"r,{i}", "")) for i in range(45)] + [
            ("b.csv", i - 45, (f"{i:04d}", f"r,{i}", "")) for i in range(45, 70)
        ]
    return [("a.jsonl", i, (line,)) for i, line in jsonl_reference(JSONL_A)] + [
        ("b.jsonl", i, (line,)) for i, line in jsonl_reference(JSONL_B)
    ]


# ------------------------------------------------------------------------------------------
# full reads
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [1, 6, 10_000])
def test_reads_everything_once_in_order(data_dir: Path, kind: str, batch_size: int) -> None:
    source = make_source(kind, data_dir, batch_size)
    batches = read_all(source)
    assert rows_of(batches) == expected_rows(kind)
    for part in source.list_parts():
        sizes = [b.num_rows for b in batches if b.part == part]
        assert all(size == batch_size for size in sizes[:-1])
        assert all(0 < size <= batch_size for size in sizes)
    for b in batches:
        assert b.source == source.name
        assert b.offsets.dtype == np.int64
        assert b.next_offset == b.offsets[-1] + 1


def test_parts_are_sorted_relative_ids(data_dir: Path) -> None:
    assert make_source("parquet", data_dir, 5).list_parts() == [
        "a.parquet",
        "b.parquet",
        "c.parquet",
    ]
    assert make_source("csv", data_dir, 5).list_parts() == ["a.csv", "b.csv", "header-only.csv"]
    assert make_source("jsonl", data_dir, 5).list_parts() == ["a.jsonl", "b.jsonl", "empty.jsonl"]


def test_csv_columns_are_raw_strings(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(
        b'\xef\xbb\xbfid,amount,flag,when\n007,1.50,NA,2018-04-01 00:00:00\n,"1,5",null,x\n'
    )
    (batch,) = read_all(CsvSource("c", [tmp_path / "t.csv"]))
    assert data_of(batch.records).schema == pa.schema(
        [(name, pa.string()) for name in ["id", "amount", "flag", "when"]]
    )
    assert batch.records.select(MALFORMED).to_pylist() == [dict.fromkeys(MALFORMED)] * 2
    assert data_of(batch.records).to_pylist() == [
        {"id": "007", "amount": "1.50", "flag": "NA", "when": "2018-04-01 00:00:00"},
        {"id": "", "amount": "1,5", "flag": "null", "when": "x"},
    ]


def test_csv_types_not_inferred_from_first_block(tmp_path: Path) -> None:
    ids = [str(i) for i in range(300)] + ["not-a-number"]
    (tmp_path / "t.csv").write_text("id\n" + "\n".join(ids) + "\n")
    source = CsvSource("c", [tmp_path], batch_size=1_000, _block_size=128)
    (batch,) = read_all(source)
    assert batch.records.column("id").to_pylist() == ids


# ------------------------------------------------------------------------------------------
# malformed CSV rows: rows of their own, never an exception
# ------------------------------------------------------------------------------------------

CSV_HOSTILE = [
    (b"1,2", "malformed_row", "expected 3 columns, got 2"),
    (b"1,2,3,4", "malformed_row", "expected 3 columns, got 4"),
    (b'5,"open,6', "malformed_row", ""),
    (b'5,6,"open', "malformed_row", "quot"),
    (b"7,\xff\xfe,8", "bad_encoding", "UTF-8"),
    (b"  ", "malformed_row", "expected 3 columns, got 1"),
]


def hostile_csv(path: Path, rows: int = 40) -> tuple[list[tuple[int, bytes, str, str]], int]:
    """A CSV with a hostile line after every fifth good one (and blank lines); returns
    (offset, raw, reason, message part) of each hostile line and the number of rows."""
    lines, hostile, offset = [b"a,b,c"], [], 0
    for i in range(rows):
        lines.append(b'%d,"x,%d",z' % (i, i))
        offset += 1
        if i % 5 == 4:
            raw, reason, words = CSV_HOSTILE[(i // 5) % len(CSV_HOSTILE)]
            lines += [raw, b""]
            hostile.append((offset, raw, reason, words))
            offset += 1
    path.write_bytes(b"\r\n".join(lines) + b"\n")
    return hostile, offset


@pytest.mark.parametrize("block_size", [16, 64, 1 << 20])
@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_malformed_csv_rows_are_marked_in_place_and_the_rest_is_read(
    tmp_path: Path, block_size: int, batch_size: int
) -> None:
    hostile, total = hostile_csv(tmp_path / "t.csv")
    source = CsvSource("c", [tmp_path], batch_size=batch_size, _block_size=block_size)
    batches = read_all(source)
    offsets = np.concatenate([b.offsets for b in batches])
    assert offsets.tolist() == list(range(total))
    rows = [r for b in batches for r in b.records.to_pylist()]
    bad = {o: (r[MALFORMED_RAW], r[MALFORMED_REASON], r[MALFORMED_MESSAGE])
           for o, r in zip(offsets.tolist(), rows, strict=True) if r[MALFORMED_REASON]}
    assert sorted(bad) == [o for o, _, _, _ in hostile]
    for offset, raw, reason, words in hostile:
        assert bad[offset][:2] == (raw, reason) and words in bad[offset][2]
        assert (rows[offset]["a"], rows[offset]["b"]) == (None, None)
    good = [(r["a"], r["b"], r["c"]) for r in rows if not r[MALFORMED_REASON]]
    assert good == [(str(i), f"x,{i}", "z") for i in range(40)]


def test_valid_rows_keep_their_offsets_whatever_lies_between(tmp_path: Path) -> None:
    hostile, total = hostile_csv(tmp_path / "t.csv")
    offsets: dict[bool, list[int]] = {True: [], False: []}
    for batch in read_all(CsvSource("c", [tmp_path], batch_size=3, _block_size=32)):
        for offset, row in zip(batch.offsets.tolist(), batch.records.to_pylist(), strict=True):
            offsets[row[MALFORMED_REASON] is None].append(offset)
    # Every line that is a row takes one offset, in file order: the valid rows' offsets are
    # their row numbers, as if the hostile lines had been valid rows.
    assert sorted(offsets[True] + offsets[False]) == list(range(total))
    assert offsets[False] == [o for o, _, _, _ in hostile]


@pytest.mark.parametrize("start", [0, 4, 5, 6, 13, 47])
def test_resume_across_malformed_csv_rows_equals_the_tail(tmp_path: Path, start: int) -> None:
    hostile_csv(tmp_path / "t.csv")
    source = CsvSource("c", [tmp_path], batch_size=4, _block_size=48)
    everything = [r for b in read_all(source) for r in zip(b.offsets.tolist(), b.records.to_pylist(),
                                                            strict=True)]
    tail = [r for b in read_all(source, {"t.csv": start})
            for r in zip(b.offsets.tolist(), b.records.to_pylist(), strict=True)]
    assert tail == [r for r in everything if r[0] >= start]


def test_a_quote_left_open_does_not_swallow_the_following_rows(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b'a,b,c\n1,"2,3\n4,5,6\n7,8,9\n10,11,"12\n13,14,15\n')
    (batch,) = read_all(CsvSource("c", [tmp_path]))
    rows = batch.records.to_pylist()
    assert [r[MALFORMED_REASON] for r in rows] == ["malformed_row", None, None, "malformed_row",
                                                   None]
    assert [(r["a"], r["b"], r["c"]) for r in rows if not r[MALFORMED_REASON]] == [
        ("4", "5", "6"), ("7", "8", "9"), ("13", "14", "15")]
    assert [r[MALFORMED_RAW] for r in rows if r[MALFORMED_REASON]] == [b'1,"2,3', b'10,11,"12']


# ------------------------------------------------------------------------------------------
# JSON Lines edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
def test_jsonl_edge_cases(tmp_path: Path, chunk_size: int) -> None:
    (tmp_path / "a.jsonl").write_bytes(JSONL_A)
    source = JsonLinesSource("j", [tmp_path], batch_size=3, _chunk_size=chunk_size)
    batches = read_all(source)
    got = [(off, line) for _, off, (line,) in rows_of(batches)]
    assert got == [
        (0, b'{"a": 1}'),
        (3, b'{"bad utf8": "\xff\xfe"}'),
        (4, b'{"big": "' + b"x" * 300 + b'"}'),
        (5, b"not json at all"),
        (7, b'  {"indented": true}  '),
        (8, b'{"last": "no newline"}'),
    ]
    assert all(b.records.schema == pa.schema([("line", pa.binary())]) for b in batches)
    assert batches[-1].next_offset == 9


def test_jsonl_only_blank_lines_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "blank.jsonl").write_bytes(b"\n \r\n\t\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    source = JsonLinesSource("j", [tmp_path], _chunk_size=2)
    assert read_all(source) == []
    with source.open_part("blank.jsonl") as reader:
        assert reader.next_batch() is None
        assert reader.snapshot() == 0


JSONL_BYTES = st.lists(
    st.sampled_from([b"\n", b"\r\n", b"\r", b" ", b"\t", b"{}", b"ab", b"\xff", b"x" * 40]),
    max_size=60,
).map(b"".join)


@PROPERTY
@given(
    data=JSONL_BYTES,
    chunk_size=st.integers(1, 50),
    batch_size=st.integers(1, 7),
    start=st.integers(0, 70),
)
def test_jsonl_matches_per_line_reference(
    tmp_path_factory: pytest.TempPathFactory,
    data: bytes,
    chunk_size: int,
    batch_size: int,
    start: int,
) -> None:
    path = tmp_path_factory.mktemp("jsonl") / "p.jsonl"
    path.write_bytes(data)
    source = JsonLinesSource("j", [path], batch_size=batch_size, _chunk_size=chunk_size)
    batches = read_part(source, "p.jsonl", start)
    got = [(off, line) for _, off, (line,) in rows_of(batches)]
    assert got == [(i, line) for i, line in jsonl_reference(data) if i >= start]
    assert all(b.num_rows == batch_size for b in batches[:-1])


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(batch_size=st.integers(1, 25), every=st.integers(1, 4))
def test_resume_from_every_kth_checkpoint_equals_tail(
    data_dir: Path, kind: str, batch_size: int, every: int
) -> None:
    source = make_source(kind, data_dir, batch_size)
    full = read_all(source)
    checkpoint: dict[str, int] = {}
    for i, batch in enumerate(full):
        checkpoint[batch.part] = batch.next_offset
        if i % every == 0:
            assert same_batches(read_all(source, dict(checkpoint)), full[i + 1 :])


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(batch_size=st.integers(1, 25), cut=st.integers(0, 120))
def test_resume_from_any_cut_point_equals_tail(
    data_dir: Path, kind: str, batch_size: int, cut: int
) -> None:
    source = make_source(kind, data_dir, batch_size)
    full = rows_of(read_all(source))
    for part in source.list_parts():
        batches = read_part(source, part, cut)
        assert rows_of(batches) == [r for r in full if r[0] == part and r[1] >= cut]
        assert all(b.num_rows == batch_size for b in batches[:-1])


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_tracks_last_returned_batch(data_dir: Path, kind: str) -> None:
    source = make_source(kind, data_dir, 4)
    part = source.list_parts()[0]
    with source.open_part(part, 2) as reader:
        assert reader.snapshot() == 2
        batch = reader.next_batch()
        assert batch is not None and reader.snapshot() == batch.next_offset
        while reader.next_batch() is not None:
            pass
        end = reader.snapshot()
        assert reader.next_batch() is None and reader.snapshot() == end
    for start in (end, end + 1, 10**9):
        assert read_part(source, part, start) == []
        with source.open_part(part, start) as reader:
            assert reader.next_batch() is None and reader.snapshot() == start


def test_parquet_resume_does_not_read_skipped_row_groups(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: object, **kwargs: object):
        seen.append(list(kwargs["row_groups"]))  # type: ignore[arg-type]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    source = ParquetSource("pq", [data_dir / "pq"], batch_size=5)
    batches = read_part(source, "a.parquet", 30)  # row groups of 7: row 30 is in group 4
    assert seen == [[4, 5, 6, 7]]
    assert batches[0].offsets.tolist() == [30, 31, 32, 33, 34]
    assert batches[0].records.column("id").to_pylist() == [30, 31, 32, 33, 34]


# ------------------------------------------------------------------------------------------
# path resolution
# ------------------------------------------------------------------------------------------


def touch_jsonl(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"p": "%s"}\n' % path.name.encode())


def test_directory_is_recursive_sorted_by_relative_path(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "z.jsonl", tmp_path / "b" / "2.jsonl", tmp_path / "b" / "1.jsonl")
    touch_jsonl(tmp_path / "a" / "deep" / "x.jsonl")
    (tmp_path / "notes.txt").write_text("ignored")
    source = JsonLinesSource("j", [tmp_path])
    assert source.list_parts() == ["a/deep/x.jsonl", "b/1.jsonl", "b/2.jsonl", "z.jsonl"]
    assert [b.part for b in read_all(source)] == source.list_parts()


def test_pattern_filters_directory_files(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "events-2.jsonl", tmp_path / "events-1.jsonl", tmp_path / "x.jsonl")
    (tmp_path / "events-3.json").write_text("{}\n")
    source = JsonLinesSource("j", [tmp_path], pattern="events-*.jsonl")
    assert source.list_parts() == ["events-1.jsonl", "events-2.jsonl"]


def test_glob_and_file_entries_use_file_names(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "d" / "b.jsonl", tmp_path / "d" / "a.jsonl", tmp_path / "c.jsonl")
    source = JsonLinesSource("j", [str(tmp_path / "d" / "*.jsonl")])
    assert source.list_parts() == ["a.jsonl", "b.jsonl"]
    assert JsonLinesSource("j", [tmp_path / "c.jsonl"]).list_parts() == ["c.jsonl"]
    assert JsonLinesSource("j", str(tmp_path / "c.jsonl")).list_parts() == ["c.jsonl"]


def test_several_entries_keep_the_given_order(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "late" / "b.jsonl", tmp_path / "late" / "a.jsonl")
    touch_jsonl(tmp_path / "first.jsonl", tmp_path / "g" / "m2.jsonl", tmp_path / "g" / "m1.jsonl")
    source = JsonLinesSource(
        "j", [tmp_path / "late", tmp_path / "first.jsonl", str(tmp_path / "g" / "m*.jsonl")]
    )
    expected = ["a.jsonl", "b.jsonl", "first.jsonl", "m1.jsonl", "m2.jsonl"]
    assert source.list_parts() == expected
    assert [b.part for b in read_all(source)] == expected


def test_duplicate_part_ids_and_files_are_rejected(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "x" / "a.jsonl", tmp_path / "y" / "a.jsonl")
    with pytest.raises(SourceError, match="a.jsonl"):
        JsonLinesSource("j", [tmp_path / "x", tmp_path / "y"])
    with pytest.raises(SourceError, match="a.jsonl"):
        JsonLinesSource("j", [str(tmp_path / "*" / "a.jsonl")])
    touch_jsonl(tmp_path / "z" / "sub" / "b.jsonl")
    with pytest.raises(SourceError, match="twice"):
        JsonLinesSource("j", [tmp_path / "z", tmp_path / "z" / "sub" / "b.jsonl"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: JsonLinesSource("j", [d / "missing.jsonl"]), "missing.jsonl"),
        (lambda d: JsonLinesSource("j", [d / "empty-dir"]), "empty-dir"),
        (lambda d: JsonLinesSource("j", [d], pattern="*.nope"), r"\*\.nope"),
        (lambda d: JsonLinesSource("j", [str(d / "*.nope")]), r"\*\.nope"),
        (lambda d: JsonLinesSource("j", []), "paths"),
        (lambda d: JsonLinesSource("j", [d], batch_size=0), "batch_size"),
        (lambda d: JsonLinesSource("j", [d], batch_size=-3), "batch_size"),
        (lambda d: ParquetSource("p", [d], batch_size=2.5), "batch_size"),  # type: ignore[arg-type]
        (lambda d: CsvSource("c", [d], batch_size=True), "batch_size"),
        (lambda d: JsonLinesSource("", [d]), "name"),
        (lambda d: JsonLinesSource("j", [d], pattern=""), "pattern"),
    ],
)
def test_configuration_errors(tmp_path: Path, make: Callable[[Path], Source], match: str) -> None:
    touch_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(SourceError, match=match):
        make(tmp_path)


def test_open_part_errors(tmp_path: Path) -> None:
    touch_jsonl(tmp_path / "a.jsonl")
    source = JsonLinesSource("j", [tmp_path])
    with pytest.raises(SourceError, match="nope.jsonl"):
        source.open_part("nope.jsonl")
    with pytest.raises(SourceError, match="start"):
        source.open_part("a.jsonl", -1)
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(SourceError, match="a.jsonl"):
        source.open_part("a.jsonl")


# ------------------------------------------------------------------------------------------
# reader lifecycle, RawBatch, pickling, isolation from Ray
# ------------------------------------------------------------------------------------------


def test_closed_reader_refuses_to_read(data_dir: Path) -> None:
    source = make_source("parquet", data_dir, 10)
    reader = source.open_part("a.parquet")
    with reader:
        assert reader.next_batch() is not None
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        reader.next_batch()


def test_raw_batch_properties_and_validation() -> None:
    records = pa.record_batch({"x": [1, 2, 3]})
    batch = RawBatch("s", "p", np.array([4, 7, 9]), records)
    assert batch.num_rows == 3 and batch.next_offset == 10
    assert batch.offsets.dtype == np.int64
    with pytest.raises(ValueError, match="one entry per row"):
        RawBatch("s", "p", np.array([1, 2]), records)


@pytest.mark.parametrize("kind", KINDS)
def test_sources_are_picklable(data_dir: Path, kind: str) -> None:
    source = make_source(kind, data_dir, 7)
    clone = pickle.loads(pickle.dumps(source))
    assert type(clone) is type(source) and clone.list_parts() == source.list_parts()
    assert same_batches(read_all(clone), read_all(source))


@pytest.mark.skipif(
    not HANDBOOK.is_dir(), reason=f"fraud-handbook reference data not present at {HANDBOOK}"
)
def test_reads_the_fraud_handbook_transactions() -> None:
    source = ParquetSource("tx", [HANDBOOK], pattern="transactions-*.parquet", batch_size=50_000)
    assert len(source.list_parts()) == 5
    total = 0
    for batch in iter_batches(source):
        assert batch.offsets[0] % 50_000 == 0
        total += batch.num_rows
    assert total == HANDBOOK_ROWS


# ------------------------------------------------------------------------------------------
# JSON Lines: an over-long line is cut short in bounded memory
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1 << 20])
@pytest.mark.parametrize("terminated", [True, False])
def test_an_over_long_jsonl_line_is_cut_and_the_next_lines_are_read(
    tmp_path: Path, chunk_size: int, terminated: bool
) -> None:
    limit = 100
    giant = b'{"blob": "' + b"x" * (7 * limit) + b'"}'
    data = b'{"n": 0}\n' + giant + (b'\n{"n": 2}\n{"n": 3}\n' if terminated else b"")
    (tmp_path / "t.jsonl").write_bytes(data)
    source = JsonLinesSource("j", [tmp_path], max_line_bytes=limit, _chunk_size=chunk_size)
    rows = rows_of(read_all(source))
    assert [(offset, len(row[0]) > limit) for _, offset, row in rows] == [
        (0, False), (1, True), *([(2, False), (3, False)] if terminated else [])]
    (cut,) = [row[0] for _, _, row in rows if len(row[0]) > limit]
    # Cut where it had to be: whole when it came in one chunk, else limit + 1 bytes.
    assert giant.startswith(cut) and len(cut) in (limit + 1, len(giant))
    assert len(cut) == limit + 1 or chunk_size >= len(data)


def test_an_unterminated_giant_line_is_read_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    limit, chunk = 4 << 10, 256 << 10
    path = tmp_path / "t.jsonl"
    with open(path, "wb") as handle:
        handle.write(b'{"n": 0}\n{"blob": "')
        for _ in range(64):  # a 16 MiB line with no newline
            handle.write(b"x" * (256 << 10))
    source = JsonLinesSource("j", [tmp_path], max_line_bytes=limit, _chunk_size=chunk)
    tracemalloc.start()
    try:
        rows = rows_of(read_all(source))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(row[0]) for _, _, row in rows] == [8, limit + 1]
    assert peak < 4 * chunk, f"peak {peak} bytes for a 16 MiB line"


def test_max_line_bytes_is_validated(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("{}\n")
    with pytest.raises(SourceError, match="max_line_bytes"):
        JsonLinesSource("j", [tmp_path], max_line_bytes=0)
