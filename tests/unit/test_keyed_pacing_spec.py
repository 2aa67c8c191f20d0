"""Keyed splitting and ordered apply, paced replay, config validation, public surface."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cluster
import models
import pipelines
from pipelines.envelope import TIMESTAMP
from pipelines.errors import ConfigError
from pipelines.keyed import PartitionWorker, SequenceGapError, split_by_partition
from pipelines.pacing import Pacer
from pipelines.pipeline import load_pipeline
from pipelines.testing import FakeClock, ListSink
from tests.support import ROOT


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([f"k{i}" for i in range(12)]), min_size=1, max_size=200),
       st.integers(1, 7))
def test_split_keeps_every_row_once_and_each_keys_order(keys: list[str], partitions: int) -> None:
    table = pa.table({"key": keys, "n": list(range(len(keys)))})
    pieces = split_by_partition(table, partitions)
    assert sum(p.num_rows for _, p in pieces) == len(keys)
    for partition, piece in pieces:
        assert set(pipelines.partition_of(piece["key"], partitions).tolist()) == {partition}
        ns = piece["n"].to_pylist()
        assert ns == sorted(ns)  # source order inside a partition, hence inside each key


def test_worker_applies_in_sequence_exactly_once() -> None:
    sink = ListSink()
    worker = PartitionWorker(3, sink, clock=FakeClock())
    batch = pa.table({"key": ["a", "b"]})
    assert worker.apply(0, batch).applied
    with pytest.raises(SequenceGapError) as gap:
        worker.apply(2, batch)
    assert (gap.value.expected, gap.value.got) == (1, 2)
    assert not worker.apply(0, batch).applied  # replay after a retry: no effect
    assert worker.apply(1, batch).applied
    assert sink.table("events").num_rows == 4
    fresh = PartitionWorker(3, sink)
    snapshot = worker.snapshot()
    fresh.restore(snapshot)
    assert fresh.next_seq == 2
    # the state's bytes are exactly what json.dumps gives the whole state (it is assembled
    # around the steps' serialised states rather than serialising them twice)
    assert snapshot == json.dumps({"partition": 3, "next_seq": 2, "steps": {}}).encode()


def _events(seconds: list[float]) -> pa.Table:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    stamps = [base + dt.timedelta(seconds=s) for s in seconds]
    meta = pa.array([{"ingested_at": base}] * len(seconds), pa.struct([("ingested_at", TIMESTAMP)]))
    return pa.table({"timestamp": pa.array(stamps, TIMESTAMP), "metadata": meta})


def test_pacer_releases_by_event_time_at_speedup() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, monotonic=clock.monotonic, sleep=clock.sleep, wall=clock.now)
    released = [(s.num_rows, clock.monotonic()) for s in pacer.release(_events([0, 0, 5, 10, 9, 20]))]
    # 10x: event second 5 is due at 0.5 s; the late 9 s event is released with the 10 s one.
    assert released == [(2, 0.0), (1, 0.5), (2, 1.0), (1, 2.0)]
    second = [(s.num_rows, clock.monotonic()) for s in pacer.release(_events([30]))]
    assert second == [(1, 3.0)]


def _stamps(slices: list[pa.Table]) -> list[list[float]]:
    """Each slice's ``ingested_at``, in seconds after the fake clock's start."""
    start = FakeClock().now()
    stamps = [s["metadata"].combine_chunks().field("ingested_at").to_pylist() for s in slices]
    return [[(t - start).total_seconds() for t in piece] for piece in stamps]


def test_pacer_stamps_each_event_with_its_arrival_even_when_released_late() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock.monotonic, sleep=clock.sleep, wall=clock.now)
    first = pacer.release(_events([0, 1, 2]))
    slices = [next(first)]
    clock.advance(1.5)  # the driver is busy 1.5 s: the 1 s event waits, stamped when due
    slices += list(first)
    assert [s.num_rows for s in slices] == [1, 1, 1]
    assert _stamps(slices) == [[0.0], [1.0], [2.0]]


def test_pacer_lingers_to_release_fewer_larger_slices() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, linger_s=1.0, monotonic=clock.monotonic, sleep=clock.sleep, wall=clock.now)
    slices, released_at = [], []
    for piece in pacer.release(_events([0, 0.3, 0.6, 1.2, 2.5])):
        slices.append(piece)
        released_at.append(clock.monotonic())
    # At most one release a second: what fell due meanwhile leaves together.
    assert released_at == [0.0, 1.0, 2.0, 3.0]
    # Stamped by arrival, not release: the linger counts in measured latency.
    assert _stamps(slices) == [[0.0], [0.3, 0.6], [1.2], [2.5]]
    with pytest.raises(ValueError, match="linger_s"):
        Pacer(1.0, linger_s=-1)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("partitions: 2", "partitions: 0"), "runtime.partitions"),
        (("format: jsonl", "format: avro"), "source.format"),
        (("event_type: eventType", "event_typo: eventType"), "mapping"),
        (("name: events", "name: 'has space'"), "name"),
    ],
)
def test_bad_configs_name_their_field(edit: tuple[str, str], field: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs" / "events.yaml").read_text().replace(*edit, 1))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_pipeline(config)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("  partitions: 1\n", "  partitions: 2\n"), "runtime.partitions: 2"),
        (("    partitions: 1           # see", "    partitions: 3           # see"),
         "enrich.terminal.partitions: 3"),
        (("  partitions: 1\n", "  partitions: 1\n  readers: 2\n"), "runtime.readers: 2"),
    ],
)
def test_a_chained_run_with_more_than_one_process_names_the_field(
        edit: tuple[str, str], named: str, tmp_path: Path) -> None:
    text = (ROOT / "configs" / "live.yaml").read_text()
    assert "  chain: true\n" in text and edit[0] in text
    config = tmp_path / "live.yaml"
    config.write_text(text.replace(*edit, 1))
    with pytest.raises(ConfigError, match=f"runtime.chain.*{re.escape(named)}"):
        load_pipeline(config)
    config.write_text(text.replace(*edit, 1).replace("  chain: true\n", "  chain: false\n"))
    assert not load_pipeline(config).runtime.chain


def test_clashing_payload_fields_fail_at_load(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs" / "events.yaml").read_text() + """
event_types:
  a.one: {payload: {amount: float}}
  a.two: {payload: {amount: str}}
