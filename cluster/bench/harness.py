"""The bench's driver: one input, one model, each system in its own measured process tree.

Order of a run: find the input and fit the model (not timed); run eventray at full speed,
then the batch job, the per-event design and Bytewax, each as a child process whose whole
tree's memory is sampled (:class:`~cluster.bench.memory.TreeMemory`) and whose last stdout
line is its JSON result; then eventray's paced replays at fractions of the peak it just
measured. Every system times itself from its first read to its last write (interpreter,
Ray and model start-up excluded); the wall time of each process is reported beside it.
A system that fails, or cannot be installed, is reported unavailable with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil

from cluster.bench.bytewax_env import ensure_bytewax
from cluster.bench.eventray_run import model_names
from cluster.bench.memory import TreeMemory
from cluster.bench.workload import MODEL_NAME, Workload, find_input, train_model

SYSTEMS = ("eventray", "batch", "per_event", "bytewax")
WARMUP_ROWS = 500
BENCH_DIR = Path(__file__).resolve().parent
Log = Callable[[str], None]
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Invalid|Interrupt|Exit)\b:?")


@dataclass(frozen=True)
class BenchOptions:
    """What to run and where; paths are made absolute by :func:`run_bench`.

    Attributes:
        config: The eventray pipeline config (system a).
        work: The bench's work directory (input copies, registry, stores, the Bytewax venv).
        inputs: Input files or folders; default the handbook's files, else simulated ones.
        systems: Which systems to run (eventray always, for the ratios).
        loads: Offered rates for latency, as fractions of eventray's measured peak.
        latency_seconds: How long each paced replay offers the measured events.
        warmup_seconds: The quiet time before them, for the pipeline's actors to start
            (events released in its first half are not measured).
        per_event_seconds: Time budget of the per-event design (it is measured on a prefix).
        simulate_days: Days of simulator data when there is no other input.
        bytewax_processes: Bytewax processes (one worker each); more than one reorders a
            terminal's events between the stages (see :mod:`cluster.bench.bytewax_flow`).
        alerts_table_only: eventray writes alerts to its alerts table only, as the other
            systems do, instead of also routing them back as events.
        timeout_s: Limit for any one system's process.
    """

    config: Path
    work: Path
    inputs: tuple[Path, ...] = ()
    systems: tuple[str, ...] = SYSTEMS
    loads: tuple[float, ...] = (0.2, 0.5, 0.8)
    latency_seconds: float = 8.0
    warmup_seconds: float = 30.0
    per_event_seconds: float = 30.0
    simulate_days: int = 61
    bytewax_processes: int = 1
    timeout_s: float = 1800.0
    model_seed: int = 0
    alerts_table_only: bool = False


def measure(name: str, command: list[str], work: Path, timeout_s: float) -> dict[str, Any]:
    """Run one system's process, sampling its tree's memory; its result, or why it failed."""
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with TreeMemory(proc.pid) as memory:
            try:
                out, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
    wall = round(time.perf_counter() - started, 3)
    facts = {"wall_s": wall, "peak_pss_mb": round(memory.peak_pss_mb, 1),
             "peak_rss_mb": round(memory.peak_rss_mb, 1), "peak_processes": memory.peak_processes,
             "log": str(log_path)}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"system": name, "available": False, **facts,
                "reason": f"exit code {proc.returncode}: {failure(log_path.read_text())}"}
    return {**json.loads(lines[-1]), "system": name, "available": True, **facts}


def failure(log: str, limit: int = 300) -> str:
    """The last exception line of a log (``Module.Error: message``), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if _EXCEPTION.match(line)]
    return (errors or lines or ["no output"])[-1][:limit]


def _eventray(options: BenchOptions, registry: Path) -> list[str]:
    command = [sys.executable, "-m", "cluster.bench.eventray_run", "--config", str(options.config),
               "--registry", str(registry)]
    return command + (["--alerts-table-only"] if options.alerts_table_only else [])


def _commands(options: BenchOptions, workload: Workload, registry: Path, model: dict[str, Any],
              log: Log) -> dict[str, list[str] | str]:
    """Each system's command line (or, for an unavailable one, the reason)."""
    files = [str(f) for f in workload.files]
    common = ["--input", *files, "--registry", str(registry), "--model", model["name"]]
    outputs = options.work / "outputs"
    commands: dict[str, list[str] | str] = {
        "eventray": [*_eventray(options, registry), "--store", str(outputs / "eventray"), "--input", *files],
        "batch": [sys.executable, "-m", "cluster.bench.batch_job", *common, "--out", str(outputs / "batch")],
        "per_event": [sys.executable, "-m", "cluster.bench.per_event", *common,
                      "--out", str(outputs / "per_event"), "--max-seconds", str(options.per_event_seconds)],
    }
    if "bytewax" in options.systems:
        env = ensure_bytewax(options.work, log)
        commands["bytewax"] = env.reason or [
            str(env.python), str(BENCH_DIR / "bytewax_flow.py"), "--input", *files,
            "--model", str(registry / model["name"] / str(model["version"])),
            "--out", str(outputs / "bytewax"), "--processes", str(options.bytewax_processes)]
    return commands


