"""`eventray evaluate nab`: detectors run through the pipeline over a NAB corpus layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.support import SHARED_DATA, eventray, summary_of


def tiny_corpus(root: Path) -> None:
    """Two series with a labelled spike window each, in NAB's layout."""
    rng = np.random.default_rng(0)
    windows = {}
    for category, name, spike in (("synthetic", "a.csv", 1500), ("synthetic", "b.csv", 1700)):
        times = np.datetime64("2024-01-01T00:00") + np.arange(2000) * np.timedelta64(5, "m")
        values = np.sin(np.arange(2000) / 20) + rng.normal(0, 0.05, 2000)
        values[spike:spike + 5] += 8
        path = root / "data" / category / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = [str(t).replace("T", " ") + ":00" for t in times]
        pl.DataFrame({"timestamp": text, "value": values}).write_csv(path)
        windows[f"{category}/{name}"] = [[text[spike - 20] + ".000000", text[spike + 20] + ".000000"]]
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


def test_tiny_corpus_through_the_pipeline(tmp_path: Path) -> None:
    tiny_corpus(tmp_path / "nab")
    summary = summary_of(eventray("evaluate", "nab", "--data", str(tmp_path / "nab"),
                                  "--out", str(tmp_path / "out"), "--detector", "robust_zscore",
                                  "--plot", "synthetic/b.csv"))
    assert summary["series"] == 2 and summary["rows"] == 4000
    assert summary["plots"] == [str(tmp_path / "out" / "plots" / "synthetic" / "b.png")]
    assert (tmp_path / "out" / "plots" / "synthetic" / "b.png").stat().st_size > 10_000
    assert "held_out" not in summary  # one category: nothing to hold out
    for name in ("a.csv", "b.csv"):
        result = pl.read_csv(tmp_path / "out" / "synthetic" / name)
        assert result.columns == ["timestamp", "value", "anomaly_score"]
        assert result.height == 2000 and result["anomaly_score"].is_between(0, 1).all()
    assert summary["scores"]["standard"] > 50  # both spikes found early in their windows


def test_unknown_detector_lists_the_allowed_ones(tmp_path: Path) -> None:
    result = eventray("evaluate", "nab", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--detector", "magic")
    assert result.returncode == 2 and "knn_novelty" in result.stderr


@pytest.mark.slow
def test_shared_nab_subset_reaches_the_floor(tmp_path: Path) -> None:
    data = SHARED_DATA / "nab"
    if not (data / "labels" / "combined_windows.json").exists():
        pytest.skip(f"NAB reference data not found at {data}")
    summary = summary_of(eventray("evaluate", "nab", "--data", str(data), "--out",
                                  str(tmp_path / "out")))
    assert summary["series"] == 18 and summary["detector"] == "best"
    assert len(list((tmp_path / "out").rglob("*.csv"))) == 18
    # the default is the shipped ensemble, min(knn_novelty, knn_cad), chosen on held-out
    # categories: 64.2 all in (knn_novelty: 67.9) for a threshold that transfers (59.9 held out)
    assert summary["scores"]["standard"] >= 62
    assert summary["held_out"]["standard"] >= 57
