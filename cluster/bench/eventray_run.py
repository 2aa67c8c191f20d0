"""System (a): the eventray pipeline of a config (``configs/fraud.yaml``) on an embedded local Ray.

Runs whatever the config describes: today's steps, or the fraud scoring steps once the
config has them. A step that names a model registry (``model: {registry: ..., name: ...}``)
is pointed at the bench's registry, where the harness saved the bench's model under that
name (:func:`model_names` says which). Two modes:

- throughput: the whole input as fast as it goes (``run_spec``'s own summary: events/s, from
  the first source batch to the last stored one, Ray's start-up excluded);
- latency (``--pace RATE SPEEDUP PATH``, repeatable): paced replays (``source.pace.speedup``) of a
  slice of the input at the given offered rate in events/s. Latency is read back per event
  from the store (:func:`store_latency`): from its arrival (due time) in the replay to the
  commit of the file holding its score. A replay group-commits its files at its
  checkpoints, so this is the store's commit lag, not the decision's; the run summary's
  own percentiles (per batch, ingestion to applied) are kept beside it.

Run as ``python -m cluster.bench.eventray_run --config C --store DIR --input F... [--registry
DIR] [--pace RATE SPEEDUP PATH ...]``; the last stdout line is a JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import yaml


def _model_steps(raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for step in raw.get("steps") or []
            if isinstance(step, dict) and isinstance(step.get("model"), dict)
            and "registry" in step["model"]]


def model_names(config: Path) -> list[str]:
    """The registry model names the config's steps load (empty: the pipeline scores nothing)."""
    raw = yaml.safe_load(config.read_text()) or {}
    return [str(step["model"]["name"]) for step in _model_steps(raw)]


def bench_spec(config: Path, registry: Path | None, speedup: float | None = None,
               alerts_table_only: bool = False) -> Any:
    """The config's pipeline, its model steps reading ``registry``, optionally paced.

    ``alerts_table_only`` writes alerts to the ``alerts`` table without routing them back as
    events (``emit_alerts: false``), which is what the other systems do.
    """
    from pipelines.spec import PipelineSpec

    raw = yaml.safe_load(config.read_text()) or {}
    for step in _model_steps(raw):
        if registry is not None:
            step["model"]["registry"] = str(registry)
        if alerts_table_only:
            step["emit_alerts"] = False
    if speedup is not None:
        raw["source"] = {**raw["source"], "pace": {**(raw["source"].get("pace") or {}), "speedup": speedup}}
    return PipelineSpec.model_validate(raw)


def store_latency(store: Path, warmup_s: float) -> dict[str, Any]:
    """Per-event latency read back from the store: ingestion to the event's score committed.

    An event's ``metadata.ingested_at`` is its due time in the paced replay, when it arrived
    (whether the pacer released it then or later, after a linger or behind a busy driver);
    the modification time of the ``scores`` file holding its score (``events`` when the
    pipeline scores nothing) is when that file was committed: with the group commit, at
    the partition's next checkpoint or ``store.commit_rows``, so this is commit lag. Events
    arriving in the first ``warmup_s`` seconds (actors still starting) are left out.
    """
    table = "scores" if any((store / "scores").rglob("*.parquet")) else "events"

    def scan(name: str) -> pl.LazyFrame:
        return pl.scan_parquet(store / name / "**" / "*.parquet", hive_partitioning=True,
                               include_file_paths="file")

    ingested = scan("events").select("event_id", at=pl.col("metadata").struct.field("ingested_at"))
    rows = scan(table).select("event_id", "file").join(ingested, on="event_id").collect()
    files = rows["file"].unique()
    mtimes = pl.DataFrame({"file": files, "written": [os.stat(f).st_mtime_ns // 1000 for f in files]})
    rows = rows.join(mtimes, on="file").with_columns(at=pl.col("at").dt.epoch("us"))
    start = rows["at"].min()
    steady = rows.filter(pl.col("at") >= start + int(warmup_s * 1e6))
    ms = ((steady["written"] - steady["at"]) / 1000).clip(lower_bound=0)
    if ms.len() == 0:
        return {"table": table, "events": 0, "reason": "no event arrived after the first "
                f"{warmup_s:g} s (the warm-up, left out): nothing was measured"}
    span_s = max((steady["written"].max() - steady["at"].min()) / 1e6, 1e-6)
    arrived_s = max((steady["at"].max() - steady["at"].min()) / 1e6, 1e-6)
    return {"table": table, "events": ms.len(), "warmup_s": warmup_s,
            "achieved_events_per_s": round(ms.len() / span_s, 1),
            "arrived_events_per_s": round(ms.len() / arrived_s, 1),
            **{q: round(float(ms.quantile(v, "linear")), 2) for q, v in
               (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}, "max": round(float(ms.max()), 2)}


def run(config: Path, store: Path, inputs: list[Path], registry: Path | None,
        paced: list[tuple[float, float, Path]], warmup_s: float = 0.0,
        alerts_table_only: bool = False) -> dict[str, Any]:
    """The throughput run, or the paced runs when ``paced`` is given."""
    from cluster.job import run_spec

    if not paced:
        spec = bench_spec(config, registry, alerts_table_only=alerts_table_only)
        summary = run_spec(spec, store, inputs=[str(f) for f in inputs])
        return {"system": "eventray", "events": summary["events_in"], "elapsed_s": summary["elapsed_s"],
                "events_per_s": summary["events_per_s"], "complete": True, "summary": summary}
    points = []
    for rate, speedup, path in paced:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        paced_store = store / f"paced-{len(points)}"
        spec = bench_spec(config, registry, speedup, alerts_table_only)
        summary = run_spec(spec, paced_store, inputs=[str(f) for f in files])
        latency = store_latency(paced_store, warmup_s)
        points.append({"offered_events_per_s": round(rate, 1), "events": rows, "speedup": round(speedup, 1),
                       "linger_ms": spec.source.pace.linger_ms,
                       "achieved_events_per_s": latency.pop("achieved_events_per_s", None),
                       "arrived_events_per_s": latency.pop("arrived_events_per_s", None),
                       "latency_ms": latency,
                       "run_summary_latency_ms": summary["latency_ms"], "alerts": summary["alerts"]})
    return {"system": "eventray", "latency": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.eventray_run")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--registry", type=Path)
    parser.add_argument("--pace", nargs=3, action="append", default=[], metavar=("RATE", "SPEEDUP", "PATH"),
                        help="a paced run of PATH (a file, or a folder's Parquet files) at SPEEDUP "
                             "(offering RATE events/s), repeatable")
    parser.add_argument("--alerts-table-only", action="store_true",
                        help="write alerts to the alerts table only, not back into the stream")
    parser.add_argument("--warmup-seconds", type=float, default=0.0,
                        help="paced runs: leave out events arriving in the first seconds")
    args = parser.parse_args(argv)
    from cluster.ray_runtime import prepare_environment

    prepare_environment(None)
    paced = [(float(rate), float(speedup), Path(path)) for rate, speedup, path in args.pace]
    result = run(args.config, args.store, args.input, args.registry, paced, args.warmup_seconds,
                 args.alerts_table_only)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
