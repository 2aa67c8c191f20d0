"""`eventray bench` on tiny simulator data: every system runs and the report is complete.

No timing is asserted: figures depend on the machine. What is checked is that each system
did the whole (or, for the time-boxed per-event design, a prefix of the) work, that the
systems' features agree with the pipeline's reference, and that the JSON, the PNG and the
table carry what the issue asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from cluster.bench.batch_job import features as batch_features
from cluster.bench.keyed_windows import FEATURES, CustomerWindows, TerminalWindows, calendar
from models.fraud import HANDBOOK_FEATURES
from pipelines.fraud.features import handbook_features_batch
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import ROOT

EVENTRAY = str(Path(sys.executable).parent / "eventray")
TINY = SimulationSpec(n_customers=300, n_terminals=1000, n_days=40, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-input")
    write_monthly(simulate_transactions(TINY), out)
    return out


def _reference(tiny: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    transactions = pl.read_parquet(sorted(tiny.glob("*.parquet")))
    computed = handbook_features_batch(transactions).drop("TRANSACTION_ID")
    reference = transactions.select("TX_AMOUNT").hstack(computed)
    return transactions, reference.select(HANDBOOK_FEATURES)


def _assert_same_features(got: pl.DataFrame, want: pl.DataFrame, ties: int) -> None:
    """Counts equal, means and shares within float rounding, except rows of same-second ties."""
    assert list(got.columns) == list(want.columns) == list(FEATURES)
    differs = pl.DataFrame(
        {c: (got[c].cast(pl.Float64) - want[c].cast(pl.Float64)).abs() > 1e-9 for c in FEATURES})
    assert differs.select(pl.any_horizontal(pl.all()).sum()).item() <= ties


def test_per_event_windows_equal_the_pipelines_features(tiny: Path) -> None:
    transactions, reference = _reference(tiny)
    customers: dict[int, CustomerWindows] = {}
    terminals: dict[int, TerminalWindows] = {}
    micros = transactions["TX_DATETIME"].dt.epoch("us")
    rows = []
    for (c, t, amount, fraud), t_us in zip(transactions.select(
            "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD").iter_rows(), micros, strict=True):
        rows.append((amount, *calendar(t_us),
                     *customers.setdefault(c, CustomerWindows()).update(t_us, amount),
                     *terminals.setdefault(t, TerminalWindows()).update(t_us, fraud)))
    got = pl.DataFrame(rows, schema=list(FEATURES), orient="row")
    _assert_same_features(got, reference, ties=0)


def test_terminal_windows_do_not_depend_on_arrival_order_within_the_label_delay(tiny: Path) -> None:
    # In a dataflow a terminal's events arrive from every upstream worker, interleaved.
    transactions = pl.read_parquet(sorted(tiny.glob("*.parquet"))).with_columns(
        t_us=pl.col("TX_DATETIME").dt.epoch("us"))
    shuffled = transactions.with_columns(hour=pl.col("t_us") // 3_600_000_000).sample(
        fraction=1.0, shuffle=True, seed=1).sort("hour", maintain_order=True)
    results = []
    for order in (transactions, shuffled):
        terminals: dict[int, TerminalWindows] = {}
        rows = {tx: terminals.setdefault(t, TerminalWindows()).update(t_us, fraud)
                for tx, t, t_us, fraud in order.select("TRANSACTION_ID", "TERMINAL_ID", "t_us", "TX_FRAUD")
                .iter_rows()}
        results.append(rows)
    assert results[0] == results[1]


def test_batch_job_features_equal_the_pipelines_features(tiny: Path) -> None:
    transactions, reference = _reference(tiny)
    # Polars' rolling sums see every row of the same instant; the pipeline only the earlier ones.
    ties = transactions.select(pl.struct("CUSTOMER_ID", "TX_DATETIME").is_duplicated().sum()).item()
    _assert_same_features(batch_features(transactions), reference, ties=ties)


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EVENTRAY, "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_bad_arguments_print_usage_not_a_traceback() -> None:
    for args in (["--loads", "2"], ["--systems", "flink"], ["--config", "no/such.yaml"],
                 ["--config", "configs/events.yaml", "--input", "no/such/dir"]):
        result = _bench(*args)
        assert result.returncode == 2, result.stderr
        assert "usage:" in result.stderr or "no such" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_runs_every_system_and_reports_ratios(tiny: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = _bench("--work", str(work), "--input", str(tiny), "--latency-seconds", "1",
                    "--warmup-seconds", "2", "--per-event-seconds", "2", "--loads", "0.2,0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    doc = json.loads((work / "bench.json").read_text())
    assert (work / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    systems = doc["systems"]
    assert list(systems) == ["eventray", "batch", "per_event", "bytewax"]
    rows = summary["input"]["transactions"]
    for name in ("eventray", "batch", "per_event"):
        assert systems[name]["available"], systems[name].get("reason")
        assert systems[name]["events_per_s"] > 0 and systems[name]["peak_pss_mb"] > 0
        assert systems[name]["ratio"] > 0
        assert systems[name]["events"] == rows or not systems[name]["complete"]
    assert systems["eventray"]["ratio"] == 1.0 and systems["eventray"]["peak_processes"] > 3
    assert systems["eventray"]["summary"]["alerts"] > 0  # alerts also routed back as events
    for name in ("eventray", "batch"):  # both scored every transaction and wrote alerts
        assert rows_written(work / "outputs" / name, "scores") == rows
        assert rows_written(work / "outputs" / name, "alerts") > 0
    bytewax = systems["bytewax"]
    assert (bytewax["available"] and bytewax["events"] == rows) or bytewax["reason"]
    # the same work: every system's 15 inputs equal eventray's stored ones (per-event: its prefix)
    stored = scores(work / "outputs" / "eventray")
    for name in ("per_event", "bytewax") if bytewax["available"] else ("per_event",):
        theirs = scores(work / "outputs" / name)
        joined = stored.join(theirs, on="TRANSACTION_ID", suffix="_theirs")
        assert joined.height == theirs.height
        _assert_same_features(joined.select(FEATURES),
                              joined.select(pl.col(f"{c}_theirs").alias(c) for c in FEATURES), ties=0)
    assert [p["load"] for p in doc["latency"]["points"]] == [0.2, 0.8]
    for point in doc["latency"]["points"]:
        assert 0 <= point["latency_ms"]["p50"] <= point["latency_ms"]["p99"]
    table = result.stdout
    for label in ("eventray (Ray)", "Polars/sklearn batch", "per-event design", "Bytewax 0.21", "p99 ms"):
        assert label in table


def scores(out: Path) -> pl.DataFrame:
    return pl.scan_parquet(out / "scores" / "**" / "*.parquet", hive_partitioning=True).collect()


def rows_written(out: Path, table: str) -> int:
    return pl.scan_parquet(out / table / "**" / "*.parquet").select(pl.len()).collect().item()
