"""System (a): the eventray pipeline of a config (``configs/fraud.yaml``) on an embedded local Ray.

Runs whatever the config describes: today's steps, or the fraud scoring steps once the
config has them. A step that names a model registry (``model: {registry: ..., name: ...}``)
is pointed at the bench's registry, where the harness saved the bench's model under that
name (:func:`model_names` says which). Two modes:

- throughput: the whole input as fast as it goes (``run_spec``'s own summary: events/s, from
  the first source batch to the last stored one, Ray's start-up excluded);
- latency (``--pace RATE FILE``, repeatable): paced replays (``source.pace.speedup``) of a
  slice of the input at the given offered rate in events/s; the run summary's latency
  percentiles are ingestion (release by the pacer) to stored, per batch, weighted by rows.
  When the pipeline scores and alerts inside its partitions, stored means with its scores
  and alerts written.

Run as ``python -m cluster.bench.eventray_run --config C --store DIR --input F... [--registry
DIR] [--pace RATE FILE ...]``; the last stdout line is a JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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


def bench_spec(config: Path, registry: Path | None, speedup: float | None = None) -> Any:
    """The config's pipeline, its model steps reading ``registry``, optionally paced."""
    from pipelines.spec import PipelineSpec

    raw = yaml.safe_load(config.read_text()) or {}
    if registry is not None:
        for step in _model_steps(raw):
            step["model"]["registry"] = str(registry)
    if speedup is not None:
        raw["source"] = {**raw["source"], "pace": {"speedup": speedup}}
    return PipelineSpec.model_validate(raw)


def natural_rate(path: Path) -> tuple[int, float]:
    """Rows of a transactions file and their event-time span in seconds."""
    times = pq.read_table(path, columns=["TX_DATETIME"]).column("TX_DATETIME").to_numpy()
    return len(times), float((times.max() - times.min()) / 1e9) or 1.0


def run(config: Path, store: Path, inputs: list[Path], registry: Path | None,
        paced: list[tuple[float, Path]]) -> dict[str, Any]:
    """The throughput run, or the paced runs when ``paced`` is given."""
    from cluster.job import run_spec

    if not paced:
        summary = run_spec(bench_spec(config, registry), store, inputs=[str(f) for f in inputs])
        return {"system": "eventray", "events": summary["events_in"], "elapsed_s": summary["elapsed_s"],
                "events_per_s": summary["events_per_s"], "complete": True, "summary": summary}
    points = []
    for rate, path in paced:
        rows, span_s = natural_rate(path)
        speedup = rate * span_s / rows
        summary = run_spec(bench_spec(config, registry, speedup), store / f"paced-{len(points)}",
                           inputs=[str(path)])
        points.append({"offered_events_per_s": round(rate, 1), "events": rows, "speedup": round(speedup, 1),
                       "achieved_events_per_s": summary["events_per_s"],
                       "latency_ms": summary["latency_ms"], "alerts": summary["alerts"]})
    return {"system": "eventray", "latency": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.eventray_run")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--registry", type=Path)
    parser.add_argument("--pace", nargs=2, action="append", default=[], metavar=("RATE", "FILE"),
                        help="a paced run of FILE at RATE events/s (repeatable)")
    args = parser.parse_args(argv)
    from cluster.ray_runtime import prepare_environment

    prepare_environment(None)
    paced = [(float(rate), Path(path)) for rate, path in args.pace]
    print(json.dumps(run(args.config, args.store, args.input, args.registry, paced), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
