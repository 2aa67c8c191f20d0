"""System (b): the same work as one Polars / scikit-learn batch job, in a single process.

Written as well as we can, independently of the streaming code (it does not use
``pipelines.features``): read every file at once, compute the handbook's 15 inputs with
Polars' keyed rolling sums (``rolling_sum_by(...).over(key)``; the terminal windows that end
7 days before the event are the difference of two rolling sums ending at it), score all
rows with one ``predict_proba`` call, and write ``events``, ``scores`` and ``alerts`` as
Parquet. Polars and the model use every core.

Run as ``python -m cluster.bench.batch_job --input F... --registry DIR --model NAME --out DIR``;
the last stdout line is a JSON result (``elapsed_s`` from the first read to the last write).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DAYS = (1, 7, 30)
DELAY_DAYS = 7
TIME = "TX_DATETIME"


def _rolling(column: pl.Expr, days: int, key: str) -> pl.Expr:
    return column.rolling_sum_by(TIME, f"{days}d").over(key)


def features(transactions: pl.DataFrame) -> pl.DataFrame:
    """The 15 model inputs, one row per transaction, in input order (time-sorted input)."""
    one = pl.col("_one")
    exprs = [pl.col("TX_AMOUNT"),
             (pl.col(TIME).dt.weekday() >= 6).cast(pl.Int64).alias("TX_DURING_WEEKEND"),
             (pl.col(TIME).dt.hour() <= 6).cast(pl.Int64).alias("TX_DURING_NIGHT")]
    for n in DAYS:
        count = _rolling(one, n, "CUSTOMER_ID")
        exprs += [count.cast(pl.Float64).alias(f"CUSTOMER_ID_NB_TX_{n}DAY_WINDOW"),
                  (_rolling(pl.col("TX_AMOUNT"), n, "CUSTOMER_ID") / count)
                  .alias(f"CUSTOMER_ID_AVG_AMOUNT_{n}DAY_WINDOW")]
    delayed_count = _rolling(one, DELAY_DAYS, "TERMINAL_ID")
    delayed_frauds = _rolling(pl.col("TX_FRAUD"), DELAY_DAYS, "TERMINAL_ID")
    for n in DAYS:
        count = _rolling(one, DELAY_DAYS + n, "TERMINAL_ID") - delayed_count
        frauds = _rolling(pl.col("TX_FRAUD"), DELAY_DAYS + n, "TERMINAL_ID") - delayed_frauds
        exprs += [count.cast(pl.Float64).alias(f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW"),
                  pl.when(count > 0).then(frauds / count).otherwise(0.0)
                  .alias(f"TERMINAL_ID_RISK_{n}DAY_WINDOW")]
    return transactions.with_columns(_one=pl.lit(1, pl.Int32)).select(*exprs)


def run(files: list[Path], estimator: Any, threshold: float, out: Path) -> dict[str, Any]:
    """Read, featurise, score and write; returns the result with its timing."""
    started = time.perf_counter()
    transactions = pl.read_parquet(files)
    inputs = features(transactions)
    scores = estimator.predict_proba(inputs.to_numpy())[:, 1]
    keys = transactions.select("TRANSACTION_ID", TIME, key=pl.col("CUSTOMER_ID").cast(pl.String))
    scored = pl.concat([keys,
                        inputs, pl.DataFrame({"score": np.asarray(scores, dtype=np.float64)})],
                       how="horizontal")
    alerts = scored.filter(pl.col("score") >= threshold).select(
        "TRANSACTION_ID", TIME, "key", "score", threshold=pl.lit(threshold))
    for name, frame in (("events", transactions), ("scores", scored), ("alerts", alerts)):
        (out / name).mkdir(parents=True, exist_ok=True)
        frame.write_parquet(out / name / "part-00000.parquet")
    elapsed = time.perf_counter() - started
    return {"system": "batch", "events": transactions.height, "alerts": alerts.height,
            "elapsed_s": round(elapsed, 3),
            "events_per_s": round(transactions.height / elapsed, 1) if elapsed else None,
            "complete": True}


def main(argv: list[str] | None = None) -> int:
    from cluster.bench.workload import load_estimator, system_arguments

    args = system_arguments("python -m cluster.bench.batch_job").parse_args(argv)
    estimator = load_estimator(args.registry, args.model)
    print(json.dumps(run(args.input, estimator, args.threshold, args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
