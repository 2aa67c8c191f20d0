"""Poison events: the events of a batch a step raises on, found by bisection.

A step (a user's processor, a model, a detector) that raises on a batch usually raises on
a few of its events. Failing the whole batch would replay it, fail it again and end the
run; instead the partition finds those events and dead-letters them (reason
``processor_error``), and applies the rest as if they had never been there.

Steps are stateful and a failing ``process`` call may have changed state half-way, so
every attempt starts from a known state:

- :class:`StateLog` rebuilds the steps' state before the failing batch: its last snapshot
  (a checkpoint, or taken every ``max_rows`` applied rows) and the rows applied since,
  replayed. The hot path takes no snapshot per batch.
- :func:`isolate` bisects the batch in order, left half first (each half a zero-copy
  slice), with the step that raised alone (steps never see each other's output),
  snapshotting it before each attempt and restoring it after a failure: ``O(k log n)``
  calls for ``k`` poison events among ``n``. Then it restores every step's state before
  the batch and runs the steps once on the batch without the poison events, so state,
  table rows and derived events are exactly those of a batch that never held them (a
  step that now raises on other events is bisected in turn).

Only a step's own exceptions make poison: an error of the environment (``OSError``,
``MemoryError``, a :class:`~pipelines.errors.StoreError`), anywhere in the chain of causes,
fails the batch at once, as does a batch that fails whole while each of its parts passes.
A store write is not a step: its errors never reach the bisection.

Example:
    >>> from pipelines.processing import StepOutput
    >>> class NoNegatives:
    ...     name, sees_copies = "no-negatives", False
    ...     def process(self, events):
    ...         if min(events["n"].to_pylist()) < 0:
    ...             raise ValueError("negative n")
    ...         return StepOutput()
    ...     def snapshot(self): return None
    ...     def restore(self, state): pass
    >>> steps = [NoNegatives()]
    >>> batch = pa.table({"n": [1, -2, 3, -4, 5]})
    >>> try:
    ...     run_steps(steps, batch)
    ... except StepFailure as failure:
    ...     _, kept, poison = isolate(steps, batch, step_states(steps), failure)
    >>> kept["n"].to_pylist(), sorted(poison), poison[1].message
    ([1, 3, 5], [1, 3], "step 'no-negatives' raised ValueError: negative n")
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.envelope import DEADLETTER_SCHEMA
from pipelines.errors import PipelineError, StoreError
from pipelines.processing import Step, StepOutput, watermark_of, without_copies
from pipelines.tables import take_rows

#: The reason code of a poison event's dead letter.
PROCESSOR_ERROR = "processor_error"

#: Errors of the environment: never a property of the events, so never poison.
ENVIRONMENT_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError, StoreError)
#: The longest exception text a dead letter's message keeps.
MAX_MESSAGE_CHARS = 2000

Outputs = list[tuple[str, StepOutput]]


class StepFailure(PipelineError):
    """A step raised on a batch: which step, and its exception (``error``)."""

    def __init__(self, step: str, error: BaseException) -> None:
        self.step, self.error = step, error
        super().__init__(f"step {step!r} failed: {error}")

    @property
    def environmental(self) -> bool:
        """Whether the error, or any error behind it, is one of the environment's."""
        seen: set[int] = set()
        error: BaseException | None = self.error
        while error is not None and id(error) not in seen:
            if isinstance(error, ENVIRONMENT_ERRORS):
                return True
            seen.add(id(error))
            error = error.__cause__ or error.__context__
        return False

    @property
    def message(self) -> str:
        """``step 'x' raised ValueError: ...``: the step's own exception, not its wrapping."""
        error = self.error
        if type(error).__name__ == "ProcessorError" and error.__cause__ is not None:
            error = error.__cause__  # the user's exception, which the processor step wrapped
        text = f"step {self.step!r} raised {type(error).__name__}: {error}"
        return text[:MAX_MESSAGE_CHARS]


def run_steps(steps: Sequence[Step], events: pa.Table) -> Outputs:
    """Every step's output for ``events``, in order; nothing is written.

    Raises:
        StepFailure: a step raised (its exception is ``error``).
    """
    outputs: Outputs = []
    mark = watermark_of(events)
    originals = without_copies(events)
    for step in steps:
        try:
            if mark is None:
                outputs.append((step.name, step.process(events if step.sees_copies else originals)))
            elif step.watermarks:  # a watermark batch: replayed like any other batch
                outputs.append((step.name, step.on_watermark(*mark) or StepOutput()))
        except Exception as exc:  # any step error may be the events': bisection decides
            raise StepFailure(step.name, exc) from exc
    return outputs


def step_states(steps: Sequence[Step]) -> bytes:
    """The steps' states as bytes: a copy no later mutation of a step can reach."""
    return json.dumps({step.name: step.snapshot() for step in steps}).encode()


def restore_steps(steps: Sequence[Step], states: bytes) -> None:
    data = json.loads(states)
    for step in steps:
        step.restore(data.get(step.name))


