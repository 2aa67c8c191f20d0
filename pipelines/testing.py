"""Testing helpers, shipped as product code: users test their pipelines with them too.

- :class:`ListSource`: a source over in-memory record batches (one part per list).
- :class:`ListSink`: collects what a pipeline writes, per table.
- :class:`FakeClock`: an injectable clock that only moves when told (or when slept on).
- :class:`AbortingListSource` and :data:`ABORT`: a list source that stops as if crashed.
- :func:`run_local`: run a pipeline in process and get its stored tables back.
- :func:`check_processor`: the conformance checks every processor should pass.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.processing import StepContext
from pipelines.processors import PythonStep
from pipelines.sources import RawBatch, Source, SourceError, SourceReader


class FakeClock:
    """A clock for tests: ``now()`` for wall time (UTC), ``monotonic()``, ``sleep()``.

    Example:
        >>> clock = FakeClock(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        >>> clock.sleep(1.5); clock.monotonic()
        1.5
        >>> clock.now().isoformat()
        '2024-01-01T00:00:01.500000+00:00'
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.start = start or dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        self.elapsed = 0.0

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.elapsed += seconds

    __call__ = now


class _ListReader(SourceReader):
    def __init__(self, name: str, part: str, batches: Sequence[pa.RecordBatch], start: int) -> None:
        self.name, self.part, self.position = name, part, start
        self.table = pa.Table.from_batches(list(batches)) if batches else None
        self.sizes = [b.num_rows for b in batches]

    def next_batch(self) -> RawBatch | None:
        if self.table is None or self.position >= self.table.num_rows:
            return None
        # Keep the given batch boundaries: find the batch holding `position`.
        ends = np.cumsum(self.sizes)
        end = int(ends[np.searchsorted(ends, self.position, side="right")])
        rows = self.table.slice(self.position, end - self.position).combine_chunks()
        batch = RawBatch(self.name, self.part, np.arange(self.position, end),
                         rows.to_batches()[0] if rows.num_rows else rows.to_batches())
        self.position = end
        return batch

    def snapshot(self) -> int:
        return self.position

    def close(self) -> None:
        self.table = None


class ListSource(Source):
    """A source over in-memory batches: ``parts`` maps part id -> list of record batches.

    Example:
        >>> src = ListSource("mem", {"p0": [pa.record_batch({"x": [1, 2]})]})
        >>> src.open_part("p0").next_batch().num_rows
        2
    """

    def __init__(self, name: str, parts: dict[str, list[pa.RecordBatch]]) -> None:
        self.name = name
        self.parts = dict(parts)

    def list_parts(self) -> list[str]:
        return list(self.parts)

    def open_part(self, part: str, start: int = 0) -> SourceReader:
        if part not in self.parts:
            raise SourceError(f"unknown part {part!r}; parts: {', '.join(self.parts)}")
        return _ListReader(self.name, part, self.parts[part], start)


class ListSink:
    """Collects written batches per table (an in-memory stand-in for the event store).

    Example:
        >>> sink = ListSink()
        >>> sink.write("events", pa.table({"x": [1]}), writer="p0", seq=0)
        >>> sink.table("events").num_rows
        1
    """

    def __init__(self) -> None:
        self.batches: dict[str, dict[tuple[str, int], pa.Table]] = defaultdict(dict)

    def write(self, table: str, rows: pa.Table, writer: str, seq: int) -> None:
        # Keyed like store files: a rewrite of (writer, seq) replaces, never duplicates.
        self.batches[table][(writer, seq)] = rows

    def table(self, table: str) -> pa.Table:
        parts = [self.batches[table][k] for k in sorted(self.batches[table])]
        return pa.concat_tables(parts) if parts else pa.table({})


#: A marker in a :class:`ListSource` part: reading stops with :class:`SourceAborted` here,
#: as if the process crashed; a resumed run continues after it.
ABORT = object()


class SourceAborted(SourceError):
    """A :class:`ListSource` reached an :data:`ABORT` marker (a simulated crash)."""


class _AbortingReader(_ListReader):
    def __init__(self, name: str, part: str, items: Sequence[Any], start: int, aborted: set) -> None:
        self.items, self.aborted, self.abort_at = items, aborted, []
        rows = 0
        for item in items:
            if item is ABORT:
                self.abort_at.append(rows)
            else:
                rows += item.num_rows
        super().__init__(name, part, [i for i in items if i is not ABORT], start)

    def next_batch(self) -> RawBatch | None:
        for at in self.abort_at:
            if self.position == at and (self.part, at) not in self.aborted:
                self.aborted.add((self.part, at))
                raise SourceAborted(f"{self.part}: aborted at row {at} (testing.ABORT)")
        return super().next_batch()


class AbortingListSource(ListSource):
    """A :class:`ListSource` whose parts may hold :data:`ABORT` markers between batches.

    The first read that reaches a marker raises :class:`SourceAborted` (the run stops as if
    it crashed, its last checkpoint intact); reading again, after ``--resume``, goes on.
    """

    def __init__(self, name: str, parts: dict[str, list[Any]]) -> None:
        super().__init__(name, parts)
        self.aborted: set[tuple[str, int]] = set()

    def open_part(self, part: str, start: int = 0) -> SourceReader:
        if part not in self.parts:
            raise SourceError(f"unknown part {part!r}; parts: {', '.join(self.parts)}")
        return _AbortingReader(self.name, part, self.parts[part], start, self.aborted)


def run_local(pipeline: Any, events: Sequence[dict[str, Any]] | Path | str, *,
              store: str | Path | None = None,
              tables: Sequence[str] | None = None) -> dict[str, pl.DataFrame]:
    """Run a pipeline in this process over ``events`` and return its stored tables.

    Args:
        pipeline: a :class:`pipelines.Pipeline` (its processors included).
        events: records in the shape the pipeline's source reads (written to a JSON Lines
            file; the pipeline's mapping must read JSON Lines), or a path to its input.
        store: where to keep the store (default: a temporary folder, removed afterwards).
        tables: the tables to return (default: every table the run wrote, a processor's
            own included).

    Returns:
        ``{"summary": one-row frame, "<table>": rows...}`` for every table that has rows.

    Example:
        >>> from pipelines import Pipeline
        >>> pipeline = Pipeline.from_dict({"name": "t",
        ...     "source": {"format": "jsonl", "path": ["-"]},
        ...     "mapping": {"event_type": "type", "timestamp": "at", "payload": {"json": "data"}}})
        >>> out = run_local(pipeline, [{"type": "a.b", "at": "2024-01-01T00:00:00Z", "data": {}}])
        >>> out["events"].height
        1
    """
    with tempfile.TemporaryDirectory(prefix="eventray-test-") as scratch:
        root = Path(store) if store is not None else Path(scratch) / "store"
        if isinstance(events, str | Path):
            inputs = [str(events)]
        else:
            path = Path(scratch) / "events.jsonl"
            path.write_text("".join(json.dumps(e, default=str) + "\n" for e in events))
            inputs = [str(path)]
        summary = pipeline.run(store=root, runner="local", inputs=inputs)
        out = {"summary": pl.DataFrame([{k: v for k, v in summary.items() if not isinstance(v, dict)}])}
        names = tables if tables is not None else sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
        for table in names:
            files = list((root / table).glob("**/*.parquet"))
            if files:
                out[table] = pl.read_parquet(files, hive_partitioning=False).sort(
                    [c for c in ("timestamp", "event_id") if c in pl.read_parquet_schema(files[0])])
        return out


def check_processor(processor: Any, events: pa.Table, *, splits: int = 5, seed: int = 0) -> None:
    """The conformance checks a processor should pass (raises ``AssertionError`` naming the
    first that fails).

    - Picklable: Ray ships it to every partition actor.
    - The same derived events (ids included) for any split of ``events`` into batches: each
      key's in the same order (across keys the order may follow the batches).
    - The same derived events after ``snapshot()`` -> ``restore()`` in mid-stream, into a
      fresh instance (stateful processors only).
    - Deterministic ids: two fresh instances derive the same ids.

    Args:
        processor: a function, or an object with ``process`` (and ``snapshot`` / ``restore``).
        events: envelope rows in per-key order (for example a store's ``events`` table read
            back with Polars or pyarrow, or rows built with :func:`pipelines.envelope_schema`).
        splits: how many random splits into batches to try.
        seed: the splits' seed.
    """
    import pickle

    try:
        pickle.loads(pickle.dumps(processor))
    except Exception as exc:  # any pickling error is the finding
        raise AssertionError(f"processor is not picklable: {exc}") from exc
    # Rows read back through Polars carry large or view string types; the pipeline hands a
    # processor its envelope with plain ones, and derived rows are built in that schema.
    events = events.cast(_plain_schema(events.schema))
    context = StepContext(events.schema)
    whole = _derive(processor, [events], context)
    again = _derive(processor, [events], context)
    assert whole.equals(again), "two fresh instances derived different events or ids"
    rng = np.random.default_rng(seed)
    for _ in range(splits):
        cuts = np.sort(rng.choice(np.arange(1, max(events.num_rows, 2)),
                                  size=min(3, max(events.num_rows - 1, 0)), replace=False))
        bounds = [0, *cuts.tolist(), events.num_rows]
        batches = [events.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
        split = _derive(processor, batches, context)
        assert _per_key(split).equals(_per_key(whole)), \
            f"derived events differ when the input is split at {cuts.tolist()}"
        if callable(getattr(processor, "snapshot", None)):
            resumed = _derive(processor, batches, context, restore_after=1)
            assert _per_key(resumed).equals(_per_key(whole)), \
                "derived events differ after snapshot -> restore"


def _per_key(derived: pa.Table) -> pa.Table:
    """Derived events grouped by key, each key's in the order derived: what a split of the
    input may not change. Across keys the order follows the batches (a processor may emit a
    batch's events sorted by time), so it is not compared."""
    if derived.num_rows == 0:
        return derived
    return derived.take(pc.sort_indices(derived, [("key", "ascending")]))  # a stable sort


def _derive(processor: Any, batches: list[pa.Table], context: StepContext,
            restore_after: int | None = None) -> pa.Table:
    step = PythonStep.of("check", ["*"], copy.deepcopy(processor), context)
    out = []
    for i, batch in enumerate(batches):
        if restore_after is not None and i == restore_after:
            state = json.loads(json.dumps(step.snapshot()))  # plain data, as a checkpoint keeps it
            step = PythonStep.of("check", ["*"], copy.deepcopy(processor), context)
            step.restore(state)
        derived = step.process(batch).derived
        if derived is not None:
            out.append(derived.drop_columns(["metadata"]))
    return pa.concat_tables(out) if out else pa.table({})


def _plain_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return pa.binary()
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_plain_type(f.type)) for f in kind])
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind):
        return pa.list_(kind.value_field.with_type(_plain_type(kind.value_type)))
    return kind


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with plain string, binary and list types where it has large or view ones."""
    return pa.schema([f.with_type(_plain_type(f.type)) for f in schema], metadata=schema.metadata)
