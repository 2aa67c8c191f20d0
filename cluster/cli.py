"""The ``eventray`` command line (also ``python -m cluster``).

Commands:
    run CONFIG       run a pipeline (embedded local Ray, or ``--address`` of a cluster)
    submit CONFIG    submit the same run to a cluster as a Ray job and follow its logs
    serve CONFIG     run a pipeline over live sources (HTTP ingestion) until SIGTERM, then drain
    produce          send simulated transactions to a live endpoint (http, redis) at a fixed rate
    simulate         write synthetic card transactions (the project's own generator)
    train            fit a fraud model on the store's features and save it to a registry
    evaluate         fraud models by the handbook's protocol; anomaly detectors on NAB
    report           one day of a store as an HTML compliance report with plots
    mine             match a pattern file over a store's events (no Ray)
    actions retry    send dead-lettered actions again (--store S [--rule R] [--since T])
    compact, replay, compare, explain   the store's commands (:mod:`cluster.store_commands`)

Every command ends by printing one JSON line on stdout. Bad arguments print usage;
bad configs print what is wrong with which field; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError, UnknownPluginError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventray", description="Real-time, event-driven pipelines on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a pipeline")
    run.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/fraud.yaml")
    run.add_argument("--address", help="Ray cluster address; default: an embedded local Ray")
    run.add_argument("--store", type=Path, help="store directory (default: the config's)")
    run.add_argument("--input", nargs="+", metavar="PATH",
                     help="files, folders or globs to read instead of the config's")
    run.add_argument("--partitions", type=_positive, help="override runtime.partitions")
    run.add_argument("--readers", type=int, metavar="N",
                     help="override runtime.readers: N reader actors ingest and route the "
                          "source (0: the driver does)")
    run.add_argument("--in-process", action="store_true",
                     help="run without Ray, in this process (debugging)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run from its last checkpoint (after a crash)")
    run.add_argument("--run-id", type=_run_id,
                     help="the run's id (default: derived from the config and the input)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    serve = commands.add_parser("serve", help="run a pipeline over live sources until SIGTERM")
    serve.add_argument("config", type=Path)
    serve.add_argument("--store", type=Path, help="event store (default: the config's)")
    serve.add_argument("--address", help="Ray cluster address; default: an embedded local Ray")
    serve.add_argument("--port", type=int, help="HTTP port (default: the config's; 0: any free)")
    serve.add_argument("--no-progress", action="store_true", help="no live progress line")

    from cluster.produce import add_arguments as add_produce_arguments

    add_produce_arguments(commands.add_parser(
        "produce", help="send simulated transactions at a fixed rate (open loop)"))

    submit = commands.add_parser("submit", help="submit a run to a cluster as a Ray job")
    submit.add_argument("config", type=Path)
    submit.add_argument("--address", required=True, help="dashboard URL, http://HOST:8265")
    submit.add_argument("--store", type=Path)
    submit.add_argument("--input", nargs="+", metavar="PATH")
    submit.add_argument("--python", default=sys.executable,
                        help="interpreter on the cluster side (default: this one)")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")

    evaluate = commands.add_parser("evaluate", help="evaluate models on benchmarks")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    nab = benchmarks.add_parser("nab", help="anomaly detectors on a NAB corpus")
    nab.add_argument("--data", type=Path, required=True, help="corpus root (data/, labels/)")
    nab.add_argument("--out", type=Path, required=True, help="results folder")
    nab.add_argument("--detector", default="best",
                     help="best (the shipped recipe) or a registered detector: ensemble, "
                          "knn_novelty, cad_ose, knn_cad, bocpd, relative_entropy, likelihood, "
                          "windowed_gaussian, robust_zscore")
    nab.add_argument("--plot", nargs="+", metavar="SERIES",
                     help="also draw these series (category/name.csv) into OUT/plots/")
    nab.add_argument("--partitions", type=_positive, default=2)
    nab.add_argument("--address", help="Ray cluster address; default: an embedded local Ray")
    nab.add_argument("--in-process", action="store_true", help="run without Ray")
    fraud = benchmarks.add_parser("fraud", help="fraud models by the fraud handbook's protocol")
    _feature_arguments(fraud)
    fraud.add_argument("--models", nargs="+", metavar="NAME",
                       help="recipes (presets or model names); default: baselines and tuned")
    fraud.add_argument("--folds", action="store_true",
                       help="also the handbook's 4 weekly test folds (chapter 5)")
    fraud.add_argument("--parity", action="store_true",
                       help="also compare the store's features with offline ones (needs --data)")
    fraud.add_argument("--select", action="store_true",
                       help="instead, rank the tuning candidates on the validation folds")
    fraud.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="train a fraud model on the store's features")
    _feature_arguments(train)
    train.add_argument("--model", required=True, help="preset or model name, e.g. hgb_tuned")
    train.add_argument("--params", help='factory arguments as JSON, e.g. \'{"max_iter": 300}\'')
    train.add_argument("--start", required=True, type=_day, help="first training day, YYYY-MM-DD")
    train.add_argument("--end", required=True, type=_day,
                       help="the day after the last training day (exclusive), YYYY-MM-DD")
    train.add_argument("--registry", required=True, type=Path, help="model registry directory")
    train.add_argument("--name", help="registry name (default: the model name)")
    train.add_argument("--seed", type=int, default=0)

    from cluster.bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="benchmark the fraud pipeline against "
                                            "a batch job, a per-event design and Bytewax"))

    report = commands.add_parser("report", help="one day of a store as an HTML compliance report")
    report.add_argument("--store", type=Path, required=True, help="event store directory")
    report.add_argument("--day", type=_day, required=True, help="the day (UTC), YYYY-MM-DD")
    report.add_argument("--out", type=Path, help="HTML file (default: STORE/_reports/DAY.html)")

    actions = commands.add_parser("actions", help="the actions outbox of a store")
    verbs = actions.add_subparsers(dest="verb", required=True, metavar="VERB")
    retry = verbs.add_parser("retry", help="send dead-lettered actions again")
    retry.add_argument("--store", type=Path, required=True, help="the event store")
    retry.add_argument("--rule", help="only this rule's actions")
    retry.add_argument("--since", type=_moment, help="only actions parked at or after this "
                       "time (ISO 8601, UTC if no zone)")

    from cluster.store_commands import add_store_commands

    add_store_commands(commands)

    sim = commands.add_parser("simulate", help="write synthetic card transactions")
    sim.add_argument("--out", type=Path, required=True, help="output folder")
    sim.add_argument("--days", type=_positive, default=183)
    sim.add_argument("--customers", type=_positive, default=5000)
    sim.add_argument("--terminals", type=_positive, default=10000)
    sim.add_argument("--start", default="2018-04-01", help="first day, YYYY-MM-DD")
    sim.add_argument("--seed", type=int, default=0)

    mine = commands.add_parser("mine", help="match a pattern file over a store's events (no Ray)")
    mine.add_argument("--store", type=Path, required=True, help="event store to read")
    mine.add_argument("--patterns", type=Path, required=True,
                      help="YAML with a top-level patterns: list, e.g. configs/patterns/fraud.yaml")
    mine.add_argument("--from", dest="start", type=_moment, help="first event time (ISO-8601)")
    mine.add_argument("--to", dest="end", type=_moment, help="events before this time only")
    mine.add_argument("--out", type=Path, required=True, help="folder for matches.parquet")
    return parser


def _moment(text: str) -> Any:
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, help="event store a fraud pipeline run wrote")
    parser.add_argument("--features", choices=("store", "offline"), default="store",
                        help="read the pipeline's features from --store (default), or compute "
                             "them offline from --data (development, parity cross-check)")
    parser.add_argument("--data", type=Path, help="folder of transactions-*.parquet files")


def _day(text: str) -> Any:
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _moment(text: str) -> Any:
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _run_id(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits and _ only (at most 64)")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _log(message: str) -> None:
    print(f"eventray: {message}", file=sys.stderr, flush=True)


def command_run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.ray_runtime import prepare_environment

    prepare_environment(args.address)
    from cluster.job import run_job

    return run_job(args.config, address=args.address, store=args.store, inputs=args.input,
                   partitions=args.partitions, in_process=args.in_process,
                   progress=False if args.no_progress else None, resume=args.resume,
                   run_id=args.run_id, readers=args.readers,
                   log=_log)


def command_serve(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.serve import serve_pipeline

    return serve_pipeline(args.config, store=args.store, address=args.address, port=args.port,
                          progress=False if args.no_progress else None, log=_log)


def command_produce(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.produce import command

    return command(args, log=_log)


def command_submit(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.submit import submit_job

    return submit_job(args.config, address=args.address, store=args.store, inputs=args.input,
                      python=args.python, wait=not args.no_wait, log=_log)


def command_simulate(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly

    started = time.perf_counter()
    table = simulate_transactions(SimulationSpec(
        n_customers=args.customers, n_terminals=args.terminals, start_date=args.start,
        n_days=args.days, seed=args.seed))
    files = write_monthly(table, args.out)
    elapsed = time.perf_counter() - started
    frauds = int(table.column("TX_FRAUD").to_numpy().sum())
    return {"transactions": table.num_rows, "frauds": frauds, "files": [str(f) for f in files],
            "elapsed_s": round(elapsed, 3),
            "transactions_per_min": round(table.num_rows / elapsed * 60) if elapsed else None}


def command_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.benchmark == "fraud":  # no Ray: scikit-learn fits over the store's features
        from pipelines.fraud.evaluation import DEFAULT_MODELS, evaluate_fraud, select_recipes

        if args.select:
            table, summary = select_recipes(source=args.features, store=args.store, data=args.data,
                                            seed=args.seed, log=_log)
        else:
            table, summary = evaluate_fraud(
                source=args.features, store=args.store, data=args.data,
                models=args.models or DEFAULT_MODELS, folds=args.folds, parity=args.parity,
                seed=args.seed, log=_log)
        print(table, flush=True)
        return summary
    from cluster.ray_runtime import prepare_environment

    prepare_environment(args.address)
    if args.benchmark == "nab":
        from cluster.evaluate_nab import evaluate_nab
        from models.anomaly import DETECTORS

        if args.detector not in DETECTORS and args.detector != "best":
            raise UnknownPluginError("detector", args.detector, ["best", *DETECTORS])
        return evaluate_nab(args.data, args.out, args.detector, args.partitions,
                            args.address, args.in_process, log=_log, plot=args.plot)
    raise AssertionError(args.benchmark)


def command_train(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.fraud.train import parse_params, train_model

    return train_model(model=args.model, start=args.start, end=args.end, registry=args.registry,
                       name=args.name, params=parse_params(args.params), seed=args.seed,
                       source=args.features, store=args.store, data=args.data, log=_log)


def command_bench(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.bench.cli import command

    return command(args, log=_log)


def command_report(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.report import write_report

    if not args.store.is_dir():
        raise PipelineError(f"store {args.store} is not a directory")
    return write_report(args.store, args.day, args.out)


def command_mine(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.store_commands import existing_store
    from pipelines.patterns.mining import mine_store

    existing_store(args.store)
    return mine_store(args.store, args.patterns, args.out, args.start, args.end)


def command_actions(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.store_commands import existing_store
    from pipelines.actions.dispatch import retry_dead_letters

    existing_store(args.store)
    return retry_dead_letters(args.store, rule=args.rule, since=args.since)


def _store_command(name: str) -> Any:
    def command(args: argparse.Namespace) -> dict[str, Any]:
        from cluster.store_commands import STORE_COMMANDS

        return STORE_COMMANDS[name](args, _log)

    return command


COMMANDS = {"run": command_run, "submit": command_submit, "serve": command_serve,
            "produce": command_produce, "simulate": command_simulate,
            "evaluate": command_evaluate, "train": command_train, "bench": command_bench,
            "report": command_report, "mine": command_mine, "actions": command_actions,
            **{name: _store_command(name) for name in ("compact", "replay", "compare", "explain")}}


def main(argv: list[str] | None = None) -> int:
    # Before scikit-learn loads OpenMP: idle OpenMP threads spin by default, and on cores
    # shared with Ray's processes that made training many times slower (140 s instead of
    # 8 s for the tuned boosting on the handbook). Passive threads sleep; the models are the
    # same. Ray's workers run one OpenMP thread each anyway.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        summary = COMMANDS[args.command](args)
    except PipelineError as exc:
        parser.exit(2, f"eventray {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "eventray: interrupted\n")
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
