"""NAB (Numenta Anomaly Benchmark) scoring, re-implemented from its published description.

The corpus layout is NAB's: ``ROOT/data/<category>/<name>.csv`` (``timestamp,value``) and
``ROOT/labels/combined_windows.json`` (``{"<category>/<name>.csv": [[start, end], ...]}``).
A detector is run over every file (one key per file, in row order) and its scores are
written as ``OUT/<category>/<name>.csv`` with ``timestamp,value,anomaly_score``.

Scoring, per row ``i`` of a file of ``n`` rows:

- the first ``min(floor(0.15 n), 750)`` rows are probationary and never scored;
- a row is a detection when its score is ``>=`` one threshold shared by the whole corpus;
- inside a window ``[start, end]`` of ``width`` rows a detection is worth
  ``A_TP * s(x) / s(-1)`` with ``x = -(end - i + 1) / width`` and
  ``s(x) = 2 / (1 + exp(5 x)) - 1``; only the window's earliest detection counts, and a
  window without one costs ``-A_FN``;
- outside every window a detection costs ``A_FP * s((i - end_prev) / (width_prev - 1))``
  after a window (``-A_FP`` from 3 widths on) and ``-A_FP`` before the first window;
- the threshold is swept over every distinct score of the corpus (plus one above them all,
  "detect nothing") and the best total is kept;
- normalised score ``100 * (S - S_null) / (S_perfect - S_null)`` with
  ``S_null = -A_FN * windows`` and ``S_perfect = A_TP * windows``.

Details that follow NAB's own scorer (its behaviour, re-derived here, not its code):

- window limits are timestamps; a window opens at the first row (after the previous
  window) whose timestamp equals its start and closes at the first later row whose
  timestamp equals its end, so a repeated or stepped-back timestamp neither reopens nor
  ends a window early. Where no row carries the exact limit we fall back to the first row
  at or after the start and the last row of the run that stays at or before the end (NAB
  would silently never open such a window);
- a window none of whose rows is scorable (wholly probationary) drops out of the sweep,
  while the normaliser counts every labelled window, as NAB's does;
- among thresholds with equal totals the highest one is reported.

Example:
    >>> import numpy as np
    >>> ts = np.arange(100).astype("datetime64[m]").astype("datetime64[us]")
    >>> series = NabSeries("cat/a.csv", ts.astype(str), ts, np.zeros(100),
    ...                    ((ts[40], ts[49]),))
    >>> corpus = NabCorpus(Path("."), (series,))
    >>> perfect = np.zeros(100); perfect[40] = 1.0
    >>> sweep_threshold({"cat/a.csv": perfect}, corpus, PROFILES["standard"]).normalised
    100.0
    >>> sweep_threshold({"cat/a.csv": np.full(100, 0.5)}, corpus,
    ...                 PROFILES["standard"]).normalised
    0.0
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from models.anomaly import StreamingDetector, make_detector

__all__ = [
    "PROFILES",
    "CostProfile",
    "NabCorpus",
    "NabScore",
    "NabSeries",
    "evaluate_detector",
    "load_corpus",
    "probation_rows",
    "read_results",
    "row_rewards",
    "run_detector",
    "score_at_threshold",
    "score_results",
    "scaled_sigmoid",
    "sweep_threshold",
    "window_spans",
]

PROBATION_PERCENT = 0.15
MAX_PROBATION_ROWS = 750
NO_DETECTION_THRESHOLD = 1.1  # above every score in [0, 1]: the "detect nothing" threshold
OUTSIDE = -1  # window id of a scorable row outside every window
PROBATION = -2  # window id of a probationary (unscored) row


@dataclass(frozen=True)
class CostProfile:
    """One NAB application profile: the weights of true positives, false positives, misses.

    Example:
        >>> PROFILES["reward_low_FP"].fp
        0.22
    """

    name: str
    tp: float
    fp: float
    fn: float


PROFILES: dict[str, CostProfile] = {
    "standard": CostProfile("standard", 1.0, 0.11, 1.0),
    "reward_low_FP": CostProfile("reward_low_FP", 1.0, 0.22, 1.0),
    "reward_low_FN": CostProfile("reward_low_FN", 1.0, 0.11, 2.0),
}


@dataclass(frozen=True, eq=False)
class NabSeries:
    """One corpus file: its rows in file order and its labelled windows.

    Attributes:
        name: path relative to ``data/``, e.g. ``"realKnownCause/nyc_taxi.csv"``.
        timestamp_text: the timestamps exactly as written in the file.
        timestamps: the same, parsed (``datetime64[us]``, naive as in NAB).
        values: the values as float64.
        windows: ``(start, end)`` timestamp pairs, in file order.
    """

    name: str
    timestamp_text: np.ndarray
    timestamps: np.ndarray
    values: np.ndarray
    windows: tuple[tuple[np.datetime64, np.datetime64], ...]


@dataclass(frozen=True, eq=False)
class NabCorpus:
    """A loaded corpus: its root and its series, sorted by name."""

    root: Path
    series: tuple[NabSeries, ...]

    @property
    def n_windows(self) -> int:
        """Labelled windows over the whole corpus (what the normaliser counts)."""
        return sum(len(s.windows) for s in self.series)

    def by_name(self) -> dict[str, NabSeries]:
        """The series keyed by their relative name."""
        return {s.name: s for s in self.series}


@dataclass(frozen=True)
class NabScore:
    """The outcome of scoring a corpus under one profile at one threshold.

    Attributes:
        profile: the profile's name.
        threshold: the detection threshold (1.1 means "nothing detected").
        raw: the total score ``S``.
        normalised: ``100 * (S - S_null) / (S_perfect - S_null)``.
        windows: labelled windows in the corpus.
        detected: windows with at least one detection.
        false_positives: detections outside every window.
    """

    profile: str
    threshold: float
    raw: float
    normalised: float
    windows: int
    detected: int
    false_positives: int


def probation_rows(n_rows: int) -> int:
    """Rows at the start of a file that are never scored.

    Example:
        >>> probation_rows(4032), probation_rows(22695)
        (604, 750)
    """
    return int(min(math.floor(PROBATION_PERCENT * n_rows), MAX_PROBATION_ROWS))


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    """NAB's ``s(x) = 2 / (1 + exp(5 x)) - 1``, pinned to -1 from ``x >= 3`` on.

    Example:
        >>> round(float(scaled_sigmoid(-1.0)), 5), float(scaled_sigmoid(3.0))
        (0.98661, -1.0)
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        value = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x >= 3.0, -1.0, value)


