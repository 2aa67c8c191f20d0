"""Bounded file sources merged in event-time order (pipelines.merged_source)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.merged_source import EventTimeMergedSource, TimestampMicros
from pipelines.sources import CsvSource, JsonLinesSource, ParquetSource, RawBatch, SourceError

MINUTE = 60_000_000
APRIL = 1_522_540_800_000_000  # 2018-04-01T00:00:00Z
MAY = APRIL + 30 * 24 * 60 * MINUTE


def write_parquet(path: Path, times: np.ndarray, tag: str, row_group_size: int = 1_000) -> Path:
    table = pa.table({
        "id": pa.array([f"{tag}-{i:05d}" for i in range(len(times))]),
        "ts": pa.array(np.asarray(times, np.int64), pa.int64()).cast(pa.timestamp("us")),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_csv(path: Path, times: np.ndarray, tag: str) -> Path:
    table = pa.table({
        "id": pa.array([f"{tag}-{i:05d}" for i in range(len(times))]),
        "epoch_s": pa.array((np.asarray(times) // 1_000_000).astype(str)),
    })
    pacsv.write_csv(table, path)
    return path


def read_all(merged: EventTimeMergedSource, resume: dict[str, int] | None = None) -> list[RawBatch]:
    return list(merged.batches(resume))


def ids(batches: list[RawBatch]) -> list[str]:
    return [i for raw in batches for i in raw.records.column("id").to_pylist()]


def sorted_ids(parts: dict[str, np.ndarray], tags: dict[str, str]) -> list[str]:
    """The expected merge: by (time, part id, offset)."""
    rows = [(int(t), part, offset) for part, times in parts.items() for offset, t in enumerate(times)]
    return [f"{tags[part]}-{offset:05d}" for _, part, offset in sorted(rows)]


def month(start: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return start + np.sort(rng.integers(0, 29 * 24 * 60 * MINUTE, n))


def test_files_in_reverse_order_come_out_as_in_order_at_the_same_cost(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    april = write_parquet(tmp_path / "april.parquet", month(APRIL, 5_000, rng), "apr")
    may = write_parquet(tmp_path / "may.parquet", month(MAY, 5_000, rng), "may")
    forward = read_all(EventTimeMergedSource(ParquetSource("tx", [april, may], batch_size=1_000), "ts"))
    reverse = read_all(EventTimeMergedSource(ParquetSource("tx", [may, april], batch_size=1_000), "ts"))
    assert ids(reverse) == ids(forward) == [f"apr-{i:05d}" for i in range(5_000)] + [
        f"may-{i:05d}" for i in range(5_000)]
    # whole blocks, never cut: as many batches as reading the files one after the other
    assert len(reverse) == len(forward) == 10
    for raw in reverse:
        assert (np.diff(raw.offsets) == 1).all()


def test_a_later_file_is_not_opened_before_it_is_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    april = write_parquet(tmp_path / "april.parquet", month(APRIL, 3_000, rng), "apr")
    may = write_parquet(tmp_path / "may.parquet", month(MAY, 3_000, rng), "may")
    source = ParquetSource("tx", [may, april], batch_size=500)
    opened: list[str] = []
    real_open = ParquetSource.open_part

    def spy(self: ParquetSource, part: str, start: int = 0):  # type: ignore[no-untyped-def]
        opened.append(part)
        return real_open(self, part, start)

    monkeypatch.setattr(ParquetSource, "open_part", spy)
    batches = EventTimeMergedSource(source, "ts").batches()
    first = [next(batches) for _ in range(6)]
    assert {raw.part for raw in first} == {"april.parquet"} and opened == ["april.parquet"]
    rest = list(batches)
    assert opened == ["april.parquet", "may.parquet"] and len(first) + len(rest) == 12


def test_overlapping_sensor_files_are_merged_by_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    parts, tags, paths = {}, {}, []
    for sensor in range(4):
        times = APRIL + np.sort(rng.integers(0, 600, 700)) * 1_000_000  # seconds: many ties
        name = f"sensor{sensor}.csv"
        paths.append(write_csv(tmp_path / name, times, f"s{sensor}"))
        parts[name], tags[name] = times, f"s{sensor}"
    source = CsvSource("sensors", paths[::-1], batch_size=64)
    merged = read_all(EventTimeMergedSource(source, "epoch_s", TimestampMicros("s")))
    assert ids(merged) == sorted_ids(parts, tags)


def test_equal_times_across_parts_order_by_part_then_offset(tmp_path: Path) -> None:
    same = np.full(3, APRIL)
    b = write_parquet(tmp_path / "b.parquet", same, "b")
    a = write_parquet(tmp_path / "a.parquet", same, "a")
    merged = read_all(EventTimeMergedSource(ParquetSource("x", [b, a]), "ts"))
    assert ids(merged) == ["a-00000", "a-00001", "a-00002", "b-00000", "b-00001", "b-00002"]


def test_a_far_future_row_does_not_hold_back_its_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    april_times = month(APRIL, 2_000, rng)
    april_times[700] = APRIL + 7 * 365 * 24 * 60 * MINUTE  # a 2025 row in 2018
    april = write_parquet(tmp_path / "april.parquet", april_times, "apr")
    may = write_parquet(tmp_path / "may.parquet", month(MAY, 2_000, rng), "may")
    merged = ids(read_all(EventTimeMergedSource(ParquetSource("tx", [may, april], batch_size=300), "ts")))
    assert merged == [f"apr-{i:05d}" for i in range(2_000)] + [f"may-{i:05d}" for i in range(2_000)]


def test_resume_from_any_checkpoint_yields_exactly_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    paths = [write_parquet(tmp_path / f"p{i}.parquet", month(APRIL, 400, rng), f"p{i}", row_group_size=90)
             for i in range(3)]
    merged = EventTimeMergedSource(ParquetSource("tx", paths, batch_size=50), "ts", block_rows=37)
    whole = read_all(merged)
    assert sorted(ids(whole)) == sorted(f"p{i}-{j:05d}" for i in range(3) for j in range(400))
    for cut in range(0, len(whole), 7):
        offsets: dict[str, int] = {}
        for raw in whole[:cut]:
            offsets[raw.part] = raw.next_offset
        assert ids(whole[:cut]) + ids(read_all(merged, offsets)) == ids(whole)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_parts=st.integers(1, 5),
    block_rows=st.integers(1, 40),
    batch_size=st.integers(1, 40),
    row_group_size=st.integers(1, 60),
)
def test_sorted_parts_merge_by_time_part_offset_and_resume_anywhere(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n_parts: int, block_rows: int,
    batch_size: int, row_group_size: int,
) -> None:
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("parts")
    parts, tags, paths = {}, {}, []
    for i in range(n_parts):
        times = APRIL + np.sort(rng.integers(0, 50, rng.integers(0, 120))) * MINUTE
        name = f"part{i}.parquet"
        paths.append(write_parquet(folder / name, times, f"q{i}", row_group_size=row_group_size))
        parts[name], tags[name] = times, f"q{i}"
    rng.shuffle(paths)
    merged = EventTimeMergedSource(ParquetSource("tx", paths, batch_size=batch_size), "ts",
                                   block_rows=block_rows)
    whole = read_all(merged)
    assert ids(whole) == sorted_ids(parts, tags)
    if whole:
        cut = int(rng.integers(0, len(whole)))
        offsets = {raw.part: raw.next_offset for raw in whole[:cut]}
        assert ids(whole[:cut]) + ids(read_all(merged, offsets)) == ids(whole)


def test_null_and_unreadable_times_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("id,epoch_s\na-0,100\na-1,\na-2,nope\na-3,50\n")
    other = write_csv(tmp_path / "b.csv", np.array([75_000_000]), "b")
    merged = ids(read_all(EventTimeMergedSource(CsvSource("x", [path, other]), "epoch_s",
                                                TimestampMicros("s"))))
    # a-0's key is the smallest time at or after it (50 s): the whole file goes first
    assert merged == ["a-0", "a-1", "a-2", "a-3", "b-00000"]


def test_json_lines_are_not_merged(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"ts": 1}\n')
    with pytest.raises(SourceError, match="JSON Lines"):
        EventTimeMergedSource(JsonLinesSource("j", [path]), "ts")  # type: ignore[arg-type]


def test_timestamp_micros_reads_like_the_normaliser() -> None:
    when = dt.datetime(2018, 4, 1, tzinfo=dt.UTC)
    assert TimestampMicros()(pa.array(["2018-04-01T00:00:00Z", "x"])).to_pylist() == [
        APRIL, None]
    assert TimestampMicros("ms")(pa.array([APRIL // 1000])).to_pylist() == [APRIL]
    assert TimestampMicros()(pa.array([when])).to_pylist() == [APRIL]
