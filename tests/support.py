"""What several test modules share: paths, runs of the CLI, fault injection, the fraud
application's specs and oracles, normalisation inputs, and the order example.

Fixtures stay in ``tests/conftest.py``; the functions, classes and constants that more than
one test module uses live here, so no test module imports another. Data builders with a
module of their own (``tests/fraud_store.py``, ``tests/seed_events.py``) stay there.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import yaml

from cluster.partitions import NAMESPACE, RayPartitions
from models.fraud import make_model
from models.registry import ModelRegistry
from pipelines.dedup import DuplicateFilter
from pipelines.envelope import DEADLETTER_SCHEMA
from pipelines.event_ids import EVENTRAY_NAMESPACE
from pipelines.fraud.features import HANDBOOK_FEATURES, handbook_features_batch
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
from pipelines.normalise import Normalised, Normaliser
from pipelines.pipeline import load_pipeline
from pipelines.sources import RawBatch
from pipelines.spec import PipelineSpec
from pipelines.testing import FakeClock

# --- Paths ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HANDBOOK = SHARED_DATA / "fraud-handbook"


def unscored_fraud_config(directory: Path) -> Path:
    """configs/fraud.yaml as a fresh clone runs it: its model registry empty (features and
    label events, no scores or alerts), whatever ``make demo`` left in data/registry."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    for step in config["steps"]:
        if "model" in step:
            step["model"]["registry"] = str(directory / "empty-registry")
    path = directory / "fraud.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class HandbookRun:
    """The session's run of the fraud pipeline over the handbook (``handbook_run`` fixture):
    its config (no model), its store, and the summary line it printed. Read, never written."""

    config: Path
    store: Path
    summary: dict[str, Any]

    def copy_store(self, into: Path) -> Path:
        """A private copy of the store to write into. ``copy2`` keeps every file's size and
        mtime, which the commit log checks its records against, so ``as_of`` reads the copy
        as it reads the original."""
        return Path(shutil.copytree(self.store, into, copy_function=shutil.copy2))


# --- The CLI as a user runs it: a subprocess ----------------------------------------------


EVENTRAY = str(Path(sys.executable).parent / "eventray")


def eventray(*args: str, cwd: Path = ROOT, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EVENTRAY, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1])


def scan(store: Path, table: str) -> pl.DataFrame:
    return pl.scan_parquet(store / table / "**" / "*.parquet", hive_partitioning=True).collect()


# --- Keyed runs over numbered events ------------------------------------------------------


def numbered_events(path: Path, keys: int, per_key: int, seed: int = 0) -> None:
    """Events of many keys, each key's events numbered 0.. in file order, interleaved."""
    rng = np.random.default_rng(seed)
    owners = rng.permutation(np.repeat(np.arange(keys), per_key))
    counters = np.zeros(keys, dtype=int)
    lines = []
    for i, k in enumerate(owners):
        lines.append(json.dumps({
            "eventId": f"e{i}", "eventType": "iot.reading",
            "timestamp": 1_700_000_000 + i, "correlationId": f"key-{k}",
            "data": {"seq": int(counters[k])}}))
        counters[k] += 1
    path.write_text("\n".join(lines) + "\n")


def spec_for(tmp_path: Path, partitions: int, batch_size: int):
    return load_pipeline(ROOT / "configs" / "events.yaml", {
        "source": {"path": [str(tmp_path / "in.jsonl")], "batch_size": batch_size},
        "runtime": {"partitions": partitions, "max_in_flight": 2}})


def stored_in_apply_order(store: Path) -> pl.DataFrame:
    """Events in the order partitions applied them, as far as the store records it.

    Files sort by name, ``part-<writer>-<seq>``: a writer's batches in sequence. A batch is
    stored one file per (event type, date), all of the same name, and no file says where its
    rows sat in the batch; so the order is exact across batches and within one file, but
    between two files of one batch it is only the files' paths. Compare events of different
    types by their batch: columns ``writer`` and ``batch`` (the batch's sequence number).
    """
    files = sorted((store / "events").rglob("*.parquet"), key=lambda p: (p.name, p))
    frames = []
    for path in files:
        writer, batch = path.stem.removeprefix("part-").rsplit("-", 1)
        frames.append(pl.read_parquet(path).with_columns(
            file=pl.lit(path.name), writer=pl.lit(writer), batch=pl.lit(int(batch))))
    return pl.concat(frames).with_columns(
        seq=pl.col("data").struct.field("json").str.json_path_match("$.seq").cast(pl.Int64))


# --- Faults: actors killed from outside, a driver killed and resumed ----------------------


