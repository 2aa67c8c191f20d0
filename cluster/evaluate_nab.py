"""``eventray evaluate nab``: a detector run through the pipeline over a NAB corpus.

Every series file under ``DATA/data`` is one key (its path), its rows are events in file
order (a CSV source, typed ``value``), the anomaly step scores them in the partition
actors, and the scores table is mapped back to rows through the rows' derived event ids.
Results go to ``OUT/<category>/<name>.csv`` (``timestamp,value,anomaly_score``, one row per
input row), then NAB's three profiles are scored (:mod:`models.nab`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.errors import ConfigError
from pipelines.event_ids import derived_event_ids
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore

SOURCE = "nab"


def nab_pipeline(data: Path, detector: str, partitions: int,
                 params: dict[str, Any] | None = None) -> PipelineSpec:
    """The pipeline that reads a NAB corpus and scores it with ``detector``."""
    return PipelineSpec.model_validate({
        "name": f"nab-{detector}",
        # NAB's rule: a file's row order is its key's order (some files repeat or step back a
        # timestamp), and a corpus may hold series from any era: arrival order, no horizon.
        "source": {"format": "csv", "name": SOURCE, "path": [str(data / "data")],
                   "pattern": "*.csv", "batch_size": 4096, "ordering": "arrival",
                   "max_future": "36500d"},
        "mapping": {"event_type": {"value": "nab.reading"}, "timestamp": "timestamp",
                    "payload": {"columns": ["value"]}},
        "event_types": {"nab.reading": {"key": "part", "payload": {"value": "float"}}},
        "steps": [{"kind": "anomaly", "name": "nab", "detector": detector,
                   "params": params or {}, "value": "value", "event_types": ["nab.reading"],
                   "emit_alerts": False}],
        "runtime": {"partitions": partitions, "checkpoint_every": 50},
    })


def write_results(store: EventStore, corpus: Any, out: Path) -> int:
    """Write one result CSV per series from the store's scores; returns rows written."""
    scores = store.scan("scores").select("event_id", "score").collect()
    written = 0
    for series in corpus.series:
        ids = derived_event_ids(SOURCE, series.name, np.arange(len(series.values)))
        rows = pl.DataFrame({"event_id": pl.Series(ids)}).join(
            scores, on="event_id", how="left", maintain_order="left")
        if rows["score"].null_count():
            raise ConfigError(f"{series.name}: {rows['score'].null_count()} rows were not scored")
        path = out / series.name
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"timestamp": series.timestamp_text, "value": series.values,
                      "anomaly_score": rows["score"]}).write_csv(path)
        written += rows.height
    return written


def evaluate_nab(data: Path, out: Path, detector: str = "best", partitions: int = 2,
                 address: str | None = None, in_process: bool = False,
                 log: Callable[[str], None] = print,
                 plot: list[str] | None = None) -> dict[str, Any]:
    """Run, write and score; returns the summary with the three profiles' scores.

    Besides NAB's all-in score (one threshold swept over the whole corpus), the summary holds
    ``held_out``: the leave-one-category-out score (each category scored at the threshold
    chosen on the others), when the corpus has two categories or more. ``plot`` names series
    (``category/name.csv``) to draw into ``OUT/plots/`` with their scores and windows.
    """
    from cluster.job import run_spec
    from models.nab import PROFILES, load_corpus, read_results, score_results
    from models.nab_crossval import category_of, leave_one_category_out

    if not (data / "data").is_dir():
        raise ConfigError(f"--data {data}: expected a NAB corpus with a data/ folder")
    corpus = load_corpus(data)
    spec = nab_pipeline(data, detector, partitions)
    with tempfile.TemporaryDirectory(prefix="eventray-nab-") as store_root:
        run = run_spec(spec, Path(store_root), address=address, in_process=in_process,
                       progress=False)
        rows = write_results(EventStore(store_root), corpus, out)
    scores = score_results(out, corpus)
    log(_table(detector, scores))
    summary = {"detector": detector, "series": len(corpus.series), "rows": rows,
               "windows": corpus.n_windows, "out": str(out),
               "events_per_s": run["events_per_s"],
               "scores": {name: round(s.normalised, 2) for name, s in scores.items()},
               "thresholds": {name: round(s.threshold, 4) for name, s in scores.items()}}
    results = read_results(out, corpus)
    if len({category_of(s.name) for s in corpus.series}) > 1:
        summary["held_out"] = {name: round(leave_one_category_out(
            results, corpus, PROFILES[name]).normalised, 2) for name in PROFILES}
    if plot:
        from cluster.nab_plot import plot_series

        summary["plots"] = [str(plot_series(corpus.by_name()[name], results[name],
                                            scores["standard"].threshold, out / "plots", detector))
                            for name in plot]
    return summary


def _table(detector: str, scores: dict[str, Any]) -> str:
    published = {"ARTime": (74.9, 65.1, 80.4), "Numenta HTM": (70.5, 62.6, 75.2),
                 "CAD OSE": (69.9, 67.0, 73.2), "KNN CAD": (58.0, 43.4, 64.8),
                 "Windowed Gaussian": (39.6, 20.9, 47.4), "Random": (11.0, 1.2, 19.5)}
    lines = [f"{'detector':36} {'standard':>9} {'low FP':>9} {'low FN':>9}"]
    ours = [scores[p].normalised for p in ("standard", "reward_low_FP", "reward_low_FN")]
    lines.append(f"{'eventray ' + detector + ' (this corpus)':36} "
                 + " ".join(f"{v:9.1f}" for v in ours))
    for name, values in published.items():
        lines.append(f"{name + ' (published, 58)':36} " + " ".join(f"{v:9.1f}" for v in values))
    return "\n".join(lines)
