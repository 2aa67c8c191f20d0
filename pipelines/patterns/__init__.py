"""Complex event processing: declarative patterns matched per key in event time.

A pattern (YAML under ``patterns:``, or :class:`Pattern` in Python) is a sequence of
steps (loops, contiguity, negations, ``within``, skip strategies, timeouts) or an
edge-triggered window aggregate (``count``, ``sum``, ``distinct``). The stream runs them
in the keyed partitions (:mod:`pipelines.patterns.step`); ``eventray mine`` runs the same
engine (:class:`pipelines.patterns.batches.PatternSet`) over the store
(:mod:`pipelines.patterns.mining`).

Exceptions: :class:`pipelines.errors.ConfigError` for a bad pattern (naming its field),
:class:`ExpressionError` (a ``ValueError``) for a ``where`` that does not parse.
"""

from __future__ import annotations

from pipelines.patterns.builder import Pattern
from pipelines.patterns.expressions import ExpressionError, parse_condition
from pipelines.patterns.spec import (
    AggregateSpec,
    MatchPayload,
    PatternSpec,
    SequenceStepSpec,
    load_patterns,
    pattern_specs,
)

__all__ = [
    "AggregateSpec",
    "ExpressionError",
    "MatchPayload",
    "Pattern",
    "PatternSpec",
    "SequenceStepSpec",
    "load_patterns",
    "parse_condition",
    "pattern_specs",
]
