"""The bench's input and model: the same transactions and the same fitted model for every system.

Input: the fraud handbook's ``transactions-*.parquet`` (``../shared/data/fraud-handbook``
beside the project) when present, otherwise the project's simulator writes monthly files
into the bench's work directory. The model: histogram gradient boosting
(``models.fraud.make_model("hist_gradient_boosting")``) fitted on the handbook's inputs of a
training window and saved to a model registry in the work directory; every system loads
that one artifact. Fitting is set-up, not timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

HANDBOOK_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fraud-handbook"
PATTERN = "transactions-*.parquet"
MODEL_FACTORY = "hist_gradient_boosting"
MODEL_NAME = MODEL_FACTORY  # the registry name when the pipeline config names none
TRAIN_DAYS = 7
WARMUP_DAYS = 37  # the longest window reach: earlier rows have incomplete features


@dataclass(frozen=True)
class Workload:
    """The input files (in time order), their row count and where they came from."""

    files: tuple[Path, ...]
    rows: int
    origin: str


def find_input(paths: list[Path] | None, work: Path, simulate_days: int, seed: int = 7) -> Workload:
    """The given files or folders, else the handbook's files, else simulated ones."""
    if paths:
        files = [f for p in paths for f in (sorted(p.glob(PATTERN)) if p.is_dir() else [p])]
        return _workload(files, "given")
    handbook = sorted(HANDBOOK_DIR.glob(PATTERN))
    if handbook:
        return _workload(handbook, "fraud-handbook")
    from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly

    target = work / f"simulated-{simulate_days}d-seed{seed}"
    if not sorted(target.glob(PATTERN)):
        write_monthly(simulate_transactions(SimulationSpec(n_days=simulate_days, seed=seed)), target)
    return _workload(sorted(target.glob(PATTERN)), f"simulator ({simulate_days} days, seed {seed})")


def _workload(files: list[Path], origin: str) -> Workload:
    if not files:
        from cluster.bench import BenchError

        raise BenchError("no input files found")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return Workload(tuple(files), rows, origin)


def train_model(workload: Workload, registry: Path, name: str = MODEL_NAME, seed: int = 0) -> dict:
    """Fit the bench's model (:data:`MODEL_FACTORY`) on a week of the input; save it as ``name``.

    The training week is the last full week whose labels are 7 days old at the input's end
    (the handbook's default split for its five months), after the windows' warm-up when the
    input is long enough; on tiny inputs, every row.
    """
    from models.fraud import make_model
    from models.registry import ModelRegistry
    from pipelines.fraud.features import handbook_features_batch

    frame = pl.read_parquet(list(workload.files))
    inputs = frame.select("TX_AMOUNT", "TX_FRAUD", "TX_DATETIME").hstack(
        handbook_features_batch(frame).drop("TRANSACTION_ID"))
    first, last = frame["TX_DATETIME"].min(), frame["TX_DATETIME"].max()
    end = last - dt.timedelta(days=14)
    start = end - dt.timedelta(days=TRAIN_DAYS)
    train = inputs.filter(pl.col("TX_DATETIME").is_between(start, end, closed="left"))
    if start < first + dt.timedelta(days=WARMUP_DAYS) or train["TX_FRAUD"].n_unique() < 2:
        train = inputs
    model = make_model(MODEL_FACTORY, seed=seed).fit(train)
    version = ModelRegistry(registry).save(
        model, created_at=dt.datetime(2018, 9, 1, tzinfo=dt.UTC), name=name,
        extra={"purpose": "eventray bench", "train_rows": train.height})
    return {"name": name, "version": version, "train_rows": train.height,
            "train_frauds": int(train["TX_FRAUD"].sum())}


def system_arguments(prog: str) -> argparse.ArgumentParser:
    """The command line every in-venv system takes: input, model, output, alert threshold."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--model", required=True, help="model name in the registry")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=0.5)
    return parser


def load_estimator(registry: Path, name: str) -> Any:
    """The scikit-learn estimator of the registry's latest ``name``."""
    from models.registry import ModelRegistry

    return ModelRegistry(registry).load(name).model.estimator
