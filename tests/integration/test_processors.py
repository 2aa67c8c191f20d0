"""User processors on Ray: a module outside the repository, named in YAML or registered in
Python, over events in the seed's JSON Lines schema with a typed payload.

The processor module is written to a folder of its own (not the repository, not an
installed package) and uses only the documented contract: a function of a
``pyarrow.Table`` of envelope rows that returns derived events as a list of dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from pipelines import Pipeline

EVENTRAY = str(Path(sys.executable).parent / "eventray")
N_EVENTS = 50_000
THRESHOLD = 900.0

PROCESSOR = '''
"""Flags large orders: the documented processor contract, nothing else."""
import pyarrow.compute as pc


def flag_big_orders(events):
    data = events.column("data")
    amount = pc.struct_field(data, "amount")
    big = events.filter(pc.greater(amount, 900.0))
    return [
        {"event_type": "order.flagged", "timestamp": row["timestamp"],
         "key": row["key"], "correlation_id": row["correlation_id"],
         "data": {"order_id": row["data"]["order_id"], "amount": row["data"]["amount"]}}
        for row in big.to_pylist()
    ]
'''


def seed_orders(path: Path, n: int, seed: int = 3) -> pl.DataFrame:
    """``n`` order events in the seed's schema, string versions, a typed payload."""
    rng = np.random.default_rng(seed)
    amounts = np.round(rng.gamma(2.0, 200.0, n), 2)
    customers = rng.integers(0, 2_000, n)
    start = np.datetime64("2025-03-01T00:00:00")
    times = start + np.sort(rng.integers(0, 30 * 86400, n)).astype("timedelta64[s]")
    rows = []
    with path.open("w") as out:
        for i in range(n):
            event = {
                "eventId": str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i)),
                "eventType": "order.created", "timestamp": f"{times[i]}Z", "source": "shop",
                "correlationId": f"c{customers[i]}",
                "data": {"order_id": f"o{i}", "customer": f"c{customers[i]}", "amount": float(amounts[i])},
                "metadata": {"version": "1.0", "region": "eu-west"},
            }
            out.write(json.dumps(event) + "\n")
            rows.append((f"o{i}", float(amounts[i])))
    return pl.DataFrame(rows, schema=["order_id", "amount"], orient="row")


def write_config(folder: Path) -> Path:
    config = {
        "name": "orders",
        "source": {"format": "jsonl", "name": "shop", "path": ["orders.jsonl"], "batch_size": 5000},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "source": "source", "correlation_id": "correlationId",
                    "payload": {"json": "data"}, "metadata": {"json": "metadata"}},
        "event_types": {
            "order.created": {"key": "customer", "payload": {
                "order_id": "str", "customer": "str", "amount": "float"}},
            "order.flagged": {"key": "customer", "payload": {"order_id": "str", "amount": "float"}},
        },
        "steps": [{"kind": "python", "name": "big-orders", "event_types": ["order.created"],
                   "function": "order_rules:flag_big_orders"}],
        "runtime": {"partitions": 2, "checkpoint_every": 4},
    }
    path = folder / "orders.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pl.DataFrame]:
    """A folder outside the repository with the processor module, a config and the events."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "order_rules.py").write_text(textwrap.dedent(PROCESSOR))
    orders = seed_orders(folder / "orders.jsonl", N_EVENTS)
    return folder, write_config(folder), orders


def flagged(store: Path) -> pl.DataFrame:
    events = pl.read_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True)
    return events.filter(pl.col("event_type") == "order.flagged")


def run_cli(config: Path, store: Path, cwd: Path) -> dict:
    result = subprocess.run(
        [EVENTRAY, "run", str(config), "--store", str(store), "--input", str(config.parent / "orders.jsonl"),
         "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_processor_outside_the_repository_runs_from_yaml_on_ray(
    outside: tuple[Path, Path, pl.DataFrame], tmp_path: Path
) -> None:
    folder, config, orders = outside
    elsewhere = tmp_path / "cwd"  # neither the repository nor the processor's folder
    elsewhere.mkdir()
    summary = run_cli(config, tmp_path / "s1", cwd=elsewhere)
    expected = orders.filter(pl.col("amount") > THRESHOLD)
    assert summary["ray"] == "embedded" and summary["events_in"] == N_EVENTS
    assert summary["derived"] == expected.height and summary["stored"] == N_EVENTS + expected.height
    got = flagged(tmp_path / "s1")
    # exactly the derived events it returned: one per big order, its payload typed
    assert got.height == expected.height
    data = got.select(pl.col("data").struct.field("order_id", "amount"))
    assert data.sort("order_id").equals(expected.sort("order_id"))
    assert got["source"].unique().to_list() == ["processor:big-orders"]
    assert got.schema["data"].to_schema()["amount"] == pl.Float64  # typed, not JSON text
    # a second run derives the same ids
    run_cli(config, tmp_path / "s2", cwd=elsewhere)
    again = flagged(tmp_path / "s2")
    assert set(again["event_id"]) == set(got["event_id"])
    ids = ["event_id", "key"]
    assert again.select(ids).sort("event_id").equals(got.select(ids).sort("event_id"))


@pytest.mark.slow
def test_the_same_processor_registered_through_the_python_api_runs_on_ray(
    outside: tuple[Path, Path, pl.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, config, orders = outside
    monkeypatch.syspath_prepend(str(folder))
    import order_rules  # the user's module, from its own folder

    raw = yaml.safe_load(config.read_text())
    raw["steps"] = []
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(raw))
    pipeline = Pipeline.from_yaml(bare).register_processor(
        "order.created", order_rules.flag_big_orders, name="big-orders")
    summary = pipeline.run(store=tmp_path / "api", runner="ray",
                           inputs=[str(folder / "orders.jsonl")])
    expected = orders.filter(pl.col("amount") > THRESHOLD)
    assert summary["ray"] in ("embedded", "existing") and summary["derived"] == expected.height
    got = flagged(tmp_path / "api")
    assert sorted(got.select(pl.col("data").struct.field("order_id"))["order_id"]) == \
        sorted(expected["order_id"])