class FaultyPartitions(RayPartitions):
    """Ray partitions that do something to one of their own actors after some submits:
    ``fault(submitted, partition)`` runs after every batch is handed over."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.submitted = 0

    def submit(self, partition: int, seq: int, rows: pa.Table) -> None:
        super().submit(partition, seq, rows)
        self.submitted += 1
        self.fault(self.submitted, partition)

    def fault(self, submitted: int, partition: int) -> None:
        raise NotImplementedError


class KillingPartitions(FaultyPartitions):
    """Kills one of its own actors by name, the way an operator would, every few batches."""

    def __init__(self, *args: object, kill_every: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.kill_every, self.kills = kill_every, 0

    def fault(self, submitted: int, partition: int) -> None:
        if submitted % self.kill_every == 0:
            victim = (submitted // self.kill_every) % len(self.actors)
            self._ray.kill(self._ray.get_actor(self.ray_name(victim), namespace=NAMESPACE))
            self.kills += 1


def files_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted((store).rglob("*.parquet"))}


def crash_resume_and_rerun(command: list[str], tmp_path: Path, manifest_wait_s: float,
                           timeout_s: float) -> None:
    """Run ``command`` into ``tmp_path/crashed``, SIGKILL it after its second checkpoint,
    ``--resume`` it to the end, and run it again fault-free into ``tmp_path/clean``."""
    # Its own session: the kill takes the driver and its embedded Ray down together,
    # like a lost machine, and leaves no orphan behind.
    driver = subprocess.Popen([*command, "--store", str(tmp_path / "crashed")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    manifests = tmp_path / "crashed" / "_checkpoints"
    deadline = time.monotonic() + manifest_wait_s
    while len(list(manifests.rglob("manifest-*.json"))) < 2 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # no clean-up of any kind
    driver.wait()
    resumed = subprocess.run([*command, "--store", str(tmp_path / "crashed"), "--resume"],
                             capture_output=True, text=True, timeout=timeout_s)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"resumed": true' in resumed.stdout
    clean = subprocess.run([*command, "--store", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=timeout_s)
    assert clean.returncode == 0, clean.stderr[-2000:]


# --- The fraud application's pipeline, in process -----------------------------------------


FEATURES = [c for c in handbook_features_batch(
    simulate_transactions(SimulationSpec(n_customers=5, n_terminals=5, n_days=1))).columns
    if c != "TRANSACTION_ID"]


def fraud_spec(**changes: object) -> PipelineSpec:
    raw = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    raw.update(changes)
    return PipelineSpec.model_validate(raw)


def normalised_batches(spec: PipelineSpec, table: pa.Table, size: int) -> list[pa.Table]:
    normaliser = Normaliser(spec, FakeClock().now)
    out = []
    for start in range(0, table.num_rows, size):
        records = table.slice(start, size).combine_chunks().to_batches()[0]
        raw = RawBatch("transactions", "t.parquet", np.arange(start, start + records.num_rows), records)
        result = normaliser.normalise(raw)
        assert result.deadletters.num_rows == 0
        out.append(result.events)
    return out


def mismatches(online: pl.DataFrame, offline: pl.DataFrame,
               features: Sequence[str] = FEATURES) -> dict[str, int]:
    """Per feature, how many transactions' online and offline values differ."""
    joined = offline.join(online, on="TRANSACTION_ID", suffix="_online")
    assert joined.height == offline.height == online.height
    return {c: joined.filter(pl.col(c).cast(pl.Float64) != pl.col(f"{c}_online").cast(pl.Float64)).height
            for c in features}


def train_into(registry: Path, table: pa.Table, seed: int, model: str = "logistic_regression") -> int:
    frame = handbook_features_batch(table).join(
        pl.from_arrow(table).select("TRANSACTION_ID", "TX_AMOUNT", "TX_FRAUD"), on="TRANSACTION_ID")
    params = {"max_iter": 30} if model == "hist_gradient_boosting" else {}
    fitted = make_model(model, seed=seed, **params).fit(frame)
    created = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return ModelRegistry(registry).save(fitted, name="fraud", created_at=created)


# --- Parity with the fraud handbook's published features ----------------------------------


