"""The keyed Ray runtime seen from outside, on a real cluster.

A real head (``ray start --head --block``, a child of this module, on 127.0.0.1 with token
auth) serves every test here but the multi-node one, which runs its own three-node cluster.
Everything Ray-side runs in subprocesses: the CLI as a user runs it, and the helper scripts
of ``cluster_scripts/`` as a second driver (an operator killing actors, a memory probe).

What is proved: partition actors killed by name from outside mid-run, a run submitted as a
Ray job, and a worker node killed mid-run each leave a store equal to a fault-free run's;
and a source many times faster than processing keeps the driver's and the actor's memory
flat (backpressure). Measurements are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from tests.support import EVENTRAY, ROOT, eventray, summary_of, unscored_fraud_config

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

SCRIPTS = Path(__file__).parent / "cluster_scripts"
RAY = str(Path(sys.executable).parent / "ray")
#: Every process of these tests: loopback addresses only, token auth named explicitly.
RAY_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PYTHONWARNINGS": "ignore"}
HEAD_OBJECT_STORE = 400 * 1024 * 1024
#: Columns that legitimately differ between two runs of the same input: the wall-clock time
#: of ingestion (``metadata.ingested_at`` of events, ``ingested_at`` of dead letters) and the
#: dead letters' ``date`` partition, which is that wall-clock time's date.
WALL_CLOCK = "ingested_at"


@dataclass(frozen=True)
class Head:
    gcs: str  # 127.0.0.1:PORT, for drivers
    dashboard: str  # http://127.0.0.1:PORT, for the Jobs API


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop_process_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process (``ray start`` drains and stops its node), then to whatever of
    its process group is left; SIGKILL only if that does not end them."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def wait_for_jobs_api(dashboard: str, head: subprocess.Popen, log: Path, wait_s: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + wait_s
    while True:
        assert head.poll() is None, log.read_text()[-3000:]
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return
        except Exception:  # not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """``ray start --head --block`` on 127.0.0.1, free ports, a private temp dir, 2 CPUs."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    temp_dir = Path(tempfile.mkdtemp(prefix="erh-"))  # short: Ray's socket paths are limited
    log = temp_dir / "head.log"
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
               "--metrics-export-port", str(metrics), "--num-cpus", "2",
               "--object-store-memory", str(HEAD_OBJECT_STORE), "--temp-dir", str(temp_dir),
               "--disable-usage-stats"]
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=RAY_ENV,
                                start_new_session=True)
    try:
        wait_for_jobs_api(f"http://127.0.0.1:{dashboard}", head, log)
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}")
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sim_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 simulated days (~78k transactions) and a file of 300 more a month later, 200 of
    them invalid (no customer, no timestamp): the runs store events and dead-letter some."""
    folder = tmp_path_factory.mktemp("sim")
    summary_of(eventray("simulate", "--out", str(folder), "--days", "8", "--seed", "11"))
    april = pl.read_parquet(folder / "transactions-2018-04.parquet")
    later = april.tail(300).with_row_index("i").with_columns(
        TRANSACTION_ID=pl.col("TRANSACTION_ID") + 10_000_000,
        TX_DATETIME=pl.col("TX_DATETIME") + pl.duration(days=30))
    later.with_columns(
        CUSTOMER_ID=pl.when(pl.col("i") % 3 == 0).then(None).otherwise("CUSTOMER_ID"),
        TX_DATETIME=pl.when(pl.col("i") % 3 == 1).then(None).otherwise("TX_DATETIME"),
    ).drop("i").write_parquet(folder / "transactions-2018-05-late.parquet")
    return folder


def run_on(head: Head, config: Path | str, data: Path, store: Path) -> dict[str, Any]:
    """``eventray run CONFIG --address HEAD``: its summary (the run must succeed)."""
    return summary_of(eventray("run", str(config), "--address", head.gcs, "--input", str(data),
                               "--store", str(store), "--no-progress"))


@dataclass(frozen=True)
class Reference:
    """A fault-free run: its summary and its store's tables (see comparable_tables)."""

    summary: dict[str, Any]
    tables: dict[str, pl.DataFrame]


@pytest.fixture(scope="module")
def fraud_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/fraud.yaml without a model (as a fresh clone, and a submitted job whose
    working dir leaves data/ out, run it): the same alerts (none) in every run here."""
    return unscored_fraud_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def fault_free(ray_head: Head, sim_input: Path, fraud_config: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The reference: configs/fraud.yaml on the head with nothing going wrong."""
    store = tmp_path_factory.mktemp("fault-free") / "S0"
    summary = run_on(ray_head, fraud_config, sim_input, store)
    assert summary["restarts"] == 0 and summary["dead_lettered"] == 200
    tables = comparable_tables(store)
    assert {"events", "deadletter"} <= set(tables)
    return Reference(summary, tables)


