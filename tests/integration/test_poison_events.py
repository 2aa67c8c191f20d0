"""Poison events and failures outside any event, through `eventray run` on an embedded Ray.

A processor named in YAML (a module in a folder of its own) raises on chosen events: those
are dead-lettered as ``processor_error`` and everything else is processed as if they had
never been there. A batch that fails every time for a reason outside its events (the
environment), and a store that cannot be written, end the run with exit code 2 and one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

EVENTRAY = str(Path(sys.executable).parent / "eventray")
N_EVENTS = 3_000
#: Event numbers whose amount is negative: a few, and the whole last source batch (each
#: partition then gets a batch of poison events only).
POISON = {17, 250, 251, 1_234, *range(2_800, 3_000)}

PROCESSORS = '''
"""A stateful tally that raises on negative amounts (after counting them: partial state),
and a check that fails whenever the environment says so."""
import pyarrow.compute as pc


class Tally:
    def __init__(self):
        self.counts = {}

    def process(self, events):
        out = []
        for row in events.to_pylist():
            customer = row["key"]
            self.counts[customer] = self.counts.get(customer, 0) + 1
            if row["data"]["amount"] < 0:
                raise ValueError(f"negative amount in {row['data']['order_id']}")
            out.append({"event_type": "order.tallied", "timestamp": row["timestamp"],
                        "key": customer, "data": {"order_id": row["data"]["order_id"],
                                                  "count": self.counts[customer]}})
        return out

    def snapshot(self):
        return self.counts

    def restore(self, state):
        self.counts = dict(state)


def quota(events):
    amounts = pc.struct_field(events.column("data"), "amount")
    if pc.any(pc.greater_equal(amounts, 10_000)).as_py():
        raise OSError("disk quota exceeded")
'''


def write_orders(path: Path, n: int, skip: set[int] = frozenset(), big: int | None = None) -> None:
    lines = []
    for i in range(n):
        if i in skip:
            continue
        amount = -5.0 if i in POISON else 20_000.0 if i == big else float(10 + i % 90)
        lines.append(json.dumps({
            "eventId": f"e{i}", "eventType": "order.created",
            "timestamp": f"2025-03-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "source": "shop", "data": {"order_id": f"o{i}", "customer": f"c{i % 13}",
                                       "amount": amount}}))
    path.write_text("\n".join(lines) + "\n")


def write_config(folder: Path, step: dict, partitions: int, batch_size: int) -> Path:
    config = {
        "name": "orders",
        "source": {"format": "jsonl", "name": "shop", "path": ["orders.jsonl"],
                   "batch_size": batch_size},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "source": "source", "payload": {"json": "data"}},
        "event_types": {
            "order.created": {"key": "customer", "payload": {
                "order_id": "str", "customer": "str", "amount": "float"}},
            "order.tallied": {"key": "customer", "payload": {"order_id": "str", "count": "int"}},
        },
        "steps": [{"kind": "python", "event_types": ["order.created"], **step}],
        "runtime": {"partitions": partitions, "checkpoint_every": 3},
    }
    path = folder / f"orders-{step['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def eventray_run(config: Path, store: Path, orders: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EVENTRAY, "run", str(config), "--store", str(store), "--input", str(orders),
         "--no-progress"], cwd=config.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})


def table(store: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(store / name / "**" / "*.parquet", hive_partitioning=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("outside")
    (folder / "order_checks.py").write_text(textwrap.dedent(PROCESSORS))
    return folder


@pytest.mark.slow
def test_events_a_processor_raises_on_are_dead_lettered_and_the_rest_processed(
        folder: Path, tmp_path: Path) -> None:
    config = write_config(folder, {"name": "tally", "function": "order_checks:Tally"},
                          partitions=2, batch_size=200)
    write_orders(tmp_path / "orders.jsonl", N_EVENTS)
    write_orders(tmp_path / "clean.jsonl", N_EVENTS, skip=POISON)
    result = eventray_run(config, tmp_path / "store", tmp_path / "orders.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    clean = eventray_run(config, tmp_path / "clean", tmp_path / "clean.jsonl")
    assert clean.returncode == 0, clean.stderr[-3000:]

    poison_ids = {f"e{i}" for i in POISON}
    dead = table(tmp_path / "store", "deadletter")
    assert set(dead["event_id"]) == poison_ids and dead.height == len(POISON)
    assert set(dead["reason"]) == {"processor_error"}
    assert dead["message"].str.starts_with("step 'tally' raised ValueError: negative amount in o").all()
    assert summary["dead_lettered"] == len(POISON)
    assert summary["reasons"] == {"processor_error": len(POISON)}
    n_good = N_EVENTS - len(POISON)
    assert summary["events_in"] == N_EVENTS and summary["derived"] == n_good
    assert summary["stored"] == 2 * n_good  # every good order and its tally; the check held

    events = table(tmp_path / "store", "events")
    assert not poison_ids & set(events["event_id"])
    columns = ["event_id", "event_type", "timestamp", "key", "data"]
    expected = table(tmp_path / "clean", "events").select(columns).sort("event_id")
    assert events.select(columns).sort("event_id").equals(expected)  # tallies as if absent


@pytest.mark.slow
def test_a_batch_failing_every_time_after_a_checkpoint_ends_the_run_with_exit_2(
        folder: Path, tmp_path: Path) -> None:
    config = write_config(folder, {"name": "quota", "function": "order_checks:quota"},
                          partitions=1, batch_size=100)
    write_orders(tmp_path / "orders.jsonl", 1_000, skip=POISON, big=450)  # in batch 4
    started = time.monotonic()
    result = eventray_run(config, tmp_path / "store", tmp_path / "orders.jsonl")
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "partition-0 failed batch 4 6 times in a row" in lines[0]
    assert "OSError: disk quota exceeded" in lines[0]
    assert elapsed < 180
    assert not (tmp_path / "store" / "deadletter").exists()  # not poison: nothing dead-lettered


@pytest.mark.slow
def test_a_store_that_cannot_be_written_ends_the_run_with_exit_2_and_one_line(
        folder: Path, tmp_path: Path) -> None:
    config = write_config(folder, {"name": "tally", "function": "order_checks:Tally"},
                          partitions=2, batch_size=200)
    write_orders(tmp_path / "orders.jsonl", 1_000, skip=POISON)
    store = tmp_path / "store"
    store.mkdir()
    (store / "events").write_text("a file where the events folder should be")
    started = time.monotonic()
    result = eventray_run(config, store, tmp_path / "orders.jsonl")
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    # store writes are group-committed: the first commit, and failure, is the checkpoint's
    assert "failed checkpoint 1 6 times in a row" in lines[0] and "events" in lines[0], lines[0]
    assert elapsed < 180