def parity_report(transactions: pl.DataFrame, published: pl.DataFrame, online: pl.DataFrame) -> pl.DataFrame:
    """Per month: rows, rows equal on all 15 inputs, excluded rows, and the rest's mismatches."""
    ties = transactions.select(
        "TRANSACTION_ID", "CUSTOMER_ID",
        (pl.len().over("CUSTOMER_ID", "TX_DATETIME") > 1).alias("customer_tie"),
        (pl.len().over("TERMINAL_ID", "TX_DATETIME") > 1).alias("terminal_tie"),
        pl.col("TX_DATETIME").dt.month().alias("month"),
    )
    joined = published.join(online, on="TRANSACTION_ID", how="left", suffix="_online")
    joined = joined.join(ties, on="TRANSACTION_ID")
    assert joined.height == published.height and joined["TX_DURING_NIGHT_online"].null_count() == 0
    same = {c: pl.col(c) == pl.col(f"{c}_online") for c in HANDBOOK_FEATURES}
    customer_cols = [c for c in HANDBOOK_FEATURES if c.startswith("CUSTOMER_ID")]
    other_cols = [c for c in HANDBOOK_FEATURES if c not in customer_cols]
    return joined.with_columns(
        all_equal=pl.all_horizontal(*same.values()),
        customer_equal=pl.all_horizontal(*(same[c] for c in customer_cols)),
        other_equal=pl.all_horizontal(*(same[c] for c in other_cols)),
        count_equal=pl.all_horizontal(*(same[c] for c in customer_cols if "_NB_TX_" in c)),
    )


# --- Normalisation: seed-schema lines and fraud rows as source batches --------------------


CONFIGS = ROOT / "configs"
EVENTS_SPEC = load_pipeline(CONFIGS / "events.yaml")
FRAUD_SPEC = load_pipeline(CONFIGS / "fraud.yaml")
START = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
PART = "day-1.jsonl"


def seed_event(**changes: Any) -> dict[str, Any]:
    """An event in the seed's JSON Lines schema, shaped as the seed's example (version "1.0");
    a change to ``...`` removes the field."""
    event = {
        "eventId": "evt-1",
        "eventType": "user.login",
        "timestamp": "2024-05-01T10:00:00Z",
        "source": "web",
        "correlationId": "c7",
        "data": {"n": 1, "user": "u1"},
        "metadata": {"version": "1.0", "region": "us-east"},
    }
    for name, value in changes.items():
        if value is ...:
            event.pop(name)
        else:
            event[name] = value
    return event


def line(**changes: Any) -> bytes:
    return json.dumps(seed_event(**changes)).encode()


def jsonl_batch(lines: list[bytes], offsets: list[int] | None = None, part: str = PART) -> RawBatch:
    offsets = list(range(len(lines))) if offsets is None else offsets
    return RawBatch("events", part, np.array(offsets, dtype=np.int64),
                    pa.record_batch({"line": pa.array(lines, pa.binary())}))


def run(
    normaliser: Normaliser, batch: RawBatch, duplicates: DuplicateFilter | None = None
) -> Normalised:
    """Normalise and check the invariants every batch keeps."""
    out = normaliser.normalise(batch, duplicates)
    assert out.read == batch.num_rows == out.events.num_rows + out.deadletters.num_rows
    assert out.events.schema == normaliser.schema
    assert out.deadletters.schema == DEADLETTER_SCHEMA
    for row in out.deadletters.to_pylist():
        assert row["reason"] and row["message"]
    return out


def normalise_lines(lines: list[bytes], spec: PipelineSpec = EVENTS_SPEC, **kwargs: Any) -> Normalised:
    return run(Normaliser(spec, FakeClock(START)), jsonl_batch(lines), **kwargs)


def reasons(out: Normalised) -> list[str]:
    return out.deadletters.column("reason").to_pylist()


def with_changes(spec: PipelineSpec, **sections: Any) -> PipelineSpec:
    """A copy of ``spec`` with whole top-level sections replaced."""
    return PipelineSpec.model_validate({**spec.model_dump(by_alias=True), **sections})


def derived_id(offset: int, source: str = "events", part: str = PART) -> str:
    return str(uuid.uuid5(EVENTRAY_NAMESPACE, f"{source}/{part}#{offset}"))


FRAUD_ROWS = {
    "TRANSACTION_ID": [0, 1],
    "TX_DATETIME": [dt.datetime(2018, 4, 1, 0, 0, 31), dt.datetime(2018, 4, 1, 0, 2, 10)],
    "CUSTOMER_ID": [596, 4961],
    "TERMINAL_ID": [3156, 3412],
    "TX_AMOUNT": [57.16, 81.51],
    "TX_TIME_SECONDS": [31, 130],
    "TX_TIME_DAYS": [0, 0],
    "TX_FRAUD": [0, 1],
    "TX_FRAUD_SCENARIO": [0, 1],
}


def fraud_parquet_batch() -> RawBatch:
    records = pa.record_batch({
        name: pa.array(values, pa.timestamp("us") if name == "TX_DATETIME" else None)
        for name, values in FRAUD_ROWS.items()})
    return RawBatch("transactions", "transactions-2018-04.parquet", np.arange(2), records)


