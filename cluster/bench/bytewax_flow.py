"""System (d): the fraud workload as a Bytewax 0.21 dataflow (run inside the bench's Bytewax venv).

This file runs under the interpreter of the virtual environment that
:mod:`cluster.bench.bytewax_env` builds (bytewax, numpy, pyarrow, scikit-learn, skops), so
it imports none of our packages: the per-key window state comes from the standard-library
module ``keyed_windows.py`` beside it, imported by path.

The dataflow, written the way Bytewax's documentation builds keyed stateful flows::

    input (one partition: the files in order, 10k-row batches)
      -> key_on CUSTOMER_ID -> stateful_map (customer windows)
      -> key_on TERMINAL_ID -> stateful_map (terminal windows, 7-day label delay)
      -> flat_map_batch (one predict_proba per engine batch)
      -> output (Parquet: events, scores, alerts, every 50k rows per worker)

The model scores each engine batch on one thread (faster than OpenMP's threads on batches
this small, measured). Run as ``PYTHON bytewax_flow.py --input F... --model DIR --out DIR
[--processes N]``. With N > 1 it runs N processes of one worker each, talking over
127.0.0.1: faster, but not the same work. A terminal's events then reach the terminal
stage from every customer-stage worker, interleaved with no bound on the disorder
(Bytewax keeps order only per upstream worker), so some terminal windows miss rows that
have not arrived yet (0.5 % of the handbook's rows measured). One process is the default. The last stdout line
is a JSON result.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import skops.io as sio
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import cluster_main, run_main
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from keyed_windows import DAY_US, FEATURES, CustomerWindows, TerminalWindows, calendar  # noqa: E402

COLUMNS = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD")
FLUSH_ROWS = 50_000


def build_flow(files: list[str], model_dir: str, out: str, threshold: float) -> Any:
    """The dataflow (defining it runs nothing)."""
    flow = Dataflow("fraud")
    txs = op.input("transactions", flow, ParquetSource(files))
    by_customer = op.key_on("by_customer", txs, lambda tx: str(tx[2]))
    with_customer = op.key_rm("customer_done", op.stateful_map("customer_windows", by_customer, _customer))
    by_terminal = op.key_on("by_terminal", with_customer, lambda tx: str(tx[0][3]))
    enriched = op.key_rm("terminal_done", op.stateful_map("terminal_windows", by_terminal, _terminal))
    scored = op.flat_map_batch("score", enriched, Scorer(model_dir))
    op.output("store", scored, ParquetSink(out, threshold))
    return flow


def _customer(state: CustomerWindows | None, tx: tuple) -> tuple[CustomerWindows, tuple]:
    state = state or CustomerWindows()
    return state, (tx, state.update(tx[1], tx[4]))


def _terminal(state: TerminalWindows | None, item: tuple) -> tuple[TerminalWindows, tuple]:
    state = state or TerminalWindows()
    tx, customer = item
    return state, (tx, (tx[4], *calendar(tx[1]), *customer, *state.update(tx[1], tx[5])))


class Scorer:
    """Scores a whole engine batch with one ``predict_proba`` call."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.estimator: Any = None

    def __call__(self, batch: list[tuple]) -> list[tuple]:
        if self.estimator is None:
            # Engine batches are small: OpenMP's threads cost more than they bring (measured).
            threadpool_limits(1)
            self.estimator = load_model(self.model_dir)
        if not batch:
            return []
        scores = self.estimator.predict_proba(np.array([features for _, features in batch]))[:, 1]
        return [(tx, features, float(s)) for (tx, features), s in zip(batch, scores, strict=True)]


def load_model(model_dir: str) -> Any:
    """The estimator of one registry version, trusting only the types the registry fixes in
    code (``models.registry.TRUSTED_TYPES``, repeated here: this file imports none of our
    packages), never what a file beside the artifact lists."""
    path = Path(model_dir) / "model.skops"
    needed = sio.get_untrusted_types(file=path)
    if refused := sorted(set(needed) - _TRUSTED_TYPES):
        raise ValueError(f"refusing untrusted types: {', '.join(refused)}")
    return sio.load(path, trusted=needed)


_TRUSTED_TYPES = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils._bunch.Bunch",
})


