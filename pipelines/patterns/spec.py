"""Pattern specs: the ``patterns:`` section of a pipeline, validated by frozen pydantic models.

A pattern is either a **sequence** of steps (with loops, contiguity, negations, ``within``,
a skip strategy and an optional ``on_timeout`` type) or an **aggregate** over a sliding
event-time window, edge-triggered at a threshold. Both are matched per key (the event's
``key``, its ``correlation_id`` or a payload field ``data.<field>``) and emit a derived
event of type ``emit`` per match. Validation names the field that is wrong; a looping step
with no ``within`` is refused, since its partial matches would never end.

Example:
    >>> spec = PatternSpec.model_validate({
    ...     "name": "card-testing", "key": "data.CUSTOMER_ID", "within": "10m",
    ...     "steps": [{"name": "small", "event_types": ["transaction.created"],
    ...                "where": "data.TX_AMOUNT < 5", "times": 3},
    ...               {"name": "big", "event_types": ["transaction.created"],
    ...                "where": "data.TX_AMOUNT > 200"}],
    ...     "emit": "fraud.card_testing"})
    >>> spec.steps[0].bounds
    (3, 3)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pipelines.envelope import EVENT_TYPE_PATTERN
from pipelines.errors import ConfigError, validated
from pipelines.patterns.expressions import Condition, ExpressionError, parse_condition
from pipelines.spec import MatchPayload, PipelineSpec
from pipelines.timestamps import Duration

__all__ = ["AggregateSpec", "MatchPayload", "PatternFile", "PatternSpec", "SequenceStepSpec",
           "load_patterns", "pattern_specs"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
KEY_PATTERN = r"^(key|correlation_id|data\.[A-Za-z_][A-Za-z0-9_]*)$"
SKIP_PATTERN = r"^(no_skip|skip_to_next|skip_past_last_event|skip_to_(first|last):[a-z0-9][a-z0-9_-]*)$"
#: Partial matches a key may hold per pattern by default (a cap hit drops the oldest).
DEFAULT_MAX_PARTIAL = 1_000




class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _condition(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_condition(value)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from None
    return value


class SequenceStepSpec(_Frozen):
    """One step of a sequence pattern.

    ``times``: ``n``, ``[n, m]`` or ``[n, null]`` (n or more) events. ``contiguity`` to the
    step before: ``next`` (the key's very next event), ``followed_by`` (relaxed: skips
    events that do not match) or ``followed_by_any`` (keeps every alternative);
    ``not_next`` and ``not_followed_by`` are the negated forms (the same as ``negated:
    true`` with ``next`` / ``followed_by``). A negated last step is an absence: it fires
    when ``within`` has passed since the match's first event with no such event.
    ``consecutive``: a loop's repetitions must be the key's consecutive events.
    """

    name: str = Field(pattern=NAME_PATTERN)
    event_types: list[str] = Field(min_length=1)
    where: str | None = None
    times: int | tuple[int, int | None] = 1
    contiguity: Literal["next", "followed_by", "followed_by_any",
                        "not_next", "not_followed_by"] = "followed_by"
    consecutive: bool = False
    negated: bool = False

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        return _condition(value)

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        for name in value:
            if not isinstance(name, str) or not name.replace("*", "a").replace("?", "a"):
                raise ValueError(f"{name!r} is not an event type")
        return value

    @field_validator("times")
    @classmethod
    def _times(cls, value: Any) -> Any:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or (high is not None and high < low):
            raise ValueError(f"times must be n >= 1, [n, m] with m >= n, or [n, null]; got {value}")
        return value

    @model_validator(mode="after")
    def _negation(self) -> SequenceStepSpec:
        if self.contiguity.startswith("not_"):
            object.__setattr__(self, "negated", True)
            object.__setattr__(self, "contiguity", self.contiguity[4:])
        if self.negated and (self.times != 1 or self.contiguity == "followed_by_any"):
            raise ValueError("a negated step takes times: 1 and next or followed_by")
        return self

    @property
    def bounds(self) -> tuple[int, int | None]:
        """(least, most) events; most None: unbounded."""
        return (self.times, self.times) if isinstance(self.times, int) else self.times

    def condition(self) -> Condition | None:
        return parse_condition(self.where) if self.where else None


class AggregateSpec(_Frozen):
    """An aggregate over each key's window ``(t - over, t]`` of events, evaluated at each
    of the key's events; one of ``count: true``, ``sum: data.<field>`` or ``distinct:
    data.<field>``."""

    event_types: list[str] = Field(min_length=1)
    where: str | None = None
    count: bool = False
    sum: str | None = Field(default=None, pattern=r"^data\.[A-Za-z_][A-Za-z0-9_]*$")
    distinct: str | None = Field(default=None, pattern=r"^data\.[A-Za-z_][A-Za-z0-9_]*$")
    over: Duration
    at_least: float

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        return _condition(value)

    @model_validator(mode="after")
    def _one_aggregate(self) -> AggregateSpec:
        given = [n for n in ("count", "sum", "distinct") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of count: true, sum: data.<field>, "
                             f"distinct: data.<field>; got {given or 'none'}")
        if self.over <= dt.timedelta(0):
            raise ValueError("over must be positive")
        return self

    @property
    def function(self) -> Literal["count", "sum", "distinct"]:
        return "count" if self.count else "sum" if self.sum else "distinct"

    @property
    def field(self) -> str | None:
        value = self.sum or self.distinct
        return value.split(".", 1)[1] if value else None


class PatternSpec(_Frozen):
    """A pattern: ``steps`` (a sequence) or ``aggregate``, keyed by ``key``, emitting ``emit``.

    ``max_partial``: partial matches one key may hold; past it the oldest is dropped and the
    drop is counted (``pattern_cap_hits`` in the run summary).
    """

    name: str = Field(pattern=NAME_PATTERN)
    key: str = Field(default="key", pattern=KEY_PATTERN)
    within: Duration | None = None
    skip: str = Field(default="no_skip", pattern=SKIP_PATTERN)
    steps: list[SequenceStepSpec] | None = Field(default=None, min_length=1)
    aggregate: AggregateSpec | None = None
    emit: str = Field(pattern=EVENT_TYPE_PATTERN)
    on_timeout: str | None = Field(default=None, pattern=EVENT_TYPE_PATTERN)
    max_partial: int = Field(default=DEFAULT_MAX_PARTIAL, ge=1)

    @model_validator(mode="after")
    def _shape(self) -> PatternSpec:
        if (self.steps is None) == (self.aggregate is None):
            raise ValueError("give steps (a sequence) or aggregate, not both nor neither")
        if self.within is not None and self.within <= dt.timedelta(0):
            raise ValueError("within must be positive")
        if self.steps is not None:
            _check_sequence(self)
        elif self.within is not None or self.on_timeout is not None or self.skip != "no_skip":
            raise ValueError("an aggregate pattern takes over, not within, skip or on_timeout")
        return self

    @property
    def event_types(self) -> list[str]:
        """Every event type the pattern reads (its stream)."""
        if self.aggregate is not None:
            return list(self.aggregate.event_types)
        return list(dict.fromkeys(t for s in self.steps or [] for t in s.event_types))

    @property
    def emitted_types(self) -> list[str]:
        return [self.emit] + ([self.on_timeout] if self.on_timeout else [])


def _check_sequence(spec: PatternSpec) -> None:
    """Shape rules of a sequence; a ``ValueError`` names the step that breaks one."""
    steps = spec.steps or []
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"steps: step names must be unique, got {names}")
    if steps[0].negated:
        raise ValueError("steps.0.negated: a pattern cannot start with a negated step")
    for index, step in enumerate(steps):
        low, high = step.bounds
        if high is None and spec.within is None:
            raise ValueError(f"steps.{index}.times: an unbounded loop needs within "
                             f"(its partial matches would never end)")
        if step.negated and index + 1 < len(steps) and steps[index + 1].negated:
            raise ValueError(f"steps.{index + 1}.negated: two negated steps in a row")
        if step.negated and steps[index - 1].bounds[0] != steps[index - 1].bounds[1]:
            raise ValueError(f"steps.{index - 1}.times: the step before a negation takes a "
                             f"fixed number of events")
        if step.negated and index == len(steps) - 1 and spec.within is None:
            raise ValueError(f"steps.{index}.negated: an absence at the end needs within")
        if step.negated and index == len(steps) - 1 and step.contiguity == "next":
            raise ValueError(f"steps.{index}.contiguity: an absence at the end is not_followed_by")
        condition = step.condition()
        earlier = set(names[:index])
        for ref in sorted(condition.steps if condition else ()):
            if ref not in earlier or steps[names.index(ref)].negated:
                raise ValueError(f"steps.{index}.where: {ref!r} is not an earlier positive step")
    if ":" in spec.skip:
        target = spec.skip.split(":", 1)[1]
        if target not in names:
            raise ValueError(f"skip: no step named {target!r}")


class PatternFile(_Frozen):
    """A file with a top-level ``patterns:`` list (``eventray mine --patterns FILE``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    patterns: list[PatternSpec] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _unique(cls, value: list[PatternSpec]) -> list[PatternSpec]:
        return unique_patterns(value)


def unique_patterns(value: list[PatternSpec]) -> list[PatternSpec]:
    names = [p.name for p in value]
    if len(set(names)) != len(names):
        raise ValueError(f"pattern names must be unique, got {names}")
    return value


def load_patterns(source: str | Path | Mapping[str, Any]) -> list[PatternSpec]:
    """The patterns of a YAML file (or of its parsed mapping).

    Raises:
        pipelines.errors.ConfigError: the file is not valid; the message names the field.
    """
    data = source if isinstance(source, Mapping) else yaml.safe_load(Path(source).read_text())
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a patterns: list")
    return list(validated(PatternFile, data, "patterns-file").patterns)




def pattern_specs(spec: PipelineSpec) -> list[PatternSpec]:
    """A pipeline's ``patterns:`` validated.

    Raises:
        ConfigError: a pattern is not valid (the message names the field:
            ``patterns.0.steps.1.where``), or two have one name.
    """
    patterns = [validated(PatternSpec, raw, f"patterns.{i}") for i, raw in enumerate(spec.patterns)]
    try:
        return unique_patterns(patterns)
    except ValueError as exc:
        raise ConfigError(f"patterns: {exc}") from None
