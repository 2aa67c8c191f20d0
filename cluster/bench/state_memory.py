"""Bounded state, measured: per-process peak memory over a long simulated stream, month by month.

Simulates ``--days`` of card transactions with the project's generator, runs a pipeline
config (``configs/fraud.yaml`` by default) over them on an embedded Ray, and samples, from a
thread of the driver, the unique set size (USS: pages no other process shares, so not the
object store's shared mappings) and the resident set size (RSS) of the driver and of every
actor of the run (``<run>-partition-<i>``, ``<run>-<stage>-<i>`` in namespace ``eventray``,
found by name; each answers ``where()`` with its process id). Each sample is dated by the
event time the run has reached: the latest ``date=`` folder of the store's ``events`` table.
The size of each actor's latest checkpointed state (its operators' snapshots) is sampled
too, so a growing process can be traced to the state that grows.

Writes a plot of peak USS per process per simulated month (``--plot``) and prints one JSON
line: per process, its peak USS and RSS in MiB per month, and per state owner its largest
snapshot per month.

Run:
    python -m cluster.bench.state_memory --days 365 --customers 2000 --plot docs/state-memory.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

MB = 1 << 20
NAMESPACE = "eventray"
RUN_ID = "state_memory"
_ACTOR_NAME = re.compile(rf"^{RUN_ID}-(?P<role>[a-z_]+-\d+)$")
_STATE_FILE = re.compile(r"^(?P<owner>.+)-(?P<epoch>\d{12})\.state$")


class RunSampler:
    """Samples the driver's and the run's actors' memory, and the event time reached.

    Attributes:
        samples: One dict per sample: ``day`` (event time reached, a date or None), ``memory``
            (process name to ``(uss, rss)`` bytes) and ``state`` (owner to latest snapshot bytes).
    """

    def __init__(self, store: Path, interval_s: float = 1.0) -> None:
        self.store, self.interval_s = store, interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-sampler", daemon=True)
        self._actors: dict[str, psutil.Process] = {}

    def __enter__(self) -> RunSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        driver = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self._find_actors()
            memory = {"driver": _memory(driver)}
            memory.update({name: _memory(p) for name, p in self._actors.items()})
            self.samples.append({"day": _event_day(self.store), "state": _state_sizes(self.store),
                                 "memory": {k: v for k, v in memory.items() if v is not None}})

    def _find_actors(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # the runtime is starting or shutting down
            return
        for entry in named:
            match = _ACTOR_NAME.match(entry["name"])
            if entry["namespace"] != NAMESPACE or match is None:
                continue
            role = match["role"]
            if role in self._actors and self._actors[role].is_running():
                continue
            try:
                actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
                self._actors[role] = psutil.Process(ray.get(actor.where.remote(), timeout=10)["pid"])
            except Exception:  # not answering yet, or gone at the end of the run
                continue


def _memory(process: psutil.Process) -> tuple[int, int] | None:
    try:
        info = process.memory_full_info()
    except psutil.Error:
        return None
    return info.uss, info.rss


def _event_day(store: Path) -> dt.date | None:
    days = [p.name.removeprefix("date=") for p in (store / "events").glob("*/date=*")]
    return dt.date.fromisoformat(max(days)) if days else None


def _state_sizes(store: Path) -> dict[str, int]:
    """The size of each owner's latest checkpointed state file."""
    latest: dict[str, tuple[str, int]] = {}
    for path in store.glob("**/*.state"):
        match = _STATE_FILE.match(path.name)
        if match is None:
            continue
        try:
            size = path.stat().st_size
        except OSError:  # pruned while listed
            continue
        owner, epoch = match["owner"], match["epoch"]
        if owner not in latest or epoch > latest[owner][0]:
            latest[owner] = (epoch, size)
    return {owner: size for owner, (_, size) in latest.items()}


def peaks_by_month(samples: list[dict[str, Any]], start: dt.date) -> dict[str, Any]:
    """Per process, peak USS and RSS (MiB) per simulated month (30-day months from ``start``,
    numbered from 1); per state owner, the largest snapshot (MiB) per month."""
    uss: dict[str, dict[int, float]] = defaultdict(dict)
    rss: dict[str, dict[int, float]] = defaultdict(dict)
    state: dict[str, dict[int, float]] = defaultdict(dict)
    for sample in samples:
        if sample["day"] is None:
            continue
        month = (sample["day"] - start).days // 30 + 1
        for name, (u, r) in sample["memory"].items():
            uss[name][month] = max(uss[name].get(month, 0.0), round(u / MB, 1))
            rss[name][month] = max(rss[name].get(month, 0.0), round(r / MB, 1))
        for owner, size in sample["state"].items():
            state[owner][month] = max(state[owner].get(month, 0.0), round(size / MB, 2))
    return {"peak_uss_mb": dict(uss), "peak_rss_mb": dict(rss), "state_mb": dict(state)}


def plot(peaks: dict[str, Any], path: Path, title: str) -> None:
    """Peak USS per process per month (left) and checkpointed state per owner (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, months in sorted(peaks["peak_uss_mb"].items()):
        left.plot(list(months), list(months.values()), marker="o", label=name)
    left.set(xlabel="simulated month (30 days)", ylabel="peak USS (MiB)", title="memory per process")
    for owner, months in sorted(peaks["state_mb"].items()):
        right.plot(list(months), list(months.values()), marker=".", label=owner)
    right.set(xlabel="simulated month (30 days)", ylabel="latest snapshot (MiB)", title="checkpointed state")
    for axes in (left, right):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/fraud.yaml"))
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--terminals", type=int, default=4000)
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2018, 4, 1))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--plot", type=Path, default=Path("docs/state-memory.png"))
    parser.add_argument("--work", type=Path, help="folder for the input and store (default: a temporary one)")
    args = parser.parse_args(argv)

    from cluster.ray_runtime import prepare_environment

    prepare_environment(None)
    from cluster.job import run_job
    from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly

    with tempfile.TemporaryDirectory(prefix="state-memory-") as scratch:
        work = args.work or Path(scratch)
        table = simulate_transactions(SimulationSpec(n_customers=args.customers, n_terminals=args.terminals,
                                                     start_date=args.start.isoformat(), n_days=args.days,
                                                     seed=args.seed))
        write_monthly(table, work / "input")
        started = time.perf_counter()
        with RunSampler(work / "store", args.interval) as sampler:
            summary = run_job(args.config, store=work / "store", inputs=[str(work / "input")], progress=False,
                              run_id=RUN_ID)
        elapsed = time.perf_counter() - started
    peaks = peaks_by_month(sampler.samples, args.start)
    plot(peaks, args.plot, f"{args.config.name}: {table.num_rows:,} transactions over {args.days} days, "
                           f"{args.customers:,} customers, {args.terminals:,} terminals")
    print(json.dumps({"transactions": table.num_rows, "days": args.days, "customers": args.customers,
                      "terminals": args.terminals, "elapsed_s": round(elapsed, 1),
                      "samples": len(sampler.samples), "stored": summary.get("stored"),
                      "plot": str(args.plot), **peaks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