class ParquetPartition(StatefulSourcePartition):
    """Reads the files in order, one 10k-row batch per call; the position is its snapshot."""

    def __init__(self, files: list[str], skip: int) -> None:
        self.batches = _batches(files)
        self.position = 0
        for _ in range(skip):
            self.next_batch()

    def next_batch(self) -> list[tuple]:
        rows = next(self.batches)  # StopIteration ends the input
        self.position += 1
        return rows

    def snapshot(self) -> int:
        return self.position


class ParquetSource(FixedPartitionedSource):
    """The files in order as one partition (one key's events must stay in order)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def list_parts(self) -> list[str]:
        return ["all"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> ParquetPartition:
        return ParquetPartition(self.files, resume_state or 0)


def _batches(files: list[str]):
    """The files' rows as tuples, in batches of at most 10k rows and one day of event time.

    A stateful operator emits an engine batch grouped by key, so a terminal's events reach
    the terminal stage out of order by up to a batch's time span: one day keeps that below
    the 7-day label delay, which the terminal windows tolerate exactly.
    """
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000, columns=list(COLUMNS)):
            micros = batch.column("TX_DATETIME").cast(pa.timestamp("us")).cast(pa.int64())
            columns = [batch.column(c).to_pylist() for c in COLUMNS]
            columns[1] = micros.to_pylist()
            days = (micros.to_numpy() // DAY_US).tolist()
            rows = list(zip(*columns, strict=True))
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or days[i] != days[start]:
                    yield rows[start:i]
                    start = i


class ParquetSinkPartition(StatelessSinkPartition):
    """Buffers scored rows and writes the three tables every ``FLUSH_ROWS`` rows."""

    def __init__(self, out: str, worker: int, threshold: float) -> None:
        self.out, self.worker, self.threshold = Path(out), worker, threshold
        self.rows: list[tuple] = []
        self.files = 0

    def write_batch(self, items: list[tuple]) -> None:
        self.rows += items
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            _write_tables(self.rows, self.out, f"w{self.worker}-{self.files:05d}", self.threshold)
            self.files += 1
            self.rows = []

    def close(self) -> None:
        self.flush()


class ParquetSink(DynamicSink):
    """Every worker writes its own files."""

    def __init__(self, out: str, threshold: float) -> None:
        self.out, self.threshold = out, threshold

    def build(self, step_id: str, worker_index: int, worker_count: int) -> ParquetSinkPartition:
        return ParquetSinkPartition(self.out, worker_index, self.threshold)


def _write_tables(rows: list[tuple], out: Path, part: str, threshold: float) -> None:
    txs = list(zip(*(tx for tx, _, _ in rows), strict=True))
    events = pa.table({name: list(values) for name, values in zip(COLUMNS, txs, strict=True)})
    features = list(zip(*(f for _, f, _ in rows), strict=True))
    scores = pa.table({"TRANSACTION_ID": events["TRANSACTION_ID"], "key": pa.array(txs[2]).cast(pa.string()),
                       **{name: list(col) for name, col in zip(FEATURES, features, strict=True)},
                       "score": [s for _, _, s in rows]})
    alerts = scores.select(["TRANSACTION_ID", "key", "score"]).filter(
        pc.greater_equal(scores["score"], threshold))
    for name, table in (("events", events), ("scores", scores), ("alerts", alerts)):
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / name / f"part-{part}.parquet")


def _process(args: argparse.Namespace, addresses: list[str], proc_id: int) -> None:
    flow = build_flow([str(f) for f in args.input], str(args.model), str(args.out), args.threshold)
    cluster_main(flow, addresses, proc_id, worker_count_per_proc=1)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the flow to the end of its input; returns the result with its timing."""
    started = time.perf_counter()
    if args.processes == 1:
        run_main(build_flow([str(f) for f in args.input], str(args.model), str(args.out), args.threshold))
    else:
        addresses = [f"127.0.0.1:{port}" for port in _free_ports(args.processes)]
        procs = [multiprocessing.get_context("spawn").Process(target=_process, args=(args, addresses, i))
                 for i in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a bytewax process failed: exit codes {[p.exitcode for p in procs]}")
    elapsed = time.perf_counter() - started

    events = sum(pq.ParquetFile(f).metadata.num_rows for f in (args.out / "events").glob("*.parquet"))
    return {"system": "bytewax", "events": events, "elapsed_s": round(elapsed, 3),
            "events_per_s": round(events / elapsed, 1) if elapsed else None,
            "processes": args.processes, "complete": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bytewax_flow.py")
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a registry version's directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
