"""The open registries of step, stage and source kinds, and building a pipeline's parts.

Three plugin families, each a :class:`~pipelines.plugins.PluginRegistry`:

- :data:`STEP_KINDS` (entry-point group ``eventray.processors``): processing steps in the
  keyed partitions. Built in: ``anomaly``, ``python`` (a user's processor), ``projection``
  (a projection of ``projections:`` folded in the stream).
- :data:`STAGE_KINDS` (``eventray.stages``): enrichment stages keyed by their own key.
- :data:`SOURCE_KINDS` (``eventray.sources``): where events come from. Built in:
  ``parquet``, ``csv``, ``jsonl``, ``store`` (a store's source events, for replay); ``http``,
  a live source (:mod:`pipelines.live`): the ingest journal that ``eventray serve``'s HTTP
  endpoint appends to.

A step or stage kind is a :class:`~pipelines.processing.Step` subclass whose
``spec_class`` validates its config section; a source kind is a :class:`SourceKind`.
:func:`validate_kinds` runs every kind's validation at start-up, so a bad section fails
before any actor starts, with a message naming the field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipelines.envelope import envelope_schema
from pipelines.errors import ConfigError, UnknownPluginError, validated
from pipelines.journal import HttpSourceOptions, JournalSource
from pipelines.patterns.spec import pattern_specs
from pipelines.patterns.step import PatternStep
from pipelines.plugins import PluginImportError, PluginRegistry
from pipelines.processing import AnomalyStep, Step, StepContext
from pipelines.processors import PythonStep
from pipelines.projections.step import ProjectionStep
from pipelines.replay import StoreSourceOptions, build_store_source
from pipelines.routing import type_regex
from pipelines.sources import CsvSource, JsonLinesSource, ParquetSource, Source
from pipelines.spec import EnrichSpec, LimitsSpec, PipelineSpec, SourceSpec, StepSpec


class FileSourceOptions(BaseModel):
    """The built-in file sources take no options besides the common source fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class SourceKind:
    """A source kind: the model of its options and how it is built.

    Attributes:
        options: validates the kind's own fields of the ``source`` section.
        build: ``build(spec, paths, options, limits) -> Source``; ``paths`` are the inputs
            to read (the config's ``path``, or the command line's ``--input``), ``limits``
            the pipeline's (a source never buffers a record over ``max_payload_bytes``).
            A live kind builds a :class:`~pipelines.live.LiveSource` instead of a ``Source``.
        json_lines: its batches hold one ``line`` column of JSON text per record, which the
            normaliser decodes as it decodes a JSON Lines file's.
    """

    options: type[BaseModel]
    build: Callable[[SourceSpec, list[str], Any, LimitsSpec], Any]
    json_lines: bool = False


def file_source(cls: type[Source]) -> SourceKind:
    """The source kind of a file source class (``ParquetSource``...)."""
    def build(spec: SourceSpec, paths: list[str], _: Any, limits: LimitsSpec) -> Source:
        kwargs: dict[str, Any] = {"batch_size": spec.batch_size}
        if spec.pattern is not None:
            kwargs["pattern"] = spec.pattern
        if cls is JsonLinesSource:  # an unterminated line is cut at the limit, not buffered
            kwargs["max_line_bytes"] = limits.max_payload_bytes
        return cls(spec.source_name, paths, **kwargs)

    return SourceKind(FileSourceOptions, build, json_lines=cls is JsonLinesSource)


def _http_journal(spec: SourceSpec, paths: list[str], _: Any, limits: LimitsSpec) -> Any:
    """The ``http`` kind's source: the journal in ``paths[0]`` (``eventray serve`` puts a
    relative ``source.path`` under the store), read as a live source."""
    return JournalSource(spec.source_name, paths[0])


STEP_KINDS = PluginRegistry("step kind", "eventray.processors",
                            {"anomaly": AnomalyStep, "python": PythonStep,
                             "projection": ProjectionStep})
STAGE_KINDS = PluginRegistry("enrich kind", "eventray.stages")
SOURCE_KINDS = PluginRegistry("source format", "eventray.sources", {
    "parquet": file_source(ParquetSource),
    "csv": file_source(CsvSource),
    "jsonl": file_source(JsonLinesSource),
    "http": SourceKind(HttpSourceOptions, _http_journal, json_lines=True),
    "store": SourceKind(StoreSourceOptions, build_store_source),  # replay of a store's events
})




def step_class(step: StepSpec | EnrichSpec, search_path: tuple[str, ...] = (),
               stage: bool = False) -> type[Step]:
    """The class of a step's (or an enrichment stage's) kind."""
    registry = STAGE_KINDS if stage else STEP_KINDS
    cls = registry.resolve(step.kind, search_path)
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise ConfigError(f"{registry.kind} {step.kind!r} is {cls!r}, not a Step class")
    return cls


def step_spec(step: StepSpec | EnrichSpec, cls: type[Step], where: str) -> Any:
    """The step's section validated by its kind's model."""
    return validated(cls.spec_class, step.model_dump(by_alias=True, exclude_unset=True), where)


def source_kind(spec: SourceSpec, search_path: tuple[str, ...] = ()) -> tuple[SourceKind, Any]:
    """The source's kind and its validated options."""
    kind = SOURCE_KINDS.resolve(spec.format, search_path)
    if not isinstance(kind, SourceKind):
        raise ConfigError(f"source format {spec.format!r} is {kind!r}, not a SourceKind")
    return kind, validated(kind.options, spec.options(), "source")


def reads_json_lines(spec: SourceSpec, search_path: tuple[str, ...] = ()) -> bool:
    """Whether the source's kind hands over JSON lines (see :attr:`SourceKind.json_lines`)."""
    if spec.format == "jsonl":
        return True
    kind = SOURCE_KINDS.resolve(spec.format, search_path)
    return bool(getattr(kind, "json_lines", False))


