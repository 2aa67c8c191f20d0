"""The fraud flow: the handbook's model inputs, streamed through two keyed stages, and scoring.

Transactions are keyed by customer, but six of the handbook's inputs are terminal windows.
The flow has two keyed stages:

1. :class:`TerminalRiskStage`, an enrichment stage partitioned by ``TERMINAL_ID``, sees the
   terminal's transactions and its label events (``fraud.reported``, released by
   :class:`pipelines.labels.LabelFeed` a label delay after each transaction) in source
   order, and returns per transaction its terminal's count of transactions and share of
   frauds over 1, 7 and 30 days ending 7 days before it (stage kind ``handbook_terminal``).
   It never sees a label before its delay has passed: the count of frauds in a window is
   a count of label *events*, and a label event exists in the stream only once its time
   has come. The driver joins the returned columns back onto the source batch (by row
   position), so the batch keeps its order and goes on to stage 2 as one piece; these
   columns travel as ``_``-prefixed transit columns that the store never writes.
2. :class:`FraudStep` (step kind ``fraud``), in the customer-keyed partitions, adds the
   customer windows and the calendar flags, and the customer-side history features (the
   amount against the customer's 30 days before, the time since its last transaction, and
   keyed by (customer, terminal), which a customer's partition holds whole, how new the
   terminal is to the card); it scores with a registry model and writes ``scores`` (the 15
   inputs under the handbook's names, the history features beside them, the score and the
   model version) and ``alerts``. The terminal stage adds the terminal's history features
   (fraud shares of earlier weeks, days since its first and last known frauds) likewise.

Both plug into the engine through its public seams (the entry points of the
``eventray.stages`` and ``eventray.processors`` groups); the engine imports nothing from
here. Both equal :func:`pipelines.fraud.features.handbook_features_batch` and
:func:`pipelines.fraud.features.history_features_batch` over the whole history (tested on
the handbook's published features and on simulator data). A model named ``latest`` is
re-resolved every ``reload_every`` batches, so a new registry version is picked up without
a restart; every score row records ``name:version``. The version in use is part of the
step's snapshot, so a restored step replays its batches with the model that scored them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipelines.envelope import EVENT_TYPE_PATTERN
from pipelines.features import (
    DAY,
    Aggregate,
    KeyedWindowOperator,
    KeyedWindowSpec,
    StateRestoreError,
    Window,
)
from pipelines.fraud.features import (
    HANDBOOK_CUSTOMER_SPEC,
    HANDBOOK_FEATURES,
    HANDBOOK_LABEL_DELAY,
    HISTORY,
    HISTORY_FEATURES,
    TERMINAL_HISTORY_FEATURES,
    HistoryFeatures,
    days_since_known,
)
from pipelines.processing import (
    ALERTS_SCHEMA,
    ROW_POSITION,
    SCORES_SCHEMA,
    Step,
    StepContext,
    StepOutput,
    alert_events,
    alert_rows,
    alert_version_of,
    rows_of_types,
)
from pipelines.spec import NAME_PATTERN, EnrichSpec, StepSpec
from pipelines.tables import conform

if TYPE_CHECKING:  # scikit-learn and skops load only where a model is scored
    from models.fraud import FraudModel
    from models.registry import ModelRegistry

#: The 15 model inputs in the handbook's order: the amount, then the engineered features.
MODEL_INPUTS = ("TX_AMOUNT", *HANDBOOK_FEATURES)

#: The customer windows as the partitions keep them. Priority lanes may send a customer's
#: high-priority events ahead of other customers' earlier ones (never ahead of its own), so
#: a partition's event time can run ahead of some keys by the queued batches' span; keys
#: idle for their horizon are expired only this far behind the latest time seen, which keeps
#: the results exact (expiry changes memory, never values).
CUSTOMER_SPEC = dataclasses.replace(HANDBOOK_CUSTOMER_SPEC, allowed_lateness=90 * DAY)
POSITION = ROW_POSITION
_DAYS = (1, 7, 30)
#: The terminal history windows: a week ending this many days before the transaction.
_RISK_BEFORE = tuple(name for name in TERMINAL_HISTORY_FEATURES if "_RISK_" in name)
_BEFORE_DAYS = tuple(int(name.split("_")[-2].removesuffix("DAY")) for name in _RISK_BEFORE)
_LABEL_DELAY_US = HANDBOOK_LABEL_DELAY // dt.timedelta(microseconds=1)
TERMINAL_FEATURES = (
    *(name for n in _DAYS
      for name in (f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW", f"TERMINAL_ID_RISK_{n}DAY_WINDOW")),
    *TERMINAL_HISTORY_FEATURES)
#: The transit columns the terminal stage adds to a batch (Float64; null for non-transactions).
TERMINAL_TRANSIT = tuple(f"_{name}" for name in TERMINAL_FEATURES)
IDS = ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID")

#: The ``scores`` rows of the fraud step: the common columns (``score`` null while no model
#: is loaded), the ids, the transaction time, the 15 inputs under the handbook's names and
#: the history features (:data:`pipelines.fraud.features.HISTORY_FEATURES`) beside them.
FRAUD_SCORES_SCHEMA = pa.schema([
    *(SCORES_SCHEMA.field(name) for name in ("event_id", "event_type", "timestamp", "key", "step", "model")),
    pa.field("score", pa.float64()),
    *(pa.field(name, pa.int64()) for name in IDS),
    pa.field("TX_DATETIME", pa.timestamp("us")),
    pa.field("TX_AMOUNT", pa.float64()),
    pa.field("TX_DURING_WEEKEND", pa.int64()),
    pa.field("TX_DURING_NIGHT", pa.int64()),
    *(pa.field(name, pa.float64()) for name in MODEL_INPUTS[3:]),
    *(pa.field(name, pa.float64()) for name in HISTORY_FEATURES),
])


#: ``models``: one row per batch in which a step started scoring with a model version (and
#: after a restore), so that an alert's model can be traced to its training data and
#: threshold from the store alone (``eventray explain``).
MODELS_SCHEMA = pa.schema([
    pa.field("event_type", pa.string(), nullable=False),  # always "model.loaded"
    pa.field("timestamp", pa.timestamp("us", "UTC"), nullable=False),  # the batch's first event
    pa.field("step", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),  # name:version
    pa.field("registry", pa.string()),
    pa.field("trained_from", pa.string()),
    pa.field("trained_to", pa.string()),
    pa.field("created_at", pa.string()),
    pa.field("threshold", pa.float64()),
    pa.field("features", pa.list_(pa.string())),  # the model's inputs, in its order
])
MODEL_LOADED = "model.loaded"


class ModelRef(BaseModel):
    """A model in the registry: ``latest`` follows new versions while the pipeline runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: str = Field(description="the registry directory")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: int | Literal["latest"] = "latest"
    reload_every: int = Field(default=10, ge=1, description="batches between checks for a new version")


