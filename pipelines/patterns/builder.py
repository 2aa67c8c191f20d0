"""Patterns built in Python, in the spirit of FlinkCEP's ``Pattern.begin(...)``.

Each call returns a new, immutable builder; :meth:`Pattern.emit` ends the chain with the
validated :class:`~pipelines.patterns.spec.PatternSpec`, the same object a ``patterns:``
entry in YAML gives, which :meth:`pipelines.Pipeline.add_pattern` adds to a pipeline.

Example:
    >>> card_testing = (Pattern.begin("small", "transaction.created").where("data.TX_AMOUNT < 5")
    ...                 .times(3)
    ...                 .followed_by("big", "transaction.created").where("data.TX_AMOUNT > 200")
    ...                 .within("10m").skip("skip_past_last_event")
    ...                 .emit("fraud.card_testing", name="card-testing", key="data.CUSTOMER_ID"))
    >>> [s.name for s in card_testing.steps]
    ['small', 'big']
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipelines.errors import validated
from pipelines.patterns.spec import PatternSpec

__all__ = ["Pattern"]


def _types(event_types: str | Sequence[str]) -> list[str]:
    return [event_types] if isinstance(event_types, str) else list(event_types)


@dataclass(frozen=True)
class Pattern:
    """A sequence pattern being built: its steps so far and its pattern-wide settings."""

    steps: tuple[dict[str, Any], ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def begin(cls, name: str, event_types: str | Sequence[str]) -> Pattern:
        """The first step: events of ``event_types`` (shell-style patterns allowed)."""
        return cls(({"name": name, "event_types": _types(event_types)},))

    def _step(self, name: str, event_types: str | Sequence[str], **fields: Any) -> Pattern:
        return replace(self, steps=(*self.steps, {"name": name, "event_types": _types(event_types),
                                                  **fields}))

    def _last(self, **fields: Any) -> Pattern:
        return replace(self, steps=(*self.steps[:-1], {**self.steps[-1], **fields}))

    def next(self, name: str, event_types: str | Sequence[str]) -> Pattern:
        """A step that must be the key's very next event."""
        return self._step(name, event_types, contiguity="next")

    def followed_by(self, name: str, event_types: str | Sequence[str]) -> Pattern:
        """A step after the previous one, skipping events that do not match it."""
        return self._step(name, event_types, contiguity="followed_by")

    def followed_by_any(self, name: str, event_types: str | Sequence[str]) -> Pattern:
        """A step after the previous one, keeping every alternative."""
        return self._step(name, event_types, contiguity="followed_by_any")

    def not_next(self, name: str, event_types: str | Sequence[str]) -> Pattern:
        """The next event must not be one of these (that match ``where``)."""
        return self._step(name, event_types, contiguity="next", negated=True)

    def not_followed_by(self, name: str, event_types: str | Sequence[str]) -> Pattern:
        """No such event before the next step (as the last step: an absence in ``within``)."""
        return self._step(name, event_types, contiguity="followed_by", negated=True)

    def where(self, condition: str) -> Pattern:
        """The last step's condition (the ``where`` language of :mod:`.expressions`)."""
        return self._last(where=condition)

    def times(self, least: int, most: int | None | str = "same") -> Pattern:
        """The last step repeats: ``times(3)``, ``times(2, 4)``, ``times(2, None)`` (or more)."""
        return self._last(times=least if most == "same" else [least, most])

    def consecutive(self) -> Pattern:
        """The last step's repetitions must be consecutive events of the key."""
        return self._last(consecutive=True)

    def within(self, duration: str | float | dt.timedelta) -> Pattern:
        return replace(self, settings=(*self.settings, ("within", duration)))

    def skip(self, strategy: str) -> Pattern:
        return replace(self, settings=(*self.settings, ("skip", strategy)))

    def on_timeout(self, event_type: str) -> Pattern:
        return replace(self, settings=(*self.settings, ("on_timeout", event_type)))

    def emit(self, event_type: str, *, name: str, key: str = "key") -> PatternSpec:
        """The finished pattern, validated: matches become ``event_type`` events.

        Raises:
            ConfigError: a setting is wrong (the message names it).
        """
        values = {"name": name, "key": key, "steps": list(self.steps), "emit": event_type,
                  **dict(self.settings)}
        return validated(PatternSpec, values, f"pattern {name!r}")