def window_spans(
    timestamps: np.ndarray, windows: Iterable[tuple[np.datetime64, np.datetime64]]
) -> list[tuple[int, int]]:
    """Map window limits (timestamps) to inclusive row spans, following NAB's row walk.

    Args:
        timestamps: the file's timestamps in row order (may repeat or step back).
        windows: ``(start, end)`` pairs in order.

    Returns:
        ``(first_row, last_row)`` per window; windows that no row reaches are left out.

    Example:
        >>> ts = np.array(["2020-01-01T00:00", "2020-01-01T00:05", "2020-01-01T00:05",
        ...                "2020-01-01T00:10"], dtype="datetime64[us]")
        >>> window_spans(ts, [(ts[1], ts[3])])
        [(1, 3)]
    """
    ts = np.asarray(timestamps, dtype="datetime64[us]")
    spans: list[tuple[int, int]] = []
    cursor = 0
    for start, end in windows:
        start, end = np.datetime64(start, "us"), np.datetime64(end, "us")
        first = _first_index(ts[cursor:] == start)
        if first is None:
            first = _first_index(ts[cursor:] >= start)
            if first is None:
                continue
        first += cursor
        last = _first_index(ts[first:] == end)
        if last is None:  # no exact end: the run of rows that stays at or before it
            beyond = _first_index(ts[first:] > end)
            last = (len(ts) - first if beyond is None else beyond) - 1
        spans.append((first, first + last))
        cursor = first + last + 1
    return spans