class FraudStepSpec(StepSpec):
    """The fraud handbook's 15 inputs per transaction (customer windows computed here,
    terminal windows from the ``terminal`` enrichment stage), scored by a registry model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = "fraud"
    name: str = Field(default="fraud", pattern=NAME_PATTERN)
    event_types: list[str] = Field(default_factory=lambda: ["transaction.created"], min_length=1)
    model: ModelRef | None = Field(default=None, description="absent: features only, no score")
    threshold: float = Field(default=0.5, ge=0, le=1)
    alert_type: str = Field(default="fraud.suspected", pattern=EVENT_TYPE_PATTERN)
    emit_alerts: bool = True


class TerminalStageSpec(EnrichSpec):
    """The terminal stage: transactions and their label events, by terminal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = "handbook_terminal"
    event_types: list[str] = Field(default_factory=lambda: ["transaction.created", "fraud.reported"])
    transaction_type: str = Field(default="transaction.created", pattern=EVENT_TYPE_PATTERN)
    label_type: str = Field(default="fraud.reported", pattern=EVENT_TYPE_PATTERN)


def _terminal_spec() -> KeyedWindowSpec:
    """Counts of a terminal's transactions 7 days back, and of its label events up to now.

    A label event for a transaction at ``s`` is at ``s + 7 days``, so the label events in
    ``(t - n, t]`` are exactly those of the transactions in ``(t - 7 - n, t - 7]``; the
    history weeks ``(t - d - 7, t - d]`` likewise pair with label events in
    ``(t - d, t - d + 7]``.
    """
    aggregates: list[Aggregate] = []
    for n in _DAYS:
        aggregates += [
            Aggregate(f"tx_{n}", "sum", Window(n * DAY, delay=HANDBOOK_LABEL_DELAY), "is_tx"),
            Aggregate(f"fraud_{n}", "sum", Window(n * DAY), "is_fraud"),
        ]
    for d in _BEFORE_DAYS:
        aggregates += [
            Aggregate(f"tx_before_{d}", "sum", Window(7 * DAY, delay=d * DAY), "is_tx"),
            Aggregate(f"fraud_before_{d}", "sum", Window(7 * DAY, delay=d * DAY - HANDBOOK_LABEL_DELAY),
                      "is_fraud"),
        ]
    # The label events of the last 30 days are those of the transactions in (t - 37, t - 7].
    aggregates += [Aggregate("_TERMINAL_FIRST_FRAUD_US", "min", Window(HISTORY), "fraud_first_us"),
                   Aggregate("_TERMINAL_LAST_FRAUD_US", "max", Window(HISTORY), "fraud_last_us")]
    return KeyedWindowSpec("TERMINAL_ID", "time", tuple(aggregates))


