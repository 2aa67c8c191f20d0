"""Patterns as a step of the keyed partitions.

A pipeline's ``patterns:`` run as one :class:`PatternStep` after its other steps, on the
events of each partition in event-time order (behind the source's watermark). Each match
becomes a derived event of the pattern's ``emit`` type (``on_timeout`` for a timed-out
partial match), keyed by the pattern's key, with the typed payload ``{pattern, event_ids,
start, end}``; its id is a UUIDv5 of its content, so a replay derives the same event. The
driver tells the step the watermark at checkpoints and the end of the input
(:meth:`PatternStep.on_watermark`), where pending absences and timeouts fire.

Example:
    >>> from pipelines.envelope import envelope_schema
    >>> from pipelines.processing import StepContext
    >>> step = PatternStep([], StepContext(envelope_schema()))
    >>> step.name
    'patterns'
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from pipelines.patterns.batches import PatternSet
from pipelines.patterns.engine import Match
from pipelines.patterns.spec import PatternSpec
from pipelines.processing import PATTERN_COPY, Step, StepContext, StepOutput
from pipelines.processors import derived_events
from pipelines.spec import StepSpec

__all__ = ["PATTERN_STEP", "PatternStep", "match_events"]

#: The name of the patterns' step (its store writers, its state in checkpoints).
PATTERN_STEP = "patterns"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _time(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


def match_events(matches: Sequence[Match], specs: Sequence[PatternSpec]) -> list[dict[str, Any]]:
    """Matches as derived events (dicts in the processor contract's form)."""
    types = {s.name: (s.emit, s.on_timeout) for s in specs}
    return [{"event_type": types[m.pattern][0 if m.kind == "match" else 1],
             "timestamp": _time(m.time), "key": m.key, "correlation_id": m.correlation_id,
             "data": {"pattern": m.pattern, "event_ids": list(m.event_ids),
                      "start": _time(m.start), "end": _time(m.end)}}
            for m in matches]


class PatternStep(Step):
    """Every pattern of the pipeline, matched per key in one partition."""

    spec_class = StepSpec
    watermarks = True
    sees_copies = True

    def __init__(self, patterns: Sequence[PatternSpec], context: StepContext,
                 copied: Sequence[int] = ()) -> None:
        self.name, self.context = PATTERN_STEP, context
        self.patterns, self.copied = list(patterns), list(copied)
        self.engine = PatternSet(self.patterns, self.copied)
        self._reported = {"cap_hits": 0}
        #: the latest ``ingested_at`` seen: what matches fired by a watermark carry
        self._ingested = _EPOCH

    def process(self, events: pa.Table) -> StepOutput:
        columns = [c for c in events.column_names if not c.startswith("_") or c == PATTERN_COPY]
        frame = pl.from_arrow(events.select(columns))
        assert isinstance(frame, pl.DataFrame)
        return self._output(self.engine.process(frame), frame)

    def on_watermark(self, watermark_us: int | None, final: bool) -> StepOutput | None:
        matches = self.engine.finish() if final else (
            self.engine.advance(watermark_us) if watermark_us is not None else [])
        return self._output(matches, None)

    def _output(self, matches: list[Match], frame: pl.DataFrame | None) -> StepOutput:
        if frame is not None and frame.height:
            latest = frame["metadata"].struct.field("ingested_at").max()
            if isinstance(latest, dt.datetime):
                self._ingested = max(self._ingested, latest)
        stats = self.engine.stats()
        counters = {"pattern_matches": sum(m.kind == "match" for m in matches),
                    "pattern_timeouts": sum(m.kind == "timeout" for m in matches),
                    "pattern_cap_hits": stats["pattern_cap_hits"] - self._reported["cap_hits"],
                    "max_pattern_partial_matches": stats["pattern_max_partial"]}
        self._reported["cap_hits"] = stats["pattern_cap_hits"]
        if not matches:
            return StepOutput(counters=counters)
        events = derived_events(match_events(matches, self.patterns), self.name, self.context,
                                self._ingested)
        return StepOutput(derived=events, counters=counters)

    def snapshot(self) -> Any:
        return {"engine": self.engine.snapshot(), "reported": self._reported,
                "ingested": self._ingested.isoformat()}

    def restore(self, state: Any) -> None:
        self.engine = PatternSet(self.patterns, self.copied)
        self._reported = {"cap_hits": 0}
        if state:
            self.engine.restore(state["engine"])
            self._reported = dict(state["reported"])
            self._ingested = dt.datetime.fromisoformat(state["ingested"])