def fraud_csv_batch(changes: dict[str, list[str | None]] | None = None,
                    drop: str | None = None) -> RawBatch:
    """The rows as a CsvSource gives them: every column a string."""
    text = {name: [str(v) for v in values] for name, values in FRAUD_ROWS.items()}
    text["TX_DATETIME"] = [v.isoformat(sep=" ") for v in FRAUD_ROWS["TX_DATETIME"]]
    text |= changes or {}
    if drop is not None:
        del text[drop]
    size = len(next(iter(text.values())))
    records = pa.record_batch({k: pa.array(v, pa.string()) for k, v in text.items()})
    return RawBatch("transactions", "tx.csv", np.arange(size), records)


# --- The order example (examples/orders.py) ------------------------------------------------


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (registered in ``sys.modules`` so its classes pickle)."""
    module_name = f"eventray_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def offline_order_outcomes(events: list[dict[str, Any]], stuck_after_hours: float,
                           large_payment: float) -> dict[str, pl.DataFrame]:
    """The order example's rules computed over the whole history at once, with Polars: the
    oracle its streaming processors must equal.

    Returns:
        ``order.fulfilled``, ``order.stuck`` and ``payment.large`` rows (``key``,
        ``timestamp`` and payload fields) and ``daily_revenue`` totals per (day, region).
    """
    frame = pl.DataFrame({
        "order_id": [e["data"]["order_id"] for e in events],
        "event_type": [e["eventType"] for e in events],
        "timestamp": [e["timestamp"] for e in events],
        "region": [e["metadata"]["region"] for e in events],
        "amount": [e["data"].get("amount") for e in events],
        "method": [e["data"].get("method") for e in events],
    }, schema_overrides={"amount": pl.Float64}).with_columns(
        pl.col("timestamp").str.to_datetime(time_unit="us", time_zone="UTC"))

    def first(event_type: str, column: str) -> pl.Expr:
        return pl.col(column).filter(pl.col("event_type") == event_type).first()

    orders = frame.sort("timestamp").group_by("order_id").agg(
        placed_at=first("order.placed", "timestamp"), region=first("order.placed", "region"),
        amount=first("order.placed", "amount"), paid_at=first("payment.received", "timestamp"),
        shipped_at=first("shipment.dispatched", "timestamp"), last_at=pl.col("timestamp").max())
    deadline = pl.col("paid_at") + pl.duration(microseconds=int(stuck_after_hours * 3.6e9))
    fulfilled = orders.filter(pl.all_horizontal(pl.col("placed_at", "paid_at", "shipped_at").is_not_null()))
    stuck = orders.filter(pl.col("paid_at").is_not_null() & (pl.col("last_at") > deadline)
                          & (pl.col("shipped_at").is_null() | (pl.col("shipped_at") > deadline)))
    payments = frame.filter(pl.col("event_type") == "payment.received")
    return {
        "order.fulfilled": fulfilled.select(
            key="order_id", timestamp="shipped_at", order_id="order_id", region="region", amount="amount",
            hours_to_ship=(pl.col("shipped_at") - pl.col("paid_at")).dt.total_seconds() / 3600.0),
        "order.stuck": stuck.select(key="order_id", timestamp=deadline, order_id="order_id",
                                    region="region", amount="amount", paid_at="paid_at"),
        "payment.large": payments.filter(pl.col("amount") >= large_payment).select(
            key="order_id", timestamp="timestamp", order_id="order_id", amount="amount", method="method"),
        "daily_revenue": payments.group_by(pl.col("timestamp").dt.date().alias("day"), "region").agg(
            payments=pl.len(), revenue=pl.col("amount").sum()),
    }


#: The event types the order example derives.
ORDER_DERIVED_TYPES = ("order.fulfilled", "order.stuck", "payment.large")


def stored_order_outcomes(events: pl.DataFrame, daily_revenue: pl.DataFrame,
                          payloads: dict[str, dict[str, str]]) -> dict[str, pl.DataFrame]:
    """The same shapes as :func:`offline_order_outcomes`, from a store's ``events`` and
    ``daily_revenue`` rows; ``payloads`` are the example's payload fields per event type."""
    found = {event_type: events.filter(pl.col("event_type") == event_type).select(
        "key", "timestamp", *[pl.col("data").struct.field(f) for f in payloads[event_type]])
        for event_type in ORDER_DERIVED_TYPES}
    found["daily_revenue"] = daily_revenue.group_by(
        pl.col("timestamp").dt.date().alias("day"), "region").agg(
        payments=pl.col("payments").sum(), revenue=pl.col("revenue").sum())
    return found


def assert_same_rows(got: pl.DataFrame, expected: pl.DataFrame, float_tolerance: float = 0.0) -> None:
    """Equal as sets of rows (sorted by every column), columns in ``expected``'s order."""
    from polars.testing import assert_frame_equal

    got = got.select(expected.columns)
    assert_frame_equal(got.sort(got.columns), expected.sort(expected.columns), check_dtypes=False,
                       check_exact=float_tolerance == 0.0, abs_tol=float_tolerance or 1e-12)