def _is(kind: pa.ChunkedArray, event_type: str) -> np.ndarray:
    """Whether each event is of ``event_type`` (nulls are not), as a numpy mask."""
    return pc.fill_null(pc.equal(kind, event_type), False).to_numpy(zero_copy_only=False)


def _epoch_us(times: pa.ChunkedArray) -> np.ndarray:
    """Microseconds since the epoch of a timestamp column without nulls (the envelope's)."""
    return np.asarray(times.to_numpy()).astype("datetime64[us]").view(np.int64)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 (nulls as NaN)."""
    return np.asarray(table.column(name).to_numpy(), dtype=np.float64)


def _shares(frauds: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A fraud share: ``frauds / count``, 0 where the count is 0."""
    return np.divide(frauds, count, out=np.zeros_like(frauds), where=count > 0)


def _terminal_table(position: pa.Array, now_us: np.ndarray, sums: dict[str, np.ndarray]) -> pa.Table:
    """:data:`POSITION` and :data:`TERMINAL_TRANSIT` of the transactions from the terminal
    operator's sums, in numpy: a Polars query costs a tenth of a millisecond or more per
    batch, whatever the rows (the offline oracle,
    :func:`pipelines.fraud.features.history_features_batch`, is Polars:
    the tests hold the two equal bit for bit)."""
    columns: dict[str, np.ndarray] = {}
    for n in _DAYS:
        columns[f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW"] = sums[f"tx_{n}"]
        columns[f"TERMINAL_ID_RISK_{n}DAY_WINDOW"] = _shares(sums[f"fraud_{n}"], sums[f"tx_{n}"])
    for d, name in zip(_BEFORE_DAYS, _RISK_BEFORE, strict=True):
        columns[name] = _shares(sums[f"fraud_before_{d}"], sums[f"tx_before_{d}"])
    columns[TERMINAL_HISTORY_FEATURES[-2]] = days_since_known(now_us, sums["_TERMINAL_FIRST_FRAUD_US"])
    columns[TERMINAL_HISTORY_FEATURES[-1]] = days_since_known(now_us, sums["_TERMINAL_LAST_FRAUD_US"])
    schema = pa.schema([pa.field(POSITION, position.type),
                        *(pa.field(f"_{name}", pa.float64()) for name in TERMINAL_FEATURES)])
    return pa.Table.from_arrays([position, *(pa.array(columns[name], pa.float64())
                                                      for name in TERMINAL_FEATURES)], schema=schema)


class TerminalRiskStage(Step):
    """The terminal-keyed stage: count and fraud share of a terminal's past transactions.

    Its input is a batch of ``transaction.created`` and ``fraud.reported`` events of the
    terminals it owns, in source order, with a :data:`POSITION` column; its output (as
    ``derived``) has :data:`POSITION` and :data:`TERMINAL_TRANSIT` for the transactions.

    Example:
        >>> spec = TerminalStageSpec(name="terminal", key="TERMINAL_ID")
        >>> TerminalRiskStage(spec).name
        'terminal'
    """

    spec_class = TerminalStageSpec
    #: The transit columns it adds.
    columns = TERMINAL_TRANSIT
    #: The payload field it reads besides its key (the label of ``fraud.reported``).
    reads = ("TX_FRAUD",)

    def __init__(self, spec: TerminalStageSpec, context: StepContext | None = None) -> None:
        self.spec, self.name = spec, spec.name
        self.transaction_type, self.label_type = spec.transaction_type, spec.label_type
        self.operator = KeyedWindowOperator(_terminal_spec())

    def process(self, events: pa.Table) -> StepOutput:
        kind = events.column("event_type")
        is_tx = _is(kind, self.transaction_type)
        is_label = _is(kind, self.label_type)
        if not (is_tx | is_label).any():
            return StepOutput()
        if not (is_tx | is_label).all():
            keep = is_tx | is_label
            events, is_tx, is_label = events.filter(pa.array(keep)), is_tx[keep], is_label[keep]
        data = events.column("data")
        is_fraud = is_label & (pc.fill_null(pc.struct_field(data, "TX_FRAUD"), 0).to_numpy() != 0)
        # A label event is stamped 7 days after its transaction: the transaction's time, exactly.
        epoch_us = _epoch_us(events.column("timestamp"))
        fraud_us = (epoch_us - _LABEL_DELAY_US).astype(np.float64)
        rows = pa.table({
            POSITION: events.column(POSITION), "is_tx": is_tx,
            "TERMINAL_ID": pc.struct_field(data, self.spec.key), "time": events.column("timestamp"),
            "is_fraud": is_fraud,
            "fraud_first_us": np.where(is_fraud, fraud_us, np.inf),
            "fraud_last_us": np.where(is_fraud, fraud_us, -np.inf)})
        sums = self.operator.update_numpy(rows)
        transactions = np.flatnonzero(is_tx)
        position = rows.column(POSITION).take(pa.array(transactions)).combine_chunks()
        return StepOutput(derived=_terminal_table(
            position, epoch_us[transactions].astype(np.float64),
            {name: values[transactions] for name, values in sums.items()}))

    def snapshot(self) -> Any:
        return base64.b64encode(self.operator.snapshot()).decode()

    def restore(self, state: Any) -> None:
        self.operator = KeyedWindowOperator(_terminal_spec())
        if state is not None:
            self.operator.restore(base64.b64decode(state))


class ModelSlot:
    """The model a step scores with: pinned, or following a registry name's latest version.

    The version in use is part of the step's checkpoint (:meth:`snapshot`): a restored step
    scores the batches it replays with the version that scored them the first time, even if
    a newer one has appeared since, and resolves ``latest`` again at the same batch counts
    as before.
    """

    def __init__(self, spec: FraudStepSpec) -> None:
        self.ref = spec.model
        self.registry: ModelRegistry | None = None
        if self.ref is not None:
            from models.registry import ModelRegistry

            self.registry = ModelRegistry(self.ref.registry)
        self.model: FraudModel | None = None
        self.version: int | None = None
        self.label = "none"
        self.batches = 0
        self.loaded_facts: dict[str, Any] | None = None

    def announce(self, step: str, threshold: float, first: Any) -> pa.Table | None:
        """The ``models`` row of a version loaded since the last call (``None``: none)."""
        facts, self.loaded_facts = self.loaded_facts, None
        if facts is None or self.ref is None:
            return None
        trained = facts.get("training_range") or {}
        return pa.Table.from_pylist([{
            "event_type": MODEL_LOADED, "timestamp": first, "step": step, "model": self.label,
            "registry": str(self.ref.registry), "trained_from": trained.get("start"),
            "trained_to": trained.get("end"), "created_at": facts.get("created_at"),
            "threshold": threshold, "features": list(facts.get("features") or [])}], MODELS_SCHEMA)

    def current(self) -> FraudModel | None:
        """The model to score this batch with (``None``: no model yet)."""
        if self.ref is None or self.registry is None:
            return None
        due = self.model is None or (self.ref.version == "latest"
                                     and self.batches % self.ref.reload_every == 0)
        self.batches += 1
        if due:
            wanted = self.registry.latest_version(self.ref.name) if self.ref.version == "latest" \
                else self.ref.version
            self._load(wanted)
        return self.model

    def _load(self, wanted: int | None) -> None:
        assert self.ref is not None and self.registry is not None
        if wanted is None or wanted == self.version:
            return
        loaded = self.registry.load(self.ref.name, wanted)
        self.model, self.version, self.label = loaded.model, wanted, f"{self.ref.name}:{wanted}"
        self.loaded_facts = loaded.metadata  # announced in the next batch's ``models`` row

    def snapshot(self) -> dict[str, int | None]:
        """The version in use (``None``: none yet) and the batches scored so far."""
        return {"version": self.version, "batches": self.batches}

    def restore(self, state: dict[str, int | None] | None) -> None:
        """Load exactly the version of a :meth:`snapshot` and continue its batch count.

        Raises:
            StateRestoreError: the snapshot is not a model slot's.
        """
        self.model, self.version, self.label, self.batches = None, None, "none", 0
        self.loaded_facts = None
        if state is None:
            return
        if not isinstance(state, dict) or not isinstance(state.get("batches"), int):
            raise StateRestoreError(f"not a model slot snapshot: {state!r}")
        self.batches = state["batches"]
        if state.get("version") is not None and self.registry is not None:
            self._load(state["version"])
            # announced already, in a batch the checkpoint covers: a restore adds no row,
            # so a recovered run writes exactly the models rows a fault-free one does
            self.loaded_facts = None


def _conformed(columns: list[pa.Array | pa.ChunkedArray], schema: pa.Schema) -> pa.Table:
    """``pa.Table.cast`` of the columns to ``schema`` (nulls refused where it has none),
    casting only the columns not of its type already: a cast costs some microseconds even
    to the same type, and the scores have forty columns."""
    cast = []
    for column, field in zip(columns, schema, strict=True):
        if not field.nullable and column.null_count:
            raise ValueError(f"Casting field {field.name!r} with null values to non-nullable")
        cast.append(column if column.type == field.type else column.cast(field.type))
    return pa.Table.from_arrays([pa.chunked_array([c]) if isinstance(c, pa.Array) else c for c in cast],
                                schema=schema)


def _float64(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A count as Float64 (rounded to nearest, as Polars casts it); a Float64 as it is."""
    return column if column.type == pa.float64() else column.cast(pa.float64(), safe=False)


def _naive(times: pa.ChunkedArray) -> pa.ChunkedArray:
    """UTC times without their zone (``dt.replace_time_zone(None)``): a UTC column keeps its
    values, so only the type changes; another zone's wall clock is taken by Polars."""
    if times.type.tz in (None, "UTC"):
        return times.cast(pa.timestamp(times.type.unit))
    series = pl.from_arrow(times)
    assert isinstance(series, pl.Series)
    return pa.chunked_array([series.dt.replace_time_zone(None).to_arrow()])


class FraudStep(Step):
    """Customer windows + terminal transit columns -> the 15 inputs, a score and alerts.

    Example:
        >>> FraudStep(FraudStepSpec(kind="fraud")).name
        'fraud'
    """

    spec_class = FraudStepSpec

    def __init__(self, spec: FraudStepSpec, context: StepContext | None = None) -> None:
        self.spec, self.name = spec, spec.name
        self.envelope = context.envelope if context is not None else None
        self.alert_version = alert_version_of(context, spec.alert_type)
        self.customer = KeyedWindowOperator(CUSTOMER_SPEC)
        self.history = HistoryFeatures(allowed_lateness=CUSTOMER_SPEC.allowed_lateness)
        self.slot = ModelSlot(spec)

    def process(self, events: pa.Table) -> StepOutput:
        mine = rows_of_types(events, self.spec.event_types)
        if mine.num_rows == 0:
            return StepOutput()
        present = set(mine.column_names)
        missing = [c for c in TERMINAL_TRANSIT if c not in present]
        if missing:
            raise ValueError(f"step {self.name}: the batch lacks the terminal stage's columns "
                             f"{missing}; configure an enrich stage of kind handbook_terminal")
        inputs = self.inputs(mine)
        model = self.slot.current()
        raw = model.score(inputs) if model is not None else np.full(mine.num_rows, np.nan)
        scored = self._scored(mine, inputs, raw)
        tables = {"scores": scored}
        if model is None:
            return StepOutput(tables=tables)
        announced = self.slot.announce(self.name, self.spec.threshold, mine.column("timestamp")[0].as_py())
        if announced is not None:
            tables["models"] = announced
        flagged = raw >= self.spec.threshold  # NaN (no score) is never flagged
        if not flagged.any():  # the usual batch: no alert rows, no alert events
            tables["alerts"] = ALERTS_SCHEMA.empty_table()
            return StepOutput(tables=tables)
        chosen = pa.array(flagged)
        frame, parents = pl.from_arrow(scored.filter(chosen)), pl.from_arrow(mine.filter(chosen))
        assert isinstance(frame, pl.DataFrame) and isinstance(parents, pl.DataFrame)
        alerts = alert_rows(frame, self.name, self.spec.alert_type, self.spec.threshold)
        tables["alerts"] = conform(alerts.to_arrow(), ALERTS_SCHEMA)
        derived = alert_events(alerts, parents, self.envelope, self.name, self.alert_version) \
            if self.spec.emit_alerts else None
        return StepOutput(tables=tables, derived=derived)

    def _scored(self, mine: pa.Table, inputs: pa.Table, raw: np.ndarray) -> pa.Table:
        """The ``scores`` rows: the events' ids, the step, the model, the score (null where
        there is none) and the inputs."""
        n = mine.num_rows
        columns = {name: mine.column(name) for name in ("event_id", "event_type", "timestamp", "key")}
        columns |= {"step": pa.repeat(self.name, n), "model": pa.repeat(self.slot.label, n),
                    "score": pa.array(raw, pa.float64(), mask=np.isnan(raw))}
        columns |= {name: inputs.column(name) for name in inputs.column_names}
        return _conformed([columns[name] for name in FRAUD_SCORES_SCHEMA.names], FRAUD_SCORES_SCHEMA)

    def features(self, mine: pl.DataFrame) -> pl.DataFrame:
        """The ids, the transaction time (naive UTC), the 15 inputs and the history features
        of each transaction (the terminal's from the stage's transit columns)."""
        frame = pl.from_arrow(self.inputs(mine.to_arrow()))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def inputs(self, mine: pa.Table) -> pa.Table:
        """:meth:`features` of an Arrow batch, as an Arrow table: read with Arrow and numpy,
        without a Polars query (each costs a tenth of a millisecond or more, whatever the
        rows, and a live batch is often one event)."""
        data = mine.column("data")
        base = pa.table({**{name: pc.struct_field(data, name) for name in IDS},
                         "TX_DATETIME": _naive(pc.struct_field(data, "TX_DATETIME")),
                         "TX_AMOUNT": pc.struct_field(data, "TX_AMOUNT")})
        customer = self.customer.update_arrow(base)
        history = self.history.update_arrow(base)
        when = base.column("TX_DATETIME")
        columns = {name: base.column(name) for name in base.column_names}
        columns["TX_DURING_WEEKEND"] = pc.greater_equal(
            pc.day_of_week(when, count_from_zero=False, week_start=1), 6).cast(pa.int64())
        columns["TX_DURING_NIGHT"] = pc.less_equal(pc.hour(when), 6).cast(pa.int64())
        columns |= {name: _float64(customer.column(name)) for name in customer.column_names}
        columns |= {name: mine.column(f"_{name}") for name in TERMINAL_FEATURES}
        columns |= {name: history.column(name) for name in history.column_names}
        return pa.table(columns)

    def snapshot(self) -> Any:
        """The windows, the history features and the model version in use (exactly-once on
        replay)."""
        return {"customer": base64.b64encode(self.customer.snapshot()).decode(),
                "history": base64.b64encode(self.history.snapshot()).decode(),
                "model": self.slot.snapshot()}

    def restore(self, state: Any) -> None:
        """Replace the windows and the model in use with a :meth:`snapshot`'s.

        Raises:
            StateRestoreError: the snapshot is not a fraud step's (an earlier format included).
        """
        self.customer = KeyedWindowOperator(CUSTOMER_SPEC)
        self.history = HistoryFeatures(allowed_lateness=CUSTOMER_SPEC.allowed_lateness)
        if state is None:
            self.slot.restore(None)
            return
        if not isinstance(state, dict) or set(state) != {"customer", "history", "model"}:
            raise StateRestoreError("not a fraud step snapshot (customer, history and model "
                                    f"expected; an earlier format?): {type(state).__name__}")
        self.customer.restore(base64.b64decode(state["customer"]))
        self.history.restore(base64.b64decode(state["history"]))
        self.slot.restore(state["model"])
