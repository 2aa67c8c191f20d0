"""``eventray report`` on a small store a real run wrote: every section, plots embedded,
one JSON line at the end; and the actions section with and without an ``actions`` table."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines import EventStore, Pipeline
from tests.support import eventray, summary_of

TODAY = dt.datetime.now(dt.UTC).date()  # dead letters are dated by ingestion: today
START = dt.datetime.combine(TODAY, dt.time(), dt.UTC)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    kwh = [100.0 if i in (40, 77) else 1.0 + (i % 5) * 0.1 for i in range(120)]  # two spikes
    lines = [json.dumps({"type": "meter.reading", "at": (START + dt.timedelta(minutes=i)).isoformat(),
                         "data": {"meter": f"m{i % 3}", "kwh": kwh[i]}}) for i in range(120)]
    lines += ["{not json", json.dumps({"type": "meter.reading", "at": "yesterday-ish", "data": {}})]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    pipeline = Pipeline.from_dict({
        "name": "meters", "source": {"format": "jsonl", "path": [str(folder / "in.jsonl")]},
        "mapping": {"event_type": "type", "timestamp": "at", "payload": {"json": "data"}},
        "event_types": {"meter.reading": {"key": "meter", "payload": {"meter": "str", "kwh": "float"}}},
        "steps": [{"kind": "anomaly", "detector": "robust_zscore", "value": "kwh",
                   "event_types": ["meter.reading"], "threshold": 0.9}]})
    summary = pipeline.run(store=folder / "store", runner="local")
    assert summary["dead_lettered"] == 2 and summary["alerts"] > 0
    return folder / "store"


def images(page: str) -> int:
    return len(re.findall(r'<img alt="plot" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page))


def test_the_report_shows_every_section_with_plots(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    summary = summary_of(eventray("report", "--store", str(store), "--day", TODAY.isoformat(),
                                  "--out", str(out)))
    assert summary["events"] == 120 + summary["alerts"] and summary["dead_letters"] == 2
    assert summary["models"] == ["robust_zscore"] and summary["actions"] is None
    page = out.read_text()
    assert images(page) >= 4  # events per hour, dead letters, alerts per hour, scores
    for text in ("meter.reading", "anomaly.detected", "bad_json", "robust_zscore",
                 "none: the store has no actions table"):
        assert text in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_the_report_counts_actions_by_status_when_the_store_has_them(store: Path, tmp_path: Path) -> None:
    EventStore(store).write("actions", pa.table({
        "event_type": ["fraud.suspected"] * 3,
        "timestamp": pa.array([START] * 3, pa.timestamp("us", "UTC")),
        "status": ["delivered", "delivered", "dead_lettered"]}), writer="test", seq=0)
    summary = summary_of(eventray("report", "--store", str(store), "--day", TODAY.isoformat()))
    page = Path(summary["report"]).read_text()
    assert summary["actions"] == 3 and Path(summary["report"]).parent.name == "_reports"
    assert "dead_lettered" in page and "delivered" in page


def test_a_day_without_data_and_a_missing_store(store: Path, tmp_path: Path) -> None:
    summary = summary_of(eventray("report", "--store", str(store), "--day", "2001-01-01",
                                  "--out", str(tmp_path / "empty.html")))
    assert (summary["events"], summary["alerts"], summary["models"]) == (0, 0, [])
    missing = eventray("report", "--store", str(tmp_path / "nope"), "--day", "2001-01-01")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
