"""Exceptions of the ``pipelines`` package.

A bad *event* is never an exception: it is routed to the dead-letter store with a reason
code (see :mod:`pipelines.deadletter`). Exceptions here are for bad *configuration* or
misuse, found before or at start-up, and for broken invariants::

    PipelineError
    ├── ConfigError          a pipeline or cluster config is invalid (names the field)
    │   └── UnknownPluginError  a config names a plugin that is not registered
    ├── SchemaError          a payload schema cannot be mapped to Arrow, or two clash
    ├── SourceError          a source cannot be opened (defined in pipelines.sources)
    ├── StoreError           the event store cannot be read or written
    └── AccountingError      events read != stored + dead-lettered + filtered
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError


class PipelineError(Exception):
    """Base class of every error raised by ``pipelines``."""


class ConfigError(PipelineError):
    """A configuration value is invalid; the message names the field."""


class UnknownPluginError(ConfigError):
    """A config names a plugin (source format, model, sink) that is not registered.

    Attributes:
        kind: what was looked up, for example ``"source format"``.
        name: the name that was given.
        allowed: the registered names.
    """

    def __init__(self, kind: str, name: str, allowed: list[str], field: str | None = None) -> None:
        self.kind, self.name, self.allowed, self.field = kind, name, sorted(allowed), field
        where = f"{field}: " if field else ""
        super().__init__(f"{where}unknown {kind} {name!r}; allowed: {', '.join(self.allowed)}")

    def at(self, field: str) -> UnknownPluginError:
        """The same error, naming the config field that gave the name."""
        return UnknownPluginError(self.kind, self.name, self.allowed, field)


class SchemaError(PipelineError):
    """A payload schema cannot be mapped to Arrow, or two registered schemas clash."""


class StoreError(PipelineError):
    """The event store cannot be read or written as asked."""


class AccountingError(PipelineError):
    """A run's counts do not add up: events were lost or doubled.

    Attributes:
        counts: the run's counters, as a plain dict.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = dict(counts)
        super().__init__(
            "events read != stored + dead-lettered + filtered: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        )


def validated(model: type[BaseModel], values: Mapping[str, Any], where: str) -> Any:
    """``values`` validated by ``model``; a :class:`ConfigError` names each bad field."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        lines = [f"{where}: invalid"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}.{field}: {err['msg']}" if field else f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
