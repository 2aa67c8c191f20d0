"""The state-memory benchmark's bookkeeping: samples bucketed by simulated month, latest states."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cluster.bench.state_memory import MB, _event_day, _state_sizes, peaks_by_month


def test_peaks_are_taken_per_process_per_30_day_month() -> None:
    start = dt.date(2018, 4, 1)
    samples = [
        {"day": None, "memory": {"driver": (99 * MB, 99 * MB)}, "state": {}},  # before any event
        {"day": start, "memory": {"driver": (10 * MB, 20 * MB)}, "state": {"p0000": MB}},
        {"day": start + dt.timedelta(days=29), "memory": {"driver": (12 * MB, 15 * MB),
                                                          "partition-0": (5 * MB, 6 * MB)}, "state": {}},
        {"day": start + dt.timedelta(days=30), "memory": {"driver": (11 * MB, 11 * MB)},
         "state": {"p0000": 2 * MB}},
    ]
    peaks = peaks_by_month(samples, start)
    assert peaks["peak_uss_mb"] == {"driver": {1: 12.0, 2: 11.0}, "partition-0": {1: 5.0}}
    assert peaks["peak_rss_mb"]["driver"] == {1: 20.0, 2: 11.0}
    assert peaks["state_mb"] == {"p0000": {1: 1.0, 2: 2.0}}


def test_latest_state_per_owner_and_event_day(tmp_path: Path) -> None:
    states = tmp_path / "_checkpoints" / "run"
    states.mkdir(parents=True)
    (states / "p0000-000000000001.state").write_bytes(b"x" * 10)
    (states / "p0000-000000000002.state").write_bytes(b"x" * 3)
    (states / "stage.terminal.0000-000000000001.state").write_bytes(b"x" * 7)
    (states / "manifest-000000000002.json").write_text("{}")
    assert _state_sizes(tmp_path) == {"p0000": 3, "stage.terminal.0000": 7}
    assert _event_day(tmp_path) is None
    for day in ("2018-04-01", "2018-05-02"):
        (tmp_path / "events" / "event_type=transaction.created" / f"date={day}").mkdir(parents=True)
    assert _event_day(tmp_path) == dt.date(2018, 5, 2)