""")
    with pytest.raises(ConfigError, match="amount"):
        load_pipeline(config)


def test_shipped_configs_are_valid() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_pipeline(path).name == path.stem


def test_public_surface_is_pinned() -> None:
    assert sorted(pipelines.__all__) == sorted([
        "DEADLETTER_SCHEMA", "ROW_POSITION", "RUNNERS", "SOURCE_KINDS", "STAGE_KINDS", "STEP_KINDS",
        "AccountingError", "BatchReceipt", "ConfigError", "CsvSource",
        "DuplicateFilter", "Envelope", "EventStore", "JsonLinesSource", "Metadata", "Normalised",
        "Normaliser", "Pacer", "ParquetSource", "PartitionWorker", "PayloadRegistry",
        "PayloadSchema", "Pipeline", "PipelineError", "PipelineSpec", "PluginImportError",
        "PluginRegistry", "ProcessorError", "RawBatch", "SchemaError",
        "SequenceGapError", "Source", "SourceError", "SourceKind", "SourceReader", "Step",
        "StepContext", "StepOutput", "StoreError",
        "UnknownPluginError", "derived_event_ids", "envelope_schema", "iter_batches",
        "load_pipeline", "partition_of", "split_by_partition",
    ])
    assert all(hasattr(pipelines, name) for name in pipelines.__all__)
    assert cluster.__all__ == ["main", "run_job"]
    assert models.__all__ == []
