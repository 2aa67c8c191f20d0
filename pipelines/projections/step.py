"""A projection in the stream: a step in the keyed partitions that folds each batch.

Each partition folds its own keys' events (:class:`~pipelines.projections.fold.ProjectionFold`)
and writes, with every batch, the new state of the keys the batch changed to the store table
named after the projection (``STORE/<name>/event_type=<name>/date=<day of the key's latest
event>/``), under the same checkpoints and exactly-once rewrite as ``events``. The latest row
of a key in that table is its current state. The whole state is the step's snapshot (Arrow
IPC, base64), so a restored partition goes on from its checkpoint.

Example:
    >>> from pipelines.envelope import envelope_schema
    >>> from pipelines.processing import StepContext
    >>> spec = ProjectionStepSpec.model_validate({"kind": "projection", "name": "logins",
    ...     "projection": {"name": "logins", "fields": [
    ...         {"name": "n", "op": "count", "event_types": ["user.login"]}]}})
    >>> ProjectionStep(spec, StepContext(envelope_schema())).spec.event_types
    ['user.login']
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import ConfigDict, Field, model_validator

from pipelines.checkpoint import StateRestoreError
from pipelines.processing import Step, StepContext, StepOutput
from pipelines.projection_spec import ProjectionSpec
from pipelines.projections.fold import ProjectionFold
from pipelines.spec import NAME_PATTERN, StepSpec


class ProjectionStepSpec(StepSpec):
    """The step that folds one projection in the partitions (made for every projection of
    ``projections:`` with ``online: true``; its event types are the projection's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["projection"]
    name: str = Field(pattern=NAME_PATTERN)
    projection: ProjectionSpec

    @model_validator(mode="before")
    @classmethod
    def _types_of_projection(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("event_types") is None:
            projection = ProjectionSpec.model_validate(values.get("projection"))
            return {**values, "event_types": projection.event_types()}
        return values


def envelope_frame_schema(envelope: pa.Schema) -> dict[str, pl.DataType]:
    """The Polars schema of envelope batches."""
    return dict(pl.from_arrow(envelope.empty_table()).schema)  # type: ignore[union-attr]


class ProjectionStep(Step):
    """Folds a projection per key, one batch at a time; writes the changed keys' state."""

    spec_class = ProjectionStepSpec

    def __init__(self, spec: ProjectionStepSpec, context: StepContext) -> None:
        self.spec, self.name = spec, spec.name
        self.fold = ProjectionFold(spec.projection, envelope_frame_schema(context.envelope))
        self.state = self.fold.empty()

    def process(self, events: pa.Table) -> StepOutput:
        frame = pl.from_arrow(events.select(
            [c for c in events.column_names if not c.startswith("_")]))
        assert isinstance(frame, pl.DataFrame)
        self.state, changed = self.fold.fold(self.state, frame)
        if changed.height == 0:
            return StepOutput()
        rows = self.fold.view(changed).with_columns(
            event_type=pl.lit(self.spec.projection.name))
        return StepOutput(tables={self.spec.projection.name: rows.to_arrow()})

    def snapshot(self) -> Any:
        sink = io.BytesIO()
        self.state.write_ipc(sink, compression="uncompressed")
        return {"ipc": base64.b64encode(sink.getvalue()).decode()}

    def restore(self, state: Any) -> None:
        if state is None:
            self.state = self.fold.empty()
            return
        if not isinstance(state, dict) or "ipc" not in state:
            raise StateRestoreError(f"not a projection snapshot: {str(state)[:80]!r}")
        frame = pl.read_ipc(io.BytesIO(base64.b64decode(state["ipc"])))
        self.state = frame.cast(dict(self.fold.empty().schema))
