"""Dispatch latency of actions: decision to the target's 2xx, on an embedded Ray.

Runs the fraud pipeline over the first ``--days`` of the handbook's April (or simulated
transactions), scored by a logistic regression fitted on them, with a webhook rule on
``fraud.suspected`` to a receiver on 127.0.0.1 (reliable, or failing ``--fail-rate`` of
requests with 500), paced at ``--speedup`` so that decisions arrive as a stream. Prints one
JSON line (the run's summary and the dispatch latency percentiles) and writes
``actions.json`` and ``actions.png`` (the latency's distribution) under ``--out``.

    .venv/bin/python -m cluster.bench.actions --days 14 --out bench-work/actions
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import polars as pl

from cluster.ray_runtime import prepare_environment

HANDBOOK_APRIL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fraud-handbook" \
    / "transactions-2018-04.parquet"


def transactions(days: int, folder: Path) -> pl.DataFrame:
    """The first ``days`` of the handbook's April, or as many simulated days."""
    if HANDBOOK_APRIL.exists():
        frame = pl.read_parquet(HANDBOOK_APRIL)
        frame = frame.filter(pl.col("TX_DATETIME") < dt.datetime(2018, 4, 1) + dt.timedelta(days=days))
    else:
        from pipelines.fraud.simulator import SimulationSpec, simulate_transactions

        simulated = pl.from_arrow(simulate_transactions(SimulationSpec(n_days=days, seed=7)))
        assert isinstance(simulated, pl.DataFrame)
        frame = simulated
    folder.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / "transactions-2018-04.parquet")
    return frame


def fit(frame: pl.DataFrame, registry: Path) -> None:
    from models.fraud import make_model
    from models.registry import ModelRegistry
    from pipelines.fraud.features import handbook_features_batch

    table = frame.to_arrow()
    features = handbook_features_batch(table).join(
        frame.select("TRANSACTION_ID", "TX_AMOUNT", "TX_FRAUD"), on="TRANSACTION_ID")
    model = make_model("logistic_regression", seed=0).fit(features)
    ModelRegistry(registry).save(model, name="fraud", created_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))


def spec_for(registry: Path, url: str, speedup: float, days: int) -> Any:
    import yaml

    from pipelines.pipeline import validate_spec

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "configs" / "fraud.yaml").read_text())
    raw["source"]["pace"] = {"speedup": speedup}
    raw["source"].pop("simulate_if_missing", None)
    raw["steps"][0]["model"] = {"registry": str(registry), "name": "fraud", "version": 1}
    raw["steps"][0]["threshold"] = 0.3
    raw["runtime"]["checkpoint_every"] = 2
    raw["source"]["batch_size"] = 5000
    raw["actions"] = {"rules": [{
        "name": "notify-risk-team", "event_types": ["fraud.suspected"], "kind": "webhook",
        "url": url, "secret_env": "BENCH_HOOK_SECRET", "timeout": 1.0,
        "retry": {"attempts": 12, "initial_delay": 0.05, "max_delay": 1.0}}]}
    raw["search_path"] = [str(root)]
    return validate_spec(raw, f"actions bench ({days} days)")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.job import run_on_ray
    from pipelines.actions.receiver import Behaviour, Receiver, new_secret

    out = args.out.resolve()
    frame = transactions(args.days, out / "tx")
    fit(frame, out / "registry")
    secret = new_secret()
    os.environ["BENCH_HOOK_SECRET"] = secret
    store = out / "store"
    with Receiver(secret, Behaviour(fail_rate=args.fail_rate, seed=1)) as receiver:
        spec = spec_for(out / "registry", receiver.url, args.days * 86_400 / args.seconds, args.days)
        summary = run_on_ray(spec, store, inputs=[str(out / "tx")])
        received = receiver.received
    attempts = pl.read_parquet(store / "action_attempts" / "**" / "*.parquet", hive_partitioning=False)
    delivered = attempts.filter(pl.col("status") == "delivered")
    result = {"days": args.days, "transactions": frame.height, "fail_rate": args.fail_rate,
              "alerts": summary["alerts"], "accepted": len(received.accepted),
              "requests": received.requests, "elapsed_s": summary["elapsed_s"],
              "events_per_s": summary["events_per_s"], "actions": summary["actions"],
              "request_ms": {"p50": round(float(delivered["latency_ms"].quantile(0.5)), 2),
                             "p99": round(float(delivered["latency_ms"].quantile(0.99)), 2)}}
    (out / "actions.json").write_text(json.dumps(result, indent=2))
    plot(delivered["dispatch_ms"], out / "actions.png", result)
    return result


def plot(latency: pl.Series, path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.hist(latency.to_numpy(), bins=60, color="#3b6ea5")
    for name, value in result["actions"]["dispatch_ms"].items():
        axis.axvline(value, color="#c0392b", linestyle="--")
        axis.annotate(f"{name} {value:.0f} ms", (value, axis.get_ylim()[1] * 0.9), fontsize=8)
    axis.set_xlabel("decision to the receiver's 2xx (ms)")
    axis.set_ylabel("actions")
    axis.set_title(f"{result['alerts']} fraud alerts as webhooks, receiver failing "
                   f"{result['fail_rate']:.0%} with 500")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.actions",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seconds", type=float, default=20.0, help="the days are replayed over this long")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("bench-work/actions"))
    args = parser.parse_args(argv)
    prepare_environment(None)
    print(json.dumps(measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