def _first_index(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def row_rewards(
    n_rows: int, spans: list[tuple[int, int]], profile: CostProfile
) -> tuple[np.ndarray, np.ndarray]:
    """What a detection at each row would be worth, and which window each row is in.

    Args:
        n_rows: rows in the file.
        spans: inclusive window row spans (from :func:`window_spans`).
        profile: the cost profile.

    Returns:
        ``(reward, window)``: ``reward[i]`` is the TP value inside a window and the
        (negative) FP cost outside; ``window[i]`` is the window's index in ``spans``,
        ``OUTSIDE`` (-1) or ``PROBATION`` (-2).

    Example:
        >>> reward, window = row_rewards(10, [(4, 5)], PROFILES["standard"])
        >>> float(reward[4]), float(reward[0]), window.tolist()[:6]
        (1.0, -0.11, [-2, -1, -1, -1, 0, 0])
    """
    rows = np.arange(n_rows, dtype=np.float64)
    position = np.full(n_rows, 3.0)  # before the first window: the full FP cost
    window = np.full(n_rows, OUTSIDE, dtype=np.int64)
    inside = np.zeros(n_rows, dtype=bool)
    for k, (first, last) in enumerate(spans):
        width = last - first + 1
        position[first : last + 1] = -(last - rows[first : last + 1] + 1) / width
        inside[first : last + 1] = True
        window[first : last + 1] = k
        after = slice(last + 1, spans[k + 1][0] if k + 1 < len(spans) else n_rows)
        position[after] = (rows[after] - last) / max(width - 1, 1)
    sig = scaled_sigmoid(position)
    reward = np.where(inside, profile.tp * sig / float(scaled_sigmoid(-1.0)), profile.fp * sig)
    window[: probation_rows(n_rows)] = PROBATION
    return reward, window


@dataclass(frozen=True, eq=False)
class _Rows:
    """Every scorable row of a corpus, flattened: score, reward, global window id."""

    score: np.ndarray
    reward: np.ndarray
    window: np.ndarray
    scorable_windows: int


def _flatten(
    scores: Mapping[str, np.ndarray], corpus: NabCorpus, profile: CostProfile
) -> _Rows:
    parts_s, parts_r, parts_w = [], [], []
    offset = 0
    for series in corpus.series:
        if series.name not in scores:
            raise KeyError(f"no scores for {series.name!r}")
        s = np.asarray(scores[series.name], dtype=np.float64)
        if s.shape != series.values.shape:
            raise ValueError(f"{series.name}: {s.size} scores for {series.values.size} rows")
        if not np.all((s >= 0.0) & (s <= 1.0)):
            raise ValueError(f"{series.name}: scores must lie in [0, 1]")
        spans = window_spans(series.timestamps, series.windows)
        reward, window = row_rewards(s.size, spans, profile)
        keep = window != PROBATION
        parts_s.append(s[keep])
        parts_r.append(reward[keep])
        parts_w.append(np.where(window[keep] >= 0, window[keep] + offset, OUTSIDE))
        offset += len(spans)
    window = np.concatenate(parts_w) if parts_w else np.zeros(0, np.int64)
    return _Rows(
        np.concatenate(parts_s) if parts_s else np.zeros(0),
        np.concatenate(parts_r) if parts_r else np.zeros(0),
        window,
        int(np.unique(window[window >= 0]).size),
    )


def normalised_score(raw: float, windows: int, profile: CostProfile) -> float:
    """``100 * (S - S_null) / (S_perfect - S_null)``; 0 for a corpus without windows.

    Example:
        >>> normalised_score(0.0, 4, PROFILES["standard"])
        50.0
    """
    null, perfect = -profile.fn * windows, profile.tp * windows
    return 0.0 if perfect == null else 100.0 * (raw - null) / (perfect - null)


def sweep_threshold(
    scores: Mapping[str, np.ndarray], corpus: NabCorpus, profile: CostProfile
) -> NabScore:
    """Sweep one corpus-wide threshold over every distinct score and keep the best total.

    Vectorised: rows are sorted by score (descending); each row adds its FP cost, or, in a
    window, the rise of that window's best reward so far (the earliest detection has the
    largest reward), so a cumulative sum gives the total at every threshold at once.

    Args:
        scores: per series name, one score in [0, 1] per row.
        corpus: the corpus (rows, windows).
        profile: the cost profile.

    Returns:
        The best :class:`NabScore` (the highest threshold among equal totals).

    Example:
        >>> # see the module docstring: a perfect detector scores 100, a constant one 0
    """
    rows = _flatten(scores, corpus, profile)
    order = np.argsort(-rows.score, kind="stable")
    score, reward, window = rows.score[order], rows.reward[order], rows.window[order]
    gain = np.where(window == OUTSIDE, reward, 0.0)
    in_window = np.flatnonzero(window >= 0)
    if in_window.size:
        gain[in_window] = _window_gains(reward[in_window], window[in_window], profile.fn)
    base = -profile.fn * rows.scorable_windows
    totals = base + np.cumsum(gain)
    # a threshold equal to a score detects every row with that score: take tie ends only
    ends = np.flatnonzero(np.append(score[1:] != score[:-1], True)) if score.size else order
    candidates = np.concatenate([[base], totals[ends]])
    thresholds = np.concatenate([[NO_DETECTION_THRESHOLD], score[ends]])
    best = int(np.argmax(candidates))  # first maximum: the highest threshold
    return score_at_threshold(scores, corpus, profile, float(thresholds[best]))


def _window_gains(reward: np.ndarray, window: np.ndarray, fn: float) -> np.ndarray:
    """Per in-window row (in sweep order): how much its window's best reward rises."""
    by_window = np.argsort(window, kind="stable")  # keeps sweep order within a window
    w, r = window[by_window], reward[by_window]
    # segmented running max: lift each window above all earlier ones (rewards lie in (0, tp])
    lift = (w - w.min()).astype(np.float64) * (2.0 * (np.abs(r).max() + fn) + 1.0)
    best = np.maximum.accumulate(r + lift) - lift
    first = np.append(True, w[1:] != w[:-1])
    previous = np.where(first, -fn, np.roll(best, 1))
    gain = np.empty_like(reward)
    gain[by_window] = np.maximum(best, -fn) - np.maximum(previous, -fn)
    return gain


def score_at_threshold(
    scores: Mapping[str, np.ndarray], corpus: NabCorpus, profile: CostProfile, threshold: float
) -> NabScore:
    """Score a corpus at one fixed threshold (the direct, unswept definition).

    Example:
        >>> # with the corpus of the module docstring, a detection at the window start:
        >>> # score_at_threshold(..., threshold=1.0).raw == 1.0
    """
    rows = _flatten(scores, corpus, profile)
    hit = rows.score >= threshold
    fp_rows = hit & (rows.window == OUTSIDE)
    raw = float(rows.reward[fp_rows].sum()) - profile.fn * rows.scorable_windows
    detected = 0
    if rows.scorable_windows:
        in_hit = hit & (rows.window >= 0)
        ids, first = np.unique(rows.window[in_hit], return_index=True)
        # rows are in file order, so a window's first hit is its earliest detection
        raw += float(rows.reward[np.flatnonzero(in_hit)[first]].sum()) + profile.fn * ids.size
        detected = int(ids.size)
    return NabScore(
        profile=profile.name,
        threshold=threshold,
        raw=raw,
        normalised=normalised_score(raw, corpus.n_windows, profile),
        windows=corpus.n_windows,
        detected=detected,
        false_positives=int(fp_rows.sum()),
    )


def load_corpus(root: Path | str) -> NabCorpus:
    """Load ``ROOT/data/*/*.csv`` and ``ROOT/labels/combined_windows.json``.

    Raises:
        FileNotFoundError: when the layout is not there.

    Example:
        >>> load_corpus("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    root = Path(root)
    labels_path = root / "labels" / "combined_windows.json"
    if not labels_path.is_file():
        raise FileNotFoundError(f"no NAB windows at {labels_path}")
    labels = json.loads(labels_path.read_text())
    series = []
    for path in sorted((root / "data").glob("*/*.csv")):
        name = path.relative_to(root / "data").as_posix()
        frame = pl.read_csv(path, schema={"timestamp": pl.String, "value": pl.Float64})
        text = frame["timestamp"].to_numpy().astype(str)
        windows = tuple(
            (np.datetime64(start, "us"), np.datetime64(end, "us")) for start, end in labels.get(name, [])
        )
        series.append(
            NabSeries(name, text, text.astype("datetime64[us]"), frame["value"].to_numpy(), windows)
        )
    if not series:
        raise FileNotFoundError(f"no data files under {root / 'data'}")
    return NabCorpus(root, tuple(series))


def run_detector(
    corpus: NabCorpus,
    detector: StreamingDetector,
    out_dir: Path | str | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Run one detector over every series (one key per series, rows in file order).

    Args:
        corpus: the loaded corpus.
        detector: a fresh detector; each series is fed as its own key.
        out_dir: when given, write ``OUT/<category>/<name>.csv`` with
            ``timestamp,value,anomaly_score`` (timestamps as in the input).
        batch_size: rows per batch (default: a whole series per batch).

    Returns:
        The scores per series name.

    Example:
        >>> # scores = run_detector(load_corpus(root), make_detector("windowed_gaussian"))
    """
    results: dict[str, np.ndarray] = {}
    for series in corpus.series:
        n = series.values.size
        step = batch_size or max(n, 1)
        parts = [
            detector.score_arrays(
                np.full(min(step, n - lo), series.name, dtype=object),
                series.values[lo : lo + step],
                series.timestamps[lo : lo + step],
            )
            for lo in range(0, n, step)
        ]
        results[series.name] = np.concatenate(parts) if parts else np.zeros(0)
        if out_dir is not None:
            _write_result(Path(out_dir) / series.name, series, results[series.name])
    return results


def _write_result(path: Path, series: NabSeries, scores: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"timestamp": series.timestamp_text, "value": series.values, "anomaly_score": scores}
    ).write_csv(path)


