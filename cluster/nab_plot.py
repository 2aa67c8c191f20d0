"""One NAB series drawn with its detector's scores, labelled windows and probation period.

Used by ``eventray evaluate nab --plot SERIES`` and for the README's figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.nab import NabSeries, probation_rows, window_spans


def plot_series(series: NabSeries, scores: np.ndarray, threshold: float, out_dir: Path,
                detector: str) -> Path:
    """Draw values (top) and scores (bottom) with windows shaded; returns the PNG's path.

    The probation period (never scored by NAB) is hatched, the threshold is the corpus-wide
    one, and the rows at or above it are marked on both panels.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    x = series.timestamps
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    top.plot(x, series.values, lw=0.6, color="#333333")
    bottom.plot(x, scores, lw=0.6, color="#1f77b4")
    bottom.axhline(threshold, color="#d62728", lw=0.8, ls="--", label=f"threshold {threshold:.3f}")
    hits = np.flatnonzero(scores >= threshold)
    top.scatter(x[hits], series.values[hits], color="#d62728", s=18, zorder=3, label="detections")
    bottom.scatter(x[hits], scores[hits], color="#d62728", s=18, zorder=3)
    for axis in (top, bottom):
        for first, last in window_spans(series.timestamps, series.windows):
            axis.axvspan(x[first], x[last], color="#ff7f0e", alpha=0.2, lw=0)
        probation = probation_rows(series.values.size)
        if probation:
            axis.axvspan(x[0], x[probation - 1], facecolor="none", hatch="//",
                         edgecolor="#bbbbbb", lw=0)
    top.set_title(f"{series.name}: {detector} (orange: labelled windows, hatched: probation)")
    top.set_ylabel("value")
    bottom.set_ylabel("anomaly score")
    bottom.set_ylim(-0.02, 1.02)
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out_dir / series.name.replace(".csv", ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