def comparable_tables(store: Path) -> dict[str, pl.DataFrame]:
    """Every table of a store, wall-clock columns dropped (see WALL_CLOCK), rows sorted by
    event id, then by every other column (a total order: scores have one row per event and
    step, dead letters may share an id)."""
    tables = {}
    for folder in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("_")):
        frame = pl.read_parquet(folder / "**" / "*.parquet", hive_partitioning=True)
        if WALL_CLOCK in frame.columns:
            frame = frame.drop(WALL_CLOCK, "date")
        if "metadata" in frame.columns:
            fields = [f.name for f in frame.schema["metadata"].fields if f.name != WALL_CLOCK]
            frame = frame.with_columns(pl.struct(
                [pl.col("metadata").struct.field(f) for f in fields]).alias("metadata"))
        tables[folder.name] = frame.sort(["event_id", *(c for c in frame.columns if c != "event_id")])
    return tables


def assert_same_run(summary: dict[str, Any], store: Path, reference: Reference) -> None:
    """The run counted what the fault-free run counted, and its store holds the same tables
    with the same rows (wall-clock columns aside)."""
    for count in ("events_in", "stored", "dead_lettered", "derived", "alerts"):
        assert summary[count] == reference.summary[count], count
    tables = comparable_tables(store)
    assert sorted(tables) == sorted(reference.tables)
    for name, expected in reference.tables.items():
        assert_frame_equal(tables[name], expected, check_exact=True)


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def wait_for_file(path: Path, process: subprocess.Popen, wait_s: float = 60) -> None:
    deadline = time.monotonic() + wait_s
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} not created in {wait_s} s"
        time.sleep(0.1)


def rows_in(data: Path) -> int:
    return pl.scan_parquet(data / "*.parquet").select(pl.len()).collect().item()


def run_killing_partitions(head: Head, config: Path, data: Path, store: Path, max_kills: int,
                           interval_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """configs/fraud.yaml on the head while kill_partitions.py kills partition actors by
    name from outside; returns the run's summary and the killer's report."""
    stop, ready = store.parent / f"{store.name}.stop", store.parent / f"{store.name}.ready"
    killer = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "kill_partitions.py"), "--address", head.gcs,
         "--partitions", "2", "--store", str(store), "--total", str(rows_in(data)),
         "--stop-file", str(stop), "--ready-file", str(ready), "--max-kills", str(max_kills),
         "--interval", str(interval_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV)
    try:
        wait_for_file(ready, killer)
        summary = run_on(head, config, data, store)
    finally:
        stop.touch()
        out, err = killer.communicate(timeout=120)
    assert killer.returncode == 0, err[-3000:]
    return summary, last_json(out)


def test_partitions_killed_from_outside_leave_the_fault_free_store(
        ray_head: Head, sim_input: Path, fraud_config: Path, fault_free: Reference,
        tmp_path: Path) -> None:
    summary, kills = run_killing_partitions(ray_head, fraud_config, sim_input, tmp_path / "S1",
                                            max_kills=4, interval_s=1.0)
    print(f"\nkills from outside: {kills}; restarts {summary['restarts']}; "
          f"elapsed {summary['elapsed_s']} s (fault-free {fault_free.summary['elapsed_s']} s)")
    assert kills["node_addresses"] == ["127.0.0.1"]
    assert kills["kills"] >= 3  # live actors killed by name, each a different process
    # Kills land before the run's last checkpoint, so the driver notices each; one that hits
    # an actor the driver has just started (not yet asked for its position) is recovered
    # within the same restart.
    assert 1 <= summary["restarts"] <= kills["kills"]
    assert_same_run(summary, tmp_path / "S1", fault_free)


def test_a_submitted_job_writes_the_fault_free_store(
        ray_head: Head, sim_input: Path, fault_free: Reference, tmp_path: Path) -> None:
    store = tmp_path / "S2"
    # From the checkout: `.` is shipped as the job's working dir (without .venv, .git, data);
    # the job's interpreter is named (--python defaults to this one), not the head's python.
    # Without data/ the job finds no model in data/registry: unscored, as the reference.
    result = eventray("submit", "configs/fraud.yaml", "--address", ray_head.dashboard,
                      "--input", str(sim_input), "--store", str(store))
    job = summary_of(result)
    print(f"\nsubmitted job {job['job_id']}: {job['status']}, run {job['summary']['elapsed_s']} s")
    assert job["status"] == "SUCCEEDED"
    assert job["summary"]["ray"] == "cluster"
    assert_same_run(job["summary"], store, fault_free)


