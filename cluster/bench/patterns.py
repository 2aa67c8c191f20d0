"""``eventray bench --patterns``: what complex-event patterns cost.

1. The engine alone (no Ray): events per second of :class:`PatternSet` against the
   number of partial matches held (a sequence ``a`` then ``b`` whose ``within`` sets how
   many ``a`` wait) and against the number of patterns run together.
2. The handbook fraud flow (``configs/fraud.yaml``) on Ray, without and with the
   card-testing and terminal-hopping patterns of ``configs/patterns/fraud.yaml``: the
   overhead in events per second, the matches and the largest partial-match count a key
   reached.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.patterns.batches import PatternSet
from pipelines.patterns.spec import PatternSpec, load_patterns

Log = Callable[[str], None]
FRAUD_PATTERNS = ("card-testing", "terminal-hopping")


def synthetic_events(n: int, keys: int, seed: int = 0) -> pl.DataFrame:
    """``n`` envelope rows over ``keys`` keys, one a second: 95 % type ``a``, 5 % ``b``."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pl.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "event_type": np.where(rng.random(n) < 0.95, "a", "b"),
        "timestamp": pl.datetime_range(start, start + dt.timedelta(seconds=n - 1), "1s",
                                       time_zone="UTC", eager=True),
        "source": "bench", "correlation_id": "", "key": rng.integers(0, keys, n).astype(str),
        "data": pl.DataFrame({"v": rng.integers(0, 100, n)}).to_struct()})


def _sequence(name: str, within: str) -> PatternSpec:
    return PatternSpec.model_validate({
        "name": name, "within": within, "emit": "bench.matched", "skip": "no_skip",
        "max_partial": 100_000,
        "steps": [{"name": "first", "event_types": ["a"], "where": "data.v < 50"},
                  {"name": "then", "event_types": ["b"]}]})


def engine_rate(patterns: list[PatternSpec], events: pl.DataFrame, batch: int = 10_000) -> dict[str, Any]:
    """Events per second of the engine over ``events`` in batches, with the partial
    matches held (mean over batches, and the most one key held)."""
    engine = PatternSet(patterns)
    active, matches = [], 0
    started = time.perf_counter()
    for offset in range(0, events.height, batch):
        matches += len(engine.process(events.slice(offset, batch)))
        active.append(engine.stats()["pattern_active"])
    elapsed = time.perf_counter() - started
    return {"events_per_s": round(events.height / elapsed), "matches": matches,
            "active_partial_matches": round(float(np.mean(active))),
            "max_partial_per_key": engine.stats()["pattern_max_partial"]}


def engine_bench(n: int = 200_000, keys: int = 100, log: Log = lambda _: None) -> dict[str, Any]:
    events = synthetic_events(n, keys)
    by_partials = []
    for within in ("1m", "10m", "1h", "4h"):
        result = {"within": within, **engine_rate([_sequence("p", within)], events)}
        log(f"patterns: within {within}: {result}")
        by_partials.append(result)
    by_count = []
    for count in (1, 2, 4, 8):
        result = {"patterns": count,
                  **engine_rate([_sequence(f"p{i}", "10m") for i in range(count)], events)}
        log(f"patterns: {count} patterns: {result}")
        by_count.append(result)
    return {"events": n, "keys": keys, "by_partial_matches": by_partials, "by_patterns": by_count}


def flow_bench(config: Path, patterns_file: Path, inputs: list[Path], work: Path,
               repeats: int = 2, log: Log = lambda _: None) -> dict[str, Any]:
    """The fraud flow on an embedded Ray without and with the fraud patterns, each
    ``repeats`` times alternating; the best run of each counts."""
    from pipelines import Pipeline

    patterns = [p for p in load_patterns(patterns_file) if p.name in FRAUD_PATTERNS]
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for attempt in range(repeats):
        for label in ("without", "with"):
            pipeline = Pipeline.from_yaml(config)
            if label == "with":
                for pattern in patterns:
                    pipeline.add_pattern(pattern)
            store = work / f"patterns-{label}-{attempt}"
            shutil.rmtree(store, ignore_errors=True)
            summary = pipeline.run(store=store, runner="ray",
                                   inputs=[str(p) for p in inputs] or None)
            log(f"patterns: flow {label} patterns, run {attempt}: {summary['events_per_s']} events/s")
            runs[label].append(summary)
            shutil.rmtree(store, ignore_errors=True)
    best = {label: max(r, key=lambda s: s["events_per_s"]) for label, r in runs.items()}
    base, loaded = best["without"]["events_per_s"], best["with"]["events_per_s"]
    return {"events": best["with"]["events_in"],
            "events_per_s_without": base, "events_per_s_with": loaded,
            "overhead_pct": round(100 * (base / loaded - 1), 1),
            "matches": best["with"].get("pattern_matches", 0),
            "cap_hits": best["with"].get("pattern_cap_hits", 0),
            "max_partial_matches_per_key": best["with"].get("max_pattern_partial_matches", 0),
            "runs": {label: [s["events_per_s"] for s in r] for label, r in runs.items()}}


def run_pattern_bench(config: Path, patterns_file: Path, inputs: list[Path], work: Path,
                      log: Log = lambda _: None) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    return {"engine": engine_bench(log=log),
            "fraud_flow": flow_bench(config, patterns_file, inputs, work, log=log)}
