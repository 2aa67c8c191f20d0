"""The public Python API: build a pipeline, register processors, run it.

A :class:`Pipeline` is an inert description (the frozen :class:`~pipelines.spec.PipelineSpec`
plus the processors registered in Python): building one, printing it or validating it runs
nothing. :meth:`Pipeline.run` hands it to a runner: ``"ray"`` (keyed Ray actors, an
embedded local Ray unless ``address`` names a cluster) or ``"local"`` (the same driver and
partition logic in this process). Runners are plugins of the entry-point group
``eventray.runners``, provided by the ``cluster`` package, so this package never imports
Ray.

Example:
    >>> pipeline = Pipeline.from_dict({
    ...     "name": "orders",
    ...     "source": {"format": "jsonl", "path": ["orders.jsonl"]},
    ...     "mapping": {"event_type": "eventType", "timestamp": "timestamp"},
    ... })
    >>> def big_orders(events):
    ...     return None
    >>> pipeline.register_processor(["order.*"], big_orders, name="big-orders").spec.steps[0].kind
    'python'
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from pipelines.actions.kinds import check_action_kinds
from pipelines.actions.outbox import outbox_rules
from pipelines.errors import ConfigError, SchemaError, UnknownPluginError
from pipelines.kinds import validate_kinds
from pipelines.plugins import IMPORT_PATH, PluginRegistry
from pipelines.processors import as_processor
from pipelines.routing import Router
from pipelines.spec import NAME_PATTERN, PipelineSpec

#: Runners by name: ``ray`` and ``local`` come from the ``cluster`` package's entry points.
RUNNERS = PluginRegistry("runner", "eventray.runners")


@dataclass(frozen=True)
class RegisteredProcessor:
    """A processor given in Python: its step name, event types and the object itself."""

    name: str
    event_types: tuple[str, ...]
    processor: Any


def _format_validation_error(path: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid pipeline config"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def validate_spec(raw: Mapping[str, Any], where: str,
                  objects: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Validate a config mapping: the common sections, then each plugin kind's own."""
    try:
        spec = PipelineSpec.model_validate(dict(raw))
        spec.registry()
        Router(spec)
        outbox_rules(spec)  # action filters compile now, naming the rule
        check_action_kinds(spec)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(where, exc)) from None
    except SchemaError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        validate_kinds(spec, objects)
    except UnknownPluginError:
        raise
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline config is a YAML mapping")
    return raw


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Read, validate and freeze a pipeline config; raise :class:`ConfigError` naming fields.

    Import paths (``module:attr``) in it resolve with the config's folder and the working
    directory first on ``sys.path``.

    Args:
        path: the YAML file.
        overrides: top-level sections to update before validation, e.g.
            ``{"source": {"path": ["in/"]}}`` (merged one level deep).
    """
    path = Path(path)
    raw = _read_yaml(path)
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    raw.setdefault("search_path", [str(path.resolve().parent), os.getcwd()])
    return validate_spec(raw, str(path))


def _import_path_of(processor: Any) -> str:
    """``module:qualname`` of a processor when it has one, for printing and diffs."""
    target = processor if inspect.isfunction(processor) or inspect.isclass(processor) \
        else type(processor)
    path = f"{getattr(target, '__module__', '')}:{getattr(target, '__qualname__', '')}"
    return path if re.match(IMPORT_PATH, path) else "__registered__:processor"


class Pipeline:
    """A pipeline: its validated config and the processors registered in Python.

    Build one with :meth:`from_yaml` or :meth:`from_dict`, add processors with
    :meth:`register_processor`, run it with :meth:`run`.
    """

    def __init__(self, spec: PipelineSpec,
                 processors: Sequence[RegisteredProcessor] = ()) -> None:
        self._base = spec
        self._processors = list(processors)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Pipeline:
        """The pipeline a YAML config describes (validated now: errors name the field)."""
        return cls(load_pipeline(path, overrides))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], base_dir: str | Path | None = None) -> Pipeline:
        """A pipeline built in Python from the same sections a YAML config has.

        Args:
            config: the sections (``name``, ``source``, ``mapping``, ``event_types``...).
            base_dir: folder searched first for import paths (default: the working directory).
        """
        raw = dict(config)
        raw.setdefault("search_path", [str(Path(base_dir or os.getcwd()).resolve()), os.getcwd()])
        return cls(validate_spec(raw, f"pipeline {raw.get('name', '?')!r}"))

    def register_processor(self, event_types: str | Sequence[str], processor: Any, *,
                           name: str | None = None) -> Pipeline:
        """Run ``processor`` on every batch of events of ``event_types`` (wildcards allowed:
        ``order.*``); several processors of one type all run, in registration order.

        Args:
            event_types: one type or a list of shell-style patterns.
            processor: a function ``f(table) -> derived events | None``, or an object with a
                ``process`` method (and optionally ``snapshot()`` / ``restore(state)``).
            name: the step's name (default: the function's or class's name), unique in the
                pipeline: lower-case letters, digits, ``-`` and ``_``.

        Returns:
            The pipeline, to chain calls.
        """
        types = [event_types] if isinstance(event_types, str) else list(event_types)
        as_processor(processor)  # refuse what cannot be called, now
        if name is None:
            target = processor if inspect.isfunction(processor) else type(processor)
            name = re.sub(r"[^a-z0-9_-]", "-", target.__name__.lower()).strip("-_") or "processor"
        if not re.match(NAME_PATTERN, name):
            raise ConfigError(f"processor name {name!r}: use lower-case letters, digits, - and _")
        if name in {s.name for s in self.spec.steps}:
            raise ConfigError(f"processor name {name!r} is taken; pass another name=")
        self._processors.append(RegisteredProcessor(name, tuple(types), processor))
        self.spec  # validate now: a bad event type pattern fails here  # noqa: B018
        return self

    def add_pattern(self, pattern: Any) -> Pipeline:
        """Match a complex-event pattern per key (a :class:`pipelines.patterns.Pattern`
        chain's result, or a mapping in the YAML ``patterns:`` syntax).

        Returns:
            The pipeline, to chain calls.
        """
        if hasattr(pattern, "model_dump"):
            pattern = pattern.model_dump(mode="json")
        raw = self._base.model_dump(by_alias=True, exclude_unset=True)
        raw["patterns"] = [*self._base.patterns, dict(pattern)]
        self._base = validate_spec(raw, f"pipeline {self._base.name!r}", self.objects)
        return self

    def add_action(self, name: str, event_types: str | Sequence[str], *, kind: str,
                   **settings: Any) -> Pipeline:
        """Set off an action for every event of ``event_types`` (wildcards allowed) that a
        partition decides or stores: a rule of the ``actions:`` section
        (:class:`pipelines.actions.ActionRuleSpec`), validated now.

        Args:
            name: the rule's name (part of each action's id: keep it stable).
            event_types: one type or a list of shell-style patterns.
            kind: ``webhook``, ``notify``, ``workflow``, ``update`` or a plugin's kind.
            settings: the rest of the rule (``url``, ``secret_env``, ``where``,
                ``rate_limit``, ``retry``...).

        Returns:
            The pipeline, to chain calls.
        """
        types = [event_types] if isinstance(event_types, str) else list(event_types)
        current = self._base.actions.model_dump(mode="json", exclude_unset=True) \
            if self._base.actions is not None else {}
        rules = [*current.get("rules", []), {"name": name, "event_types": types, "kind": kind, **settings}]
        raw = {**self._base.model_dump(by_alias=True, exclude_unset=True),
               "actions": {**current, "rules": rules}}
        self._base = validate_spec(raw, f"pipeline {self._base.name!r}", self.objects)
        return self

    @property
    def spec(self) -> PipelineSpec:
        """The whole pipeline as one frozen spec (registered processors as ``python`` steps)."""
        if not self._processors:
            return self._base
        steps = [*self._base.steps, *(
            {"kind": "python", "name": p.name, "event_types": list(p.event_types),
             "function": _import_path_of(p.processor)} for p in self._processors)]
        raw = {**self._base.model_dump(by_alias=True, exclude_unset=True), "steps": steps}
        return validate_spec(raw, f"pipeline {self._base.name!r}", self.objects)

    @property
    def objects(self) -> dict[str, Any]:
        """The registered processors by step name."""
        return {p.name: p.processor for p in self._processors}

    def run(self, *, store: str | Path, runner: Literal["ray", "local"] | str = "ray",
            address: str | None = None, inputs: Sequence[str] | None = None,
            resume: bool = False, progress: bool | None = False,
            run_id: str | None = None) -> dict[str, Any]:
        """Run the pipeline to the end of its input; returns the run summary (the fields of
        ``eventray run``'s JSON line).

        Args:
            store: the event store's directory.
            runner: ``"ray"`` (an embedded local Ray, or the cluster at ``address``) or
                ``"local"`` (in this process, for tests and debugging).
            address: a Ray cluster's address (``runner="ray"`` only).
            inputs: files, folders or globs to read instead of the config's paths.
            resume: continue from the run's last checkpoint.
            progress: show a progress bar on a terminal.
            run_id: the run's id (default: derived from the config and the input); a resumed
                run must have the same partition count and input as when it started.
        """
        run = RUNNERS.resolve(runner)
        return run(self.spec, Path(store), objects=self.objects, address=address,
                   inputs=list(inputs) if inputs else None, resume=resume, progress=progress,
                   run_id=run_id)

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.name}:{s.kind}" for s in self.spec.steps)
        return f"Pipeline({self._base.name!r}, source={self._base.source.format}, steps=[{steps}])"