def derived_config(tmp_path: Path, name: str, **changes: dict[str, Any]) -> Path:
    """configs/fraud.yaml (without a model) with some sections' keys replaced, written under
    ``tmp_path``."""
    config = yaml.safe_load(unscored_fraud_config(tmp_path).read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_worker_node_lost_mid_run_leaves_the_fault_free_store(
        sim_input: Path, fault_free: Reference, tmp_path: Path) -> None:
    # Smaller batches and a checkpoint every 3 of them: the node is lost after a committed
    # checkpoint, so the replacements restore state instead of starting empty. Four
    # partitions (the reference ran two) spread better; the store's content depends neither
    # on batch sizes nor on the number of partitions.
    config = derived_config(tmp_path, "fraud.yaml", source={"batch_size": 10_000},
                            runtime={"checkpoint_every": 3})
    store = tmp_path / "S3"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "multinode_run.py"), "--config", str(config),
         "--input", str(sim_input), "--store", str(store), "--partitions", "4"],
        capture_output=True, text=True, env=RAY_ENV, cwd=ROOT, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json(result.stdout)
    shown = {k: v for k, v in report.items() if k not in ("summary", "traceback")}
    print(f"\nmulti-node: {shown}; restarts {report.get('summary', {}).get('restarts')}")
    assert "error" not in report, report.get("traceback", report["error"])
    assert report["finished"] and report["node_addresses"] == ["127.0.0.1"]
    assert len(set(report["before"].values())) >= 2  # the partitions were spread over nodes
    removed = report["removed_node"]
    assert report["removed_partitions"] and report["first_checkpoint_rows"] > 0
    assert report["node_declared_dead"]
    assert sorted(report["after"]) == sorted(report["before"])  # every partition came back ...
    assert removed not in report["after"].values()  # ... on a node that is still there
    summary = report["summary"]
    assert summary["restarts"] >= len(report["removed_partitions"])
    assert_same_run(summary, store, fault_free)


#: One partition running the heavy anomaly step. What the driver may hold is bounded by the
#: runtime settings: 2 batches in flight, 2 queued, and the batches since the last checkpoint
#: (kept to resend after a restart, here at most 2): a few batches of 500 rows, whatever the
#: input's size.
BACKPRESSURE_CONFIG = """
name: backpressure
source:
  format: parquet
  name: transactions
  path: [{input}]
  pattern: "*.parquet"
  batch_size: 500
mapping:
  event_type: {{value: transaction.created}}
  timestamp: TX_DATETIME
  source: {{value: card-network}}
  payload: {{columns: all}}
event_types:
  transaction.created:
    key: CUSTOMER_ID
    version: 1
    payload: {{TRANSACTION_ID: int, TX_DATETIME: datetime, CUSTOMER_ID: int, TERMINAL_ID: int,
               TX_AMOUNT: float, NOTE: str}}
steps:
  - {{kind: anomaly, detector: knn_novelty, value: TX_AMOUNT, event_types: [transaction.created]}}
runtime:
  partitions: 1
  max_in_flight: 2
  max_queued_batches: 2
  checkpoint_every: 2
store: {{path: {store}}}
"""
#: Bytes of the free-text field of every backpressure input row: the input is ~250 MB in
#: memory, so a driver that buffered what the source reads ahead would show it.
NOTE_BYTES = 13_000


def source_rows_per_s(config: Path, passes: int = 3) -> float:
    """How fast the driver's side alone goes: read and normalise the whole input, no Ray
    (the best of a few passes: other processes share the machine)."""
    from pipelines.dedup import DuplicateFilter
    from pipelines.kinds import build_source
    from pipelines.normalise import Normaliser
    from pipelines.pipeline import load_pipeline
    from pipelines.sources import iter_batches

    spec = load_pipeline(config)
    best = 0.0
    for _ in range(passes):
        normaliser, duplicates, rows = Normaliser(spec), DuplicateFilter(), 0
        started = time.perf_counter()
        for raw in iter_batches(build_source(spec)):
            rows += normaliser.normalise(raw, duplicates).events.num_rows
        best = max(best, rows / (time.perf_counter() - started))
    return best


