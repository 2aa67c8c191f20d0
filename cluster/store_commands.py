"""The store's commands: ``compact``, ``replay``, ``compare`` and ``explain``.

    eventray compact --store S [--config CONFIG] [--max-age TABLE[/TYPE]=AGE ...]
    eventray replay CONFIG --store S --into S2 [--from T] [--to T] [--types T ...] [--as-of T]
    eventray compare S S2 [--plot FILE.png]
    eventray explain --store S ALERT_ID [--as-of T]

Each returns the dict the CLI prints as its last, JSON, line.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError

Log = Callable[[str], None]


def _moment(text: str) -> dt.datetime:
    """An ISO date or datetime; naive means UTC."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or datetime") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def add_store_commands(commands: Any) -> None:
    """Add the store's subcommands to the CLI's parser."""
    compact = commands.add_parser("compact", help="merge small store files; apply retention")
    compact.add_argument("--store", type=Path, required=True)
    compact.add_argument("--config", type=Path, help="pipeline YAML whose store.retention applies")
    compact.add_argument("--max-age", nargs="+", default=[], metavar="RULE=AGE",
                         help="retention, e.g. events=400d events/fraud.reported=30d")
    compact.add_argument("--tables", nargs="+", help="only these tables (default: all)")

    replay = commands.add_parser("replay", help="re-run a store's source events through a pipeline")
    replay.add_argument("config", type=Path)
    replay.add_argument("--store", type=Path, required=True, help="the store to replay")
    replay.add_argument("--into", type=Path, required=True, help="the store the replay writes")
    replay.add_argument("--from", dest="start", type=_moment, help="event time >= this")
    replay.add_argument("--to", dest="end", type=_moment, help="event time < this")
    replay.add_argument("--types", nargs="+", help="only these source event types")
    replay.add_argument("--as-of", type=_moment, help="the store as it stood at this commit time")
    replay.add_argument("--address", help="Ray cluster address; default: an embedded local Ray")
    replay.add_argument("--in-process", action="store_true", help="run without Ray")
    replay.add_argument("--no-progress", action="store_true")

    compare = commands.add_parser("compare", help="alerts added, removed, changed between stores")
    compare.add_argument("store_a", type=Path)
    compare.add_argument("store_b", type=Path)
    compare.add_argument("--plot", type=Path, help="also draw the difference per day to a PNG")

    explain = commands.add_parser("explain", help="one alert's evidence chain")
    explain.add_argument("alert_id")
    explain.add_argument("--store", type=Path, required=True)
    explain.add_argument("--as-of", type=_moment, help="the store as it stood at this time")


def command_compact(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from pipelines.compaction import Retention, compact_store
    from pipelines.pipeline import load_pipeline
    from pipelines.store import EventStore

    rules: dict[str, Any] = {}
    if args.config is not None:
        rules.update(load_pipeline(args.config).store.retention)
    rules.update(Retention.parse(args.max_age).rules)
    existing_store(args.store)
    now = dt.datetime.now(dt.UTC)  # the command line is where the wall clock enters
    report = compact_store(EventStore(args.store), now, Retention.parse(rules), args.tables)
    log(f"compacted {report.files_before} files into {report.files_after} "
        f"in {report.folders} folders; {report.rows_expired} rows past retention")
    return {"store": str(args.store), "now": now.isoformat(), **report.summary()}


def command_replay(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from cluster.ray_runtime import prepare_environment

    prepare_environment(args.address)
    from cluster.job import run_spec
    from pipelines.pipeline import load_pipeline
    from pipelines.replay import replay_spec

    existing_store(args.store)
    if args.into.resolve() == args.store.resolve():
        raise ConfigError("--into: a replay writes another store than the one it reads")
    spec = replay_spec(load_pipeline(args.config), args.store.resolve(), start=args.start,
                       end=args.end, event_types=args.types, as_of=args.as_of)
    log(f"replaying {args.store} through {spec.name} into {args.into}")
    summary = run_spec(spec, args.into, args.address, None, args.in_process,
                       False if args.no_progress else None)
    return {**summary, "replayed_from": str(args.store)}


def command_compare(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from pipelines.alert_diff import compare_alerts
    from pipelines.store import EventStore

    existing_store(args.store_a)
    existing_store(args.store_b)
    diff = compare_alerts(EventStore(args.store_a), EventStore(args.store_b))
    for name in ("added", "removed", "changed"):
        frame = getattr(diff, name)
        print(f"{name}: {frame.height}", flush=True)
        if frame.height:
            print(frame.head(5), flush=True)
    result: dict[str, Any] = {"store_a": str(args.store_a), "store_b": str(args.store_b),
                              **diff.counts()}
    if args.plot is not None:
        result["plot"] = str(plot_difference(diff.by_day(), args.plot, args.store_a, args.store_b))
    return result


def plot_difference(daily: Any, path: Path, a: Path, b: Path) -> Path:
    """Alerts per day in both stores (top) and added/removed/changed per day (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
    days = daily["day"].to_list()
    top.plot(days, daily["alerts_a"], label=f"A: {a}", lw=1)
    top.plot(days, daily["alerts_b"], label=f"B: {b}", lw=1)
    top.set_ylabel("alerts per day")
    top.legend(loc="upper left", fontsize=8)
    for name, color in (("added", "#2a7"), ("removed", "#c33"), ("changed", "#88a")):
        bottom.plot(days, daily[name], label=name, color=color, lw=1)
    bottom.set_ylabel("alerts")
    bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle("Alerts of B against A")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def command_explain(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from pipelines.audit import explain_alert
    from pipelines.store import EventStore

    existing_store(args.store)
    store = EventStore(args.store)
    evidence = explain_alert(store.as_of(args.as_of) if args.as_of else store, args.alert_id)
    for line in evidence_lines(evidence):
        print(line, flush=True)
    return evidence


def evidence_lines(evidence: dict[str, Any]) -> list[str]:
    """The evidence chain for a reader, one fact a line."""
    trained = evidence["training_range"]
    lines = [f"alert     {evidence['alert_id']} ({evidence['alert_type']}, step {evidence['step']})",
             f"event     {evidence['event_id']} {evidence['event']['event_type']} at "
             f"{evidence['timestamp']} key {evidence['key']}",
             "payload   " + ", ".join(f"{k}={v}" for k, v in (evidence["event"].get("data") or {}).items()),
             f"model     {evidence['model']} trained on {trained['start']} .. {trained['end']}",
             f"score     {evidence['score']:.4f} >= threshold {evidence['threshold']}",
             "inputs"]
    lines += [f"  {name:<40} {value}" for name, value in evidence["inputs"].items()]
    lines += [f"label     {label['event_type']} at {label['timestamp']}: "
              + ", ".join(f"{k}={v}" for k, v in label["data"].items())
              for label in evidence["labels"]] or ["label     none arrived"]
    lines += [f"action    {action}" for action in evidence["actions"]] or ["action    none"]
    return lines


def existing_store(store: Path) -> None:
    """Refuse a --store that is not a folder: a typo must not read as an empty store."""
    if not store.is_dir():
        raise ConfigError(f"--store: {store} is not a store directory")


STORE_COMMANDS = {"compact": command_compact, "replay": command_replay,
                  "compare": command_compare, "explain": command_explain}