def validate_kinds(spec: PipelineSpec, objects: Mapping[str, Any] | None = None) -> None:
    """Resolve every kind the pipeline names and validate its section; import paths of
    ``python`` steps are imported now, so a bad one fails before any actor starts."""
    search = tuple(spec.search_path)
    try:
        source_kind(spec.source, search)
    except UnknownPluginError as exc:
        raise exc.at("source.format") from None
    for index, step in enumerate(spec.steps):
        try:
            cls = step_class(step, search)
        except UnknownPluginError as exc:
            raise exc.at(f"steps.{index}.kind") from None
        typed = step_spec(step, cls, f"steps.{index}")
        if step.kind == "projection":  # its expressions compile against the envelope now
            ProjectionStep(typed, StepContext(envelope_schema(spec.registry()), spec.registry(), search))
        if step.kind == "python" and step.name not in (objects or {}):
            try:
                PythonStep(typed, StepContext(envelope_schema(spec.registry()), spec.registry(), search))
            except PluginImportError as exc:
                raise ConfigError(f"steps.{index}.function: {exc}") from None
    pattern_specs(spec)  # a bad pattern names its field
    if spec.patterns and "patterns" in {step.name for step in spec.steps}:
        raise ConfigError("steps: a step named 'patterns' clashes with the step that runs "
                          "the pipeline's patterns; rename it")
    for index, stage in enumerate(spec.enrich):
        try:
            cls = step_class(stage, search, stage=True)
        except UnknownPluginError as exc:
            raise exc.at(f"enrich.{index}.kind") from None
        step_spec(stage, cls, f"enrich.{index}")
        if not getattr(cls, "columns", ()):
            raise ConfigError(f"enrich.{index}.kind: {stage.kind!r} adds no columns")


def repartitioned_patterns(spec: PipelineSpec) -> list[int]:
    """The patterns (by index) whose key is not how the events they read are partitioned.

    ``key`` always is; ``correlation_id`` and ``data.<field>`` are when every type the
    pattern reads is keyed by that field (``event_types.<type>.key``). The others get their
    events as copies keyed by the pattern's key (:data:`pipelines.processing.PATTERN_COPY`),
    dispatched to the partitions like any event, in order, seen only by that pattern.
    """
    copied = []
    for index, pattern in enumerate(pattern_specs(spec)):
        if pattern.key == "key":
            continue
        wanted = pattern.key.removeprefix("data.")
        regex = re.compile(type_regex(pattern.event_types))
        named = [t for t in spec.event_types if regex.search(t)]
        literal = [t for t in pattern.event_types if not any(c in t for c in "*?[")]
        keys = {spec.registry().schema_for(t).key for t in {*named, *literal}}
        if len(literal) < len(pattern.event_types):  # wildcards: undeclared types too
            keys.add(spec.default_event_type.key)
        if keys != {wanted}:
            copied.append(index)
    return copied


def wants_watermarks(spec: PipelineSpec) -> bool:
    """Whether some step of the partitions wants watermark calls (patterns do)."""
    if spec.patterns:
        return True
    search = tuple(spec.search_path)
    return any(step_class(step, search).watermarks for step in spec.steps)


def keyed_event_types(spec: PipelineSpec) -> list[str]:
    """The event-type patterns some step or enrichment stage of the pipeline sees (each
    step's as its kind resolves it)."""
    search = tuple(spec.search_path)
    patterns = [p for stage in spec.enrich for p in stage.event_types]
    for index, step in enumerate(spec.steps):
        typed = step_spec(step, step_class(step, search), f"steps.{index}")
        patterns += list(typed.event_types or ["*"])
    patterns += [t for pattern in pattern_specs(spec) for t in pattern.event_types]
    return patterns


def build_source(pipeline: PipelineSpec, inputs: list[str] | None = None) -> Source:
    """The pipeline's source, reading ``inputs`` instead of ``source.path`` when given."""
    spec = pipeline.source
    kind, options = source_kind(spec, tuple(pipeline.search_path))
    return kind.build(spec, list(inputs or spec.path), options, pipeline.limits)


def build_steps(spec: PipelineSpec, objects: Mapping[str, Any] | None = None) -> list[Step]:
    """The pipeline's steps, in config order, fresh (no state).

    Args:
        spec: the pipeline.
        objects: processors registered in Python, by step name; each call gets its own
            copies, so partitions in one process never share a stateful processor.
    """
    registry = spec.registry()
    context = StepContext(envelope_schema(registry), registry, tuple(spec.search_path),
                          copy.deepcopy(dict(objects or {})))
    steps = []
    for index, step in enumerate(spec.steps):
        cls = step_class(step, context.search_path)
        steps.append(cls(step_spec(step, cls, f"steps.{index}"), context))
    if spec.patterns:  # after the other steps: a step's derived events are routed first
        steps.append(PatternStep(pattern_specs(spec), context, repartitioned_patterns(spec)))
    return steps


def stage_class(stage: EnrichSpec, search_path: tuple[str, ...] = ()) -> type[Step]:
    """The class of an enrichment stage's kind (its ``columns`` name what it adds)."""
    return step_class(stage, search_path, stage=True)


def build_stage(stage: EnrichSpec, spec: PipelineSpec) -> Step:
    """The logic of one partition of an enrichment stage, fresh (no state)."""
    cls = stage_class(stage, tuple(spec.search_path))
    registry = spec.registry()
    context = StepContext(envelope_schema(registry), registry, tuple(spec.search_path))
    return cls(step_spec(stage, cls, f"enrich.{stage.name}"), context)