def read_results(results_dir: Path | str, corpus: NabCorpus) -> dict[str, np.ndarray]:
    """Read ``OUT/<category>/<name>.csv`` score files for every series of the corpus.

    Raises:
        FileNotFoundError: a series has no result file.
        ValueError: a result file's rows do not match its series.
    """
    results = {}
    for series in corpus.series:
        frame = pl.read_csv(
            Path(results_dir) / series.name,
            schema_overrides={"timestamp": pl.String, "anomaly_score": pl.Float64},
        )
        if frame.height != series.values.size or not np.array_equal(
            frame["timestamp"].to_numpy().astype(str), series.timestamp_text
        ):
            raise ValueError(f"{series.name}: result rows do not match the data file")
        results[series.name] = frame["anomaly_score"].to_numpy()
    return results


def score_results(
    results_dir: Path | str, corpus: NabCorpus, profiles: Iterable[str] = tuple(PROFILES)
) -> dict[str, NabScore]:
    """Score a results directory under each profile (threshold swept per profile).

    Example:
        >>> # score_results("out/knn", load_corpus(root))["standard"].normalised
    """
    scores = read_results(results_dir, corpus)
    return {name: sweep_threshold(scores, corpus, PROFILES[name]) for name in profiles}


def evaluate_detector(
    detector: str | StreamingDetector | Callable[[], StreamingDetector],
    corpus: NabCorpus | Path | str,
    out_dir: Path | str | None = None,
    profiles: Iterable[str] = tuple(PROFILES),
) -> tuple[dict[str, NabScore], float]:
    """Run a detector over a corpus and score it on each profile.

    Args:
        detector: a registry name, a fresh detector, or a factory.
        corpus: a loaded corpus or its root.
        out_dir: where to write the result files (optional).
        profiles: profile names to score.

    Returns:
        ``(scores by profile, detection seconds)``.

    Example:
        >>> # scores, seconds = evaluate_detector("knn_cad", "/data/nab")
    """
    if not isinstance(corpus, NabCorpus):
        corpus = load_corpus(corpus)
    if isinstance(detector, str):
        detector = make_detector(detector)
    elif not isinstance(detector, StreamingDetector):
        detector = detector()
    started = time.perf_counter()
    scores = run_detector(corpus, detector, out_dir)
    seconds = time.perf_counter() - started
    return {name: sweep_threshold(scores, corpus, PROFILES[name]) for name in profiles}, seconds
