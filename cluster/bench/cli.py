"""``eventray bench``'s arguments and command (registered in :mod:`cluster.cli`).

Imports only the standard library at parser-build time; the harness is imported when the
command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEM_NAMES = ("eventray", "batch", "per_event", "bytewax")


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"systems are a comma list of {', '.join(SYSTEM_NAMES)}")
    return names


def _loads(text: str) -> tuple[float, ...]:
    try:
        loads = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not all(0 < x <= 1 for x in loads):
        raise argparse.ArgumentTypeError("loads are fractions of the peak, in (0, 1]")
    return loads


def _loads_per_s(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates are positive requests per second")
    return rates


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    bench.add_argument("--config", type=Path, default=Path("configs/fraud.yaml"),
                       help="eventray pipeline config (default: configs/fraud.yaml)")
    bench.add_argument("--work", type=Path, default=Path("bench-work"),
                       help="work directory: registry, outputs, Bytewax venv, bench.json/png")
    bench.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                       help="transactions files or folders (default: the fraud handbook's, else simulated)")
    bench.add_argument("--systems", type=_systems, default=SYSTEM_NAMES,
                       help="comma list of " + ",".join(SYSTEM_NAMES) + " (eventray always runs)")
    bench.add_argument("--loads", type=_loads, default=(0.2, 0.5, 0.8),
                       help="offered rates for latency, fractions of eventray's peak (default 0.2,0.5,0.8)")
    bench.add_argument("--latency-seconds", type=_seconds, default=8.0,
                       help="length of each paced replay (default 8)")
    bench.add_argument("--warmup-seconds", type=_seconds, default=30.0,
                       help="quiet time before each paced replay's measured events, for actors to "
                            "start (default 30)")
    bench.add_argument("--per-event-seconds", type=_seconds, default=30.0,
                       help="time budget of the per-event design (default 30)")
    bench.add_argument("--simulate-days", type=_count, default=61,
                       help="days of simulator data when there is no other input (default 61)")
    bench.add_argument("--alerts-table-only", action="store_true",
                       help="eventray writes alerts to its alerts table only (as the other systems do), "
                            "not also back into the stream as events")
    bench.add_argument("--patterns", type=Path, metavar="FILE", nargs="?",
                       const=Path("configs/patterns/fraud.yaml"),
                       help="bench complex-event patterns only: the engine against partial matches "
                            "and pattern count, and the config's flow without and with FILE's "
                            "card-testing and terminal-hopping (default configs/patterns/fraud.yaml)")
    bench.add_argument("--scaling", action="store_true",
                       help="instead, runs with reader actors on ray.cluster_utils clusters of 1, 2 "
                            "and 4 nodes (1, 2, 4 readers and partitions): events/s and CPU-seconds "
                            "per million events, and a projection of events/s against cores")
    bench.add_argument("--live", action="store_true",
                       help="instead, the live decision path: `eventray serve` of --live-config, "
                            "POST /score offered open loop at --live-rates; then of "
                            "--live-redis-config against a redis-server of its own: the peak, "
                            "XADD to decision at 20%% of it, and the store's commit lag; every "
                            "figure client-side")
    bench.add_argument("--ingress", action="store_true",
                       help="instead, the HTTP ingress alone: Ray Serve (when installed: pip "
                            "install 'ray[serve]') against aiohttp in a Ray actor, each "
                            "forwarding to two keyed actors, at --live-rates for --live-seconds")
    bench.add_argument("--live-config", type=Path, default=Path("configs/live.yaml"))
    bench.add_argument("--live-redis-config", type=Path, default=Path("configs/live-redis.yaml"))
    bench.add_argument("--live-rates", type=_loads_per_s, default=(100.0, 300.0, 1000.0),
                       help="offered /score requests per second (default 100,300,1000)")
    bench.add_argument("--live-seconds", type=_seconds, default=20.0,
                       help="length of each rate's load (default 20)")
    bench.add_argument("--bytewax-processes", type=_count, default=1,
                       help="Bytewax processes, one worker each, over 127.0.0.1 (default 1; more "
                            "reorder a terminal's events between stages, so features are not exact)")


def command(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the bench; print the table; return the JSON summary."""
    from cluster.bench import BenchError
    from cluster.bench.harness import BenchOptions, run_bench
    from cluster.bench.report import compact, table
    from pipelines.pipeline import load_pipeline

    if args.ingress:
        from cluster.bench.ingress import bench_ingress

        return bench_ingress(args.live_rates, args.live_seconds, log)
    if args.live:
        from cluster.bench.live import bench_live
        from cluster.bench.live_redis import bench_live_redis

        args.work.mkdir(parents=True, exist_ok=True)
        http = bench_live(args.live_config, args.work, args.live_rates, args.live_seconds, log)
        return {**http, "redis": bench_live_redis(args.live_redis_config, args.work,
                                                  args.live_seconds, log)}
    if not args.config.is_file():
        raise BenchError(f"no such config: {args.config}")
    load_pipeline(args.config)  # a bad config names its field here (ConfigError), not in a child
    missing = [str(p) for p in args.input or () if not p.exists()]
    if missing:
        raise BenchError(f"no such input: {', '.join(missing)}")
    if args.scaling:
        from cluster.bench.scaling import run_scaling, scaling_table

        doc = run_scaling(args.config, list(args.input or ()), args.work, log)
        print(scaling_table(doc), flush=True)
        return doc
    if args.patterns is not None:
        from cluster.bench.patterns import run_pattern_bench

        return run_pattern_bench(args.config, args.patterns, list(args.input or ()), args.work, log)
    systems = tuple(dict.fromkeys(("eventray", *args.systems)))
    doc = run_bench(BenchOptions(
        config=args.config, work=args.work, inputs=tuple(args.input or ()), systems=systems,
        loads=args.loads, latency_seconds=args.latency_seconds, warmup_seconds=args.warmup_seconds,
        per_event_seconds=args.per_event_seconds, simulate_days=args.simulate_days,
        bytewax_processes=args.bytewax_processes, alerts_table_only=args.alerts_table_only), log=log)
    print(table(doc), flush=True)
    return compact(doc)
