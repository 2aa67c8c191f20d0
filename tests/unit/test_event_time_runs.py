"""Whole runs in event time (in process): files in any order, events arriving out of order,
far-off timestamps, run identity and idempotent appends across runs.

The fraud flow's ``scores`` rows (the 15 inputs) are the yardstick: they are per-key,
windowed and read labels, so any misordering of a key's events, or a label released early,
changes them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.checkpointing import ResumeError
from cluster.job import run_in_process
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.pipeline import load_pipeline
from pipelines.spec import PipelineSpec

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ["TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT", "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
          "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW", "TERMINAL_ID_NB_TX_7DAY_WINDOW",
          "TERMINAL_ID_RISK_30DAY_WINDOW", "TERMINAL_ID_RISK_1DAY_WINDOW"]


def fraud(tmp: Path, **source: object) -> PipelineSpec:
    overrides = {"source": {"batch_size": 4000, **source},
                 "steps": None}
    spec = load_pipeline(ROOT / "configs" / "fraud.yaml", {"source": overrides["source"]})
    steps = [{**s.model_dump(exclude_unset=True), "model": None} for s in spec.steps]
    return PipelineSpec.model_validate({**spec.model_dump(exclude_unset=True), "steps": steps})


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    folder = tmp_path_factory.mktemp("tx")
    table = simulate_transactions(SimulationSpec(n_customers=150, n_terminals=300, n_days=70, seed=11))
    write_monthly(table, folder)
    return folder, table


def scores(store: Path) -> pl.DataFrame:
    frame = pl.read_parquet(store / "scores" / "**" / "*.parquet", hive_partitioning=False)
    return frame.select("TRANSACTION_ID", *INPUTS).sort("TRANSACTION_ID")


def test_files_in_reverse_order_score_exactly_as_in_order(
        months: tuple[Path, pa.Table], tmp_path: Path) -> None:
    folder, table = months
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    spec = fraud(tmp_path)
    run_in_process(spec, tmp_path / "in-order", inputs=files)
    summary = run_in_process(spec, tmp_path / "reversed", inputs=files[::-1])
    assert summary["dead_lettered"] == 0 and summary["events_in"] == table.num_rows
    assert scores(tmp_path / "reversed").equals(scores(tmp_path / "in-order"))


def test_events_delayed_up_to_the_lateness_score_exactly_as_in_order(
        months: tuple[Path, pa.Table], tmp_path: Path) -> None:
    folder, table = months
    rng = np.random.default_rng(5)
    delay = rng.uniform(0, 20 * 60 * 1e6, table.num_rows).astype("int64")  # 0-20 minutes
    arrival = table.column("TX_DATETIME").cast(pa.int64()).to_numpy() // 1000 + delay
    shuffled = table.take(pa.array(np.argsort(arrival, kind="stable")))
    (tmp_path / "late").mkdir()
    pq.write_table(shuffled, tmp_path / "late" / "transactions-arrivals.parquet")
    run_in_process(fraud(tmp_path), tmp_path / "in-order", inputs=[str(folder)])
    summary = run_in_process(fraud(tmp_path, lateness="20m"), tmp_path / "delayed",
                             inputs=[str(tmp_path / "late")])
    assert summary["dead_lettered"] == 0
    assert scores(tmp_path / "delayed").equals(scores(tmp_path / "in-order"))


def test_events_later_than_the_lateness_are_dead_letters_never_an_exception(
        months: tuple[Path, pa.Table], tmp_path: Path) -> None:
    _, table = months
    rng = np.random.default_rng(6)
    delay = rng.uniform(0, 3 * 86400 * 1e6, table.num_rows).astype("int64")  # up to 3 days
    arrival = table.column("TX_DATETIME").cast(pa.int64()).to_numpy() // 1000 + delay
    (tmp_path / "late").mkdir()
    pq.write_table(table.take(pa.array(np.argsort(arrival, kind="stable"))),
                   tmp_path / "late" / "transactions-arrivals.parquet")
    summary = run_in_process(fraud(tmp_path, lateness="20m"), tmp_path / "s",
                             inputs=[str(tmp_path / "late")])
    late = summary["reasons"].get("late_event", 0)
    assert late > 0 and summary["dead_lettered"] == late
    assert summary["events_in"] + summary["derived"] == summary["stored"] + late
    dead = pl.read_parquet(tmp_path / "s" / "deadletter" / "**" / "*.parquet", hive_partitioning=False)
    assert set(dead["reason"]) == {"late_event"} and dead["raw"].null_count() == 0
    stored = pl.read_parquet(tmp_path / "s" / "events" / "**" / "*.parquet", hive_partitioning=False)
    assert stored["event_id"].is_in(dead["event_id"].implode()).sum() == 0  # never in the stream


def test_a_far_future_row_does_not_release_labels_early(
        months: tuple[Path, pa.Table], tmp_path: Path) -> None:
    folder, table = months
    hostile = table.slice(100, 1).to_pylist()[0]
    hostile.update(TRANSACTION_ID=10**9, TX_DATETIME=dt.datetime(2025, 6, 1))
    first = table.slice(0, 2000)
    rows = pa.concat_tables([first.slice(0, 500), pa.Table.from_pylist([hostile], first.schema),
                             first.slice(500), table.slice(2000)])
    (tmp_path / "hostile").mkdir()
    pq.write_table(rows, tmp_path / "hostile" / "transactions-h.parquet")
    run_in_process(fraud(tmp_path), tmp_path / "clean", inputs=[str(folder)])
    run_in_process(fraud(tmp_path), tmp_path / "with-row", inputs=[str(tmp_path / "hostile")])
    got = scores(tmp_path / "with-row").filter(pl.col("TRANSACTION_ID") != 10**9)
    assert got.equals(scores(tmp_path / "clean"))


def jsonl(path: Path, start: int, n: int) -> None:
    with path.open("w") as out:
        for i in range(start, start + n):
            out.write(json.dumps({"eventId": f"e{i}", "eventType": "user.login",
                                  "timestamp": f"2024-05-01T10:{i // 60:02d}:{i % 60:02d}Z",
                                  "source": "web", "correlationId": f"u{i % 7}", "data": {"n": i},
                                  "metadata": {"version": "1.0"}}) + "\n")


def events_spec() -> PipelineSpec:
    return load_pipeline(ROOT / "configs" / "events.yaml")


def test_a_rerun_over_an_input_that_grew_stores_only_the_new_events(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", 0, 300)
    jsonl(tmp_path / "b.jsonl", 300, 200)
    store = tmp_path / "store"
    first = run_in_process(events_spec(), store, inputs=[str(tmp_path / "a.jsonl")])
    second = run_in_process(events_spec(), store,
                            inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert first["run"] != second["run"]
    assert second["duplicates"] == 300 and second["stored"] == 200 and second["dead_lettered"] == 0
    ids = pl.read_parquet(store / "events" / "**" / "*.parquet")["event_id"]
    assert ids.n_unique() == ids.len() == 500


def test_resume_refuses_a_changed_partition_count_or_input(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", 0, 300)
    jsonl(tmp_path / "b.jsonl", 300, 50)
    store, spec = tmp_path / "store", events_spec()
    done = run_in_process(spec, store, inputs=[str(tmp_path / "a.jsonl")], run_id="nightly")
    three = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"partitions": 3})})
    with pytest.raises(ResumeError, match="runtime.partitions is 3, the run started with 2"):
        run_in_process(three, store, inputs=[str(tmp_path / "a.jsonl")], resume=True, run_id="nightly")
    grown = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(ResumeError, match="the input changed"):
        run_in_process(spec, store, inputs=grown, resume=True, run_id="nightly")
    with pytest.raises(ResumeError, match="other runs of 'events': nightly"):
        run_in_process(spec, store, inputs=grown, resume=True)  # its default id is another run's
    again = run_in_process(spec, store, inputs=[str(tmp_path / "a.jsonl")], resume=True, run_id="nightly")
    assert again["resumed"] and again["stored"] == done["stored"]


def hostile_copies(table: pa.Table, n: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """``table`` with ``n`` hostile copies of its rows, each right after the row it copies,
    under new transaction ids: NaN or inf amounts, times in 1970, 2100 and 9999, missing
    customer or terminal ids. Returns (the whole input, the hostile rows)."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(table.num_rows, n, replace=False))
    kinds = rng.integers(0, 7, n)
    frame = pl.from_arrow(table).with_row_index("__row")
    copies = frame[picked].with_columns(
        TRANSACTION_ID=pl.Series(10**9 + np.arange(n)), __kind=pl.Series(kinds),
        __row=pl.Series(picked).cast(pl.UInt32))
    when = pl.col("__kind")
    copies = copies.with_columns(
        TX_AMOUNT=pl.when(when == 0).then(float("nan")).when(when == 1).then(float("inf"))
        .otherwise(pl.col("TX_AMOUNT")),
        TX_DATETIME=pl.when(when == 2).then(pl.lit(dt.datetime(1970, 1, 1, 3)))
        .when(when == 3).then(pl.lit(dt.datetime(2100, 1, 1)))
        .when(when == 4).then(pl.lit(dt.datetime(9999, 12, 31)))
        .otherwise(pl.col("TX_DATETIME")).cast(pl.Datetime("us")),
        CUSTOMER_ID=pl.when(when == 5).then(None).otherwise(pl.col("CUSTOMER_ID")),
        TERMINAL_ID=pl.when(when == 6).then(None).otherwise(pl.col("TERMINAL_ID")))
    both = pl.concat([frame.with_columns(__kind=pl.lit(-1, pl.Int64),
                                         TX_DATETIME=pl.col("TX_DATETIME").cast(pl.Datetime("us"))),
                      copies], how="vertical_relaxed")
    both = both.sort("__row", "__kind", maintain_order=True).drop("__row", "__kind")
    return both.to_arrow(), copies.drop("__row", "__kind").to_arrow()