def _clear(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run_systems(options: BenchOptions, workload: Workload, registry: Path, model: dict[str, Any],
                log: Log) -> dict[str, dict[str, Any]]:
    """Every chosen system once, in order; results by system name."""
    results: dict[str, dict[str, Any]] = {}
    for name, command in _commands(options, workload, registry, model, log).items():
        if name not in options.systems and name != "eventray":
            continue
        if isinstance(command, str):
            results[name] = {"system": name, "available": False, "reason": command}
            log(f"{name}: unavailable: {command}")
            continue
        _clear(options.work / "outputs" / name)
        log(f"{name}: running")
        results[name] = measure(name, command, options.work, options.timeout_s)
        log(f"{name}: {_brief(results[name])}")
    return results


def _brief(result: dict[str, Any]) -> str:
    if not result.get("available"):
        return f"unavailable: {result.get('reason')}"
    return (f"{result['events']} events in {result['elapsed_s']} s = {result['events_per_s']} events/s, "
            f"peak {result['peak_pss_mb']} MB (PSS)")


@dataclass(frozen=True)
class PacedSlice:
    """One paced replay's input: a few warm-up rows, a quiet gap, then the measured rows."""

    rate: float
    speedup: float
    path: Path
    measured_rows: int


def write_slice(frame: pl.DataFrame, rate: float, seconds: float, warmup_s: float, path: Path) -> PacedSlice:
    """The replay of ``frame`` at ``rate`` events/s for ``seconds``, after a warm-up, as a
    folder of two files.

    The first :data:`WARMUP_ROWS` rows start the pipeline's actors; the rows of the next
    ``warmup_s`` seconds of replay (in event time at this speed-up) are left out, so the
    actors are ready before the measured rows (the ``seconds x rate`` that follow) are due.
    The warm-up rows are a file of their own, read as a batch of their own: in one batch
    with the measured rows, days later in event time, the source's first watermark took
    them for outliers of its start and dead-lettered them as late (the handbook's slices
    then measured nothing).
    """
    times = frame["TX_DATETIME"].dt.epoch("us").to_numpy()
    warm = min(WARMUP_ROWS, len(times) // 10)
    rows = int(min(len(times) - warm, max(1_000, rate * seconds)))
    span_s = max(float(times[warm + rows - 1] - times[warm]) / 1e6, 1e-3)
    speedup = span_s * rate / rows
    begin = int(np.searchsorted(times, times[warm] + warmup_s * speedup * 1e6))
    begin = min(begin, len(times) - rows)
    path.mkdir(parents=True, exist_ok=True)
    frame.slice(0, warm).write_parquet(path / "0-warm-up.parquet")
    frame.slice(begin, rows).write_parquet(path / "1-measured.parquet")
    return PacedSlice(rate, speedup, path, rows)


def run_latency(options: BenchOptions, workload: Workload, registry: Path, peak: float,
                log: Log) -> dict[str, Any]:
    """eventray's paced replays at ``options.loads`` x ``peak`` events/s, in one process."""
    out = options.work / "latency"
    out.mkdir(parents=True, exist_ok=True)
    frame = pl.read_parquet(list(workload.files), columns=None)
    slices = [write_slice(frame, load * peak, options.latency_seconds, options.warmup_seconds,
                          out / f"slice-{i}") for i, load in enumerate(options.loads)]
    store = options.work / "outputs" / "eventray-paced"
    _clear(store)
    command = [*_eventray(options, registry), "--store", str(store), "--input", str(slices[0].path),
               "--warmup-seconds", str(options.warmup_seconds / 2)]
    for piece in slices:
        command += ["--pace", f"{piece.rate:.3f}", f"{piece.speedup:.6g}", str(piece.path)]
    log(f"eventray latency: paced replays at {', '.join(f'{p.rate:.0f}' for p in slices)} events/s")
    result = measure("eventray-latency", command, options.work, options.timeout_s)
    for load, point in zip(options.loads, result.get("latency", []), strict=True):
        point["load"] = load
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libraries = ("ray", "polars", "pyarrow", "scikit-learn", "numpy")
    versions = {name: metadata.version(name) for name in libraries}
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=True),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], **versions}


def run_bench(options: BenchOptions, log: Log = lambda _: None) -> dict[str, Any]:
    """Run the bench; returns the whole result (also written to ``work/bench.json``)."""
    from cluster.bench.report import summarise

    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    options = BenchOptions(**{**options.__dict__, "work": work, "config": options.config.resolve(),
                              "inputs": tuple(p.resolve() for p in options.inputs)})
    started = time.perf_counter()
    facts = machine()
    workload = find_input(list(options.inputs) or None, work, options.simulate_days)
    log(f"input: {len(workload.files)} files, {workload.rows} transactions ({workload.origin})")
    registry = work / "registry"
    _clear(registry)
    names = model_names(options.config) or [MODEL_NAME]
    models = [train_model(workload, registry, name, seed=options.model_seed) for name in names]
    log(f"model: {models[0]['name']} v{models[0]['version']} fitted on {models[0]['train_rows']} rows")
    results = run_systems(options, workload, registry, models[0], log)
    latency = None
    if results["eventray"].get("available") and options.loads:
        latency = run_latency(options, workload, registry, results["eventray"]["events_per_s"], log)
    return summarise(options, facts, workload, models[0], results, latency,
                     time.perf_counter() - started, scoring=bool(model_names(options.config)))