class StateLog:
    """The steps' state at a base point and the rows applied since: enough to rebuild the
    state before the current batch, without a snapshot of every batch.

    Args:
        steps: the partition's steps.
        max_rows: rows kept for replay; past them a fresh snapshot becomes the base (a
            snapshot per ``max_rows`` rows bounds both memory and the replay's length).
            The rows are the batches as the partition received them: in a Ray actor they
            hold their object-store buffers until a checkpoint or the next base. Measured
            with a detector and a per-row Python processor: replaying 50k rows 2.8 s, the
            bisection of a 5k-row batch with 3 poison events 80 calls, 1.8 s.
    """

    def __init__(self, steps: Sequence[Step], max_rows: int = 100_000) -> None:
        self.steps, self.max_rows = list(steps), max_rows
        self.rebase(step_states(self.steps) if self.steps else b"{}")

    def rebase(self, states: bytes) -> None:
        """The steps' state is ``states`` now (a snapshot, a checkpoint restored)."""
        self.base, self.since, self.rows = states, [], 0

    def applied(self, rows: pa.Table) -> None:
        """The steps have applied ``rows`` (a batch, without its poison events)."""
        if not self.steps:
            return
        self.since.append(rows)
        self.rows += rows.num_rows
        if self.rows > self.max_rows:
            self.rebase(step_states(self.steps))

    def rewind(self) -> bytes:
        """Put the steps back in the state after the last applied batch; returns it."""
        restore_steps(self.steps, self.base)
        for rows in self.since:
            run_steps(self.steps, rows)  # deterministic steps: the same state again
        return step_states(self.steps) if self.since else self.base


def isolate(steps: Sequence[Step], events: pa.Table, before: bytes,
            failure: StepFailure) -> tuple[Outputs, pa.Table, dict[int, StepFailure]]:
    """Find the events of ``events`` the steps raise on, and run the steps on the rest.

    Args:
        steps: the steps, in the state ``before`` (the state before ``events``).
        events: the batch that failed with ``failure``.
        before: the steps' state before the batch.
        failure: how the whole batch failed.

    Returns:
        the steps' outputs for the kept events, the kept events (in order) and each poison
        event's failure by its row in ``events``. The steps end in the state after the kept
        events.

    Raises:
        BaseException: the step's own error, when it is the environment's or when no single
            event explains it (the batch fails whole while each part passes).
    """
    if failure.environmental:
        raise failure.error
    index = np.arange(events.num_rows)
    kept, poison = events, {}
    while True:
        # Steps do not see each other's output: only the one that raised is bisected, and
        # only its state is snapshotted on the way (a detector's state may be megabytes).
        found = _bisect([s for s in steps if s.name == failure.step], kept)
        if not found:
            raise failure.error
        poison.update({int(index[row]): f for row, f in found.items()})
        mask = np.ones(len(index), dtype=bool)
        mask[list(found)] = False
        index, kept = index[mask], kept.filter(pa.array(mask))
        restore_steps(steps, before)
        if kept.num_rows == 0:
            return [], kept, poison
        try:
            return run_steps(steps, kept), kept, poison
        except StepFailure as again:  # a step that fails on a mix its parts passed alone
            if again.environmental:
                raise again.error from None
            restore_steps(steps, before)
            failure = again


def _bisect(steps: Sequence[Step], table: pa.Table) -> dict[int, StepFailure]:
    """Rows of ``table`` on which the steps raise alone, trying halves in order (the whole
    is known to fail). The steps end in the state after every other row."""
    found: dict[int, StepFailure] = {}
    stack = [(table.num_rows // 2, table.num_rows), (0, table.num_rows // 2)]
    while stack:
        start, stop = stack.pop()
        if start >= stop:
            continue
        saved = step_states(steps)
        try:
            run_steps(steps, table.slice(start, stop - start))
        except StepFailure as failure:
            if failure.environmental:
                raise failure.error from None
            restore_steps(steps, saved)
            if stop - start == 1:
                found[start] = failure
            else:
                middle = (start + stop) // 2
                stack += [(middle, stop), (start, middle)]
    return found


def dead_letters(events: pa.Table, poison: dict[int, StepFailure], part: str,
                 now: dt.datetime) -> pa.Table:
    """The poison events as rows of the ``deadletter`` table (reason ``processor_error``).

    ``raw`` is the event as JSON (its envelope columns; the columns an enrichment stage
    received, for a stage), ``part`` the writer that dead-lettered it and ``offset`` -1: a
    poison event has passed ingestion, its place in the source is its id. ``now`` stands
    in for ``ingested_at`` where the rows do not carry it.
    """
    rows = sorted(poison)
    frame = pl.from_arrow(take_rows(events, np.array(rows, dtype=np.int64)))
    assert isinstance(frame, pl.DataFrame)
    shown = [c for c in frame.columns if not c.startswith("_")]  # transit columns are not the event's
    ingested = (pl.col("metadata").struct.field("ingested_at") if "metadata" in frame.columns
                else pl.lit(now)).dt.replace_time_zone(None).dt.replace_time_zone("UTC")
    text = pl.Series([poison[row].message for row in rows], dtype=pl.String)
    out = frame.select(
        event_id=_column(frame, "event_id"),
        event_type=pl.col("event_type"),
        claimed_event_type=pl.col("event_type"),
        source=_column(frame, "source").fill_null(pl.lit(part)),
        part=pl.lit(part),
        offset=pl.lit(-1, pl.Int64),
        raw=pl.struct(shown).struct.json_encode().cast(pl.Binary),
        reason=pl.lit(PROCESSOR_ERROR),
        message=text,
        ingested_at=ingested.dt.cast_time_unit("us"))
    return out.to_arrow().cast(DEADLETTER_SCHEMA)


def _column(frame: pl.DataFrame, name: str) -> pl.Expr:
    return pl.col(name).cast(pl.String) if name in frame.columns else pl.lit(None, pl.String)