def test_hostile_rows_are_dead_letters_and_leave_every_valid_input_as_it_was(
        months: tuple[Path, pa.Table], tmp_path: Path) -> None:
    folder, table = months
    fuzzed, hostile = hostile_copies(table, 4000, seed=8)
    (tmp_path / "fuzzed").mkdir()
    pq.write_table(fuzzed, tmp_path / "fuzzed" / "transactions-fuzzed.parquet")
    spec = fraud(tmp_path, lateness="20m")
    run_in_process(spec, tmp_path / "clean", inputs=[str(folder)])
    summary = run_in_process(spec, tmp_path / "fuzz", inputs=[str(tmp_path / "fuzzed")])
    dead = pl.read_parquet(tmp_path / "fuzz" / "deadletter" / "**" / "*.parquet", hive_partitioning=False)
    hostile_ids = {str(i) for i in hostile.column("TRANSACTION_ID").to_pylist()}
    raw_ids = dead.select(pl.col("raw").cast(pl.String).str.extract(
        r'"TRANSACTION_ID":\s*(\d+)', 1).alias("id"))["id"]
    assert hostile_ids <= set(raw_ids.drop_nulls()), summary["reasons"]
    assert summary["dead_lettered"] == len(hostile_ids), summary["reasons"]
    assert scores(tmp_path / "fuzz").equals(scores(tmp_path / "clean"))
