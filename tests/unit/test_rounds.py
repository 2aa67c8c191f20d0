"""Rounds of event time for runs with reader actors (:mod:`pipelines.rounds`), in process:
splits of Parquet files, a reader's splits read back to back, rounds merged in one order
whatever the readers, and the stage's answers mapped back to each reader."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.round_operators import _answer_of
from pipelines.keyed import BatchReceipt
from pipelines.processing import ROW_POSITION
from pipelines.rounds import (
    END_OF_TIME,
    RoundInputs,
    RoundOrder,
    SplitReader,
    deal,
    merge_pieces,
    plan_splits,
    round_length,
    split_at,
)
from pipelines.sources import ParquetSource

T0 = dt.datetime(2018, 4, 1, tzinfo=dt.UTC)


def events(seconds: list[int], ids: list[str]) -> pa.Table:
    return pa.table({"timestamp": pa.array([T0 + dt.timedelta(seconds=s) for s in seconds],
                                           pa.timestamp("us", "UTC")), "event_id": ids})


def test_parquet_files_are_cut_into_row_ranges_read_back_to_back(tmp_path: Path) -> None:
    for name, rows in (("a.parquet", 25), ("b.parquet", 7)):
        pq.write_table(pa.table({"x": np.arange(rows)}), tmp_path / name)
    source = ParquetSource("t", [tmp_path], batch_size=10)
    splits = plan_splits(source, 10)
    assert [(s.part, s.start, s.end) for s in splits] == [
        ("a.parquet", 0, 10), ("a.parquet", 10, 20), ("a.parquet", 20, 25), ("b.parquet", 0, 7)]
    mine = deal(splits, 2)
    assert [s.name for s in mine[0]] == ["a.parquet@0", "a.parquet@20"]
    reader = SplitReader(source, mine[0], {"a.parquet@0": 4})  # resumed inside a split
    got = []
    while (raw := reader.next_batch()) is not None:
        got.append((raw.part, raw.offsets.tolist()))
    assert got == [("a.parquet", list(range(4, 10))), ("a.parquet", list(range(20, 25)))]
    assert reader.offsets == {"a.parquet@0": 10, "a.parquet@20": 25}


def test_a_round_merges_its_pieces_in_one_order_whatever_the_inputs() -> None:
    a, b = events([3, 1, 5], ["a3", "a1", "a5"]), events([1, 5, 2], ["b1", "b5", "b2"])
    merged, origin = merge_pieces([a, None, b])
    assert merged is not None
    assert merged.column("event_id").to_pylist() == ["a1", "b1", "b2", "a3", "a5", "b5"]
    assert origin.tolist() == [0, 2, 2, 0, 0, 2]
    # the same events handed in by one input, or split otherwise, come out the same
    alone, _ = merge_pieces([pa.concat_tables([b, a])])
    assert alone is not None and alone.equals(merged)
    assert merge_pieces([None, events([], [])])[0] is None


def test_events_beyond_a_round_wait_for_a_later_one() -> None:
    due, later = split_at(events([1, 9, 4], ["x", "y", "z"]), int((T0.timestamp() + 5) * 1e6))
    assert due.column("event_id").to_pylist() == ["x", "z"]
    assert later.column("event_id").to_pylist() == ["y"]
    assert split_at(later, END_OF_TIME)[0].num_rows == 1


def test_a_round_is_applied_once_every_input_has_handed_in_its_piece() -> None:
    inputs = RoundInputs(2)
    inputs.add(1, 0, None, 20)
    inputs.add(0, 1, None, 10)
    assert inputs.complete() == []  # round 0 still waits for input 0
    inputs.add(0, 0, None, 10)
    inputs.add(1, 1, None, 20)
    assert [(n, end) for n, _, end in inputs.complete()] == [(0, 10), (1, 20)]
    inputs.add(0, 0, None, 10)  # a round already applied: ignored
    assert inputs.complete() == [] and inputs.next_round == 2


def test_rounds_span_about_the_target_rows_of_the_whole_input() -> None:
    # four readers' first splits side by side: 100 rows each over one second each
    firsts = [(100, i * 1_000_000, (i + 1) * 1_000_000) for i in range(4)]
    assert round_length(firsts, 200) == 2_000_000
    assert round_length([(0, 0, 0)], 10) == 1


def test_a_stage_answers_each_reader_in_its_own_row_positions() -> None:
    # merged rows 0..3 came from readers 1, 0, 1, 0 at their positions 7, 2, 8, 3
    origin, positions = np.array([1, 0, 1, 0]), np.array([7, 2, 8, 3])
    derived = pa.table({ROW_POSITION: pa.array([0, 1, 2, 3], pa.int64()), "f": [0.0, 1.0, 2.0, 3.0]})
    receipt = BatchReceipt(0, 5, 4, True, 0.0, derived=derived, poisoned=pa.array([2], pa.int64()),
                           dead_lettered=1, reasons={"processor_error": 1})
    zero = _answer_of(receipt, origin, positions, 0, round_no=3)
    one = _answer_of(receipt, origin, positions, 1, round_no=3)
    assert zero.seq == 3 and zero.rows == 2 and zero.dead_lettered == 0 and zero.reasons == {}
    assert zero.derived is not None and zero.derived.to_pydict() == {ROW_POSITION: [2, 3], "f": [1.0, 3.0]}
    assert one.derived is not None and one.derived.to_pydict() == {ROW_POSITION: [7, 8], "f": [0.0, 2.0]}
    assert one.poisoned is not None and one.poisoned.to_pylist() == [8]
    assert one.reasons == {"processor_error": 1}


def test_ties_are_ordered_as_the_driver_path_orders_them() -> None:
    tx = pa.table({"timestamp": pa.array([T0, T0, T0], pa.timestamp("us", "UTC")),
                   "event_id": ["a", "b", "c"], "event_type": ["tx", "tx", "label"],
                   "data": pa.array([{"N": 9}, {"N": 3}, {"N": 5}])})
    order = RoundOrder(labels_first="label", ties="data.N")
    merged, _ = merge_pieces([tx.slice(0, 1), tx.slice(1)], order)
    # the label first (it is merged ahead of its second), then by data.N, not by event id
    assert merged is not None and merged.column("event_id").to_pylist() == ["c", "b", "a"]
    # a tie field the table lacks (a stage's projection) is left out of the order
    merged, _ = merge_pieces([tx.drop_columns(["data"])], RoundOrder(ties="data.N"))
    assert merged is not None and merged.column("event_id").to_pylist() == ["a", "b", "c"]