def quarters(values: list[float]) -> tuple[float, float]:
    """Medians of the first and the last quarter of a series."""
    q = max(1, len(values) // 4)
    return float(pl.Series(values[:q]).median()), float(pl.Series(values[-q:]).median())


def test_backpressure_keeps_memory_flat_when_the_source_outruns_processing(
        ray_head: Head, tmp_path: Path) -> None:
    summary_of(eventray("simulate", "--out", str(tmp_path / "sim"), "--days", "2", "--seed", "5"))
    data = tmp_path / "in"
    data.mkdir()
    rows = pl.read_parquet(tmp_path / "sim" / "*.parquet").select(
        "TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT",
        NOTE=pl.col("TRANSACTION_ID").cast(pl.String).str.pad_start(NOTE_BYTES, "x"))
    rows.write_parquet(data / "transactions.parquet", row_group_size=500)
    config = tmp_path / "backpressure.yaml"
    config.write_text(BACKPRESSURE_CONFIG.format(input=data, store=tmp_path / "store"))
    source_rate = source_rows_per_s(config)

    ready, pid_file = tmp_path / "sampler.ready", tmp_path / "driver.pid"
    sampler = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "sample_memory.py"), "--address", ray_head.gcs,
         "--driver-pid-file", str(pid_file), "--partitions", "1", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV)
    wait_for_file(ready, sampler)
    run = subprocess.Popen([EVENTRAY, "run", str(config), "--address", ray_head.gcs, "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV,
                           cwd=ROOT)
    pid_file.write_text(str(run.pid))
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    summary = last_json(out)
    sampled, sampler_err = sampler.communicate(timeout=120)
    assert sampler.returncode == 0, sampler_err[-3000:]
    memory = last_json(sampled)
    samples = [s for s in memory["samples"] if "actors" in s]  # the run: every actor answers

    mb = 1024 * 1024
    series = {"driver": [s["driver"] for s in samples],
              "actor": [s["actors"]["partition-0"] for s in samples]}
    measured: dict[str, Any] = {
        "source_rows_per_s": round(source_rate), "run_rows_per_s": summary["events_per_s"],
        "ratio": round(source_rate / summary["events_per_s"], 1), "batches": summary["batches"],
        "input_mb_in_memory": round(rows.estimated_size() / mb), "samples": len(samples),
        "sampled_s": round(samples[-1]["t"] - samples[0]["t"], 1) if samples else 0,
        "driver_uss_mb_before_reading": round(memory["before_reading"]["uss"] / mb)}
    for process, values in series.items():
        for kind in ("rss", "uss"):
            first, last = quarters([v[kind] / mb for v in values])
            measured[f"{process}_{kind}_mb"] = {"first_quarter": round(first), "last_quarter": round(last),
                                               "max": round(max(v[kind] for v in values) / mb)}
    print(f"\nbackpressure: {json.dumps(measured)}")
    for process, values in series.items():
        print(f"{process} USS MB over the run:", [round(v["uss"] / mb) for v in values])
    assert summary["events_in"] == rows.height and summary["dead_lettered"] == 0
    assert len(samples) >= 12, "the run was too short to sample its memory"
    input_mb = rows.estimated_size() / mb
    for process in series:
        uss, rss = measured[f"{process}_uss_mb"], measured[f"{process}_rss_mb"]
        # Flat: from the first to the last quarter of the run, neither process grows by
        # anything like the input's size. Unique memory (USS) gets the tighter bound: RSS also
        # counts the pages of the shared object store the process has touched, which grow as
        # objects land at new places in it.
        assert uss["last_quarter"] - uss["first_quarter"] < input_mb / 4, (process, measured)
        assert rss["last_quarter"] - rss["first_quarter"] < input_mb / 2, (process, measured)
    # Bounded: a driver reading ahead unchecked would take in the whole input within a second
    # (the source is many times faster), far above what it held before reading; bounded, it
    # holds a few of the input's ~40 batches at any time. The peak is taken while the run
    # reads (its actors alive): once they have ended the whole input has been read anyway,
    # and closing the run and Ray's session briefly takes ~50 MB more, which is not read-ahead.
    # It is the 95th percentile of the samples: a reader running ahead holds the input for
    # most of the run, while a single sample can catch a transient allocation (a sort, a
    # concatenation) of a few batches' size.
    # Measured: 100-125 MB above the driver's memory before reading (the batches queued and
    # in flight, the event-time buffer's and the normaliser's copies of the batch at hand),
    # flat from the first quarter to the last; a reader running ahead would hold ~244 MB
    # more. The bound sits between the two.
    peak = float(np.percentile([s["driver"]["uss"] for s in samples], 95)) / mb
    assert peak - memory["before_reading"]["uss"] / mb < input_mb * 0.65, measured
