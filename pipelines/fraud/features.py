"""The fraud handbook's 15 model inputs and the project's history features, on keyed windows.

The handbook's 15 (the comparable baseline):

- customer-keyed: count and mean amount over the 1, 7 and 30 days ending at the transaction;
- terminal-keyed: count and fraud share over the 1, 7 and 30 days ending 7 days (the label
  delay) before it.

:func:`handbook_features_batch` computes them over a whole history (pure Polars, the offline
oracle); :class:`HandbookFeatures` streams them batch by batch, and the two agree exactly
(see :mod:`pipelines.features` for the window semantics).

The history features (:data:`HISTORY_FEATURES`), beside them:

- customer-keyed, over the customer's transactions in the 30 days strictly before this one
  (:data:`CUSTOMER_HISTORY_SPEC`): their count, the amount against their mean (a ratio and
  a z-score), and the hours since the latest of them;
- keyed by (customer, terminal), a key that lives inside the customer's partition since all
  of a customer's events do (:data:`CUSTOMER_TERMINAL_SPEC`): how often the customer used
  this terminal in those 30 days (0: a terminal new to the card) and the days since it last
  did;
- terminal-keyed (:data:`TERMINAL_HISTORY_SPEC`): the terminal's fraud share in the weeks
  ending 14, 21 and 28 days before the transaction. With the handbook's windows (ending 7
  days before) they tell a compromise that began recently, and is likely still going on,
  from one that began four weeks ago. Like every label aggregate they read labels only
  through windows ending at least the label delay before the transaction.

:func:`history_features_batch` computes them offline; :class:`HistoryFeatures` (the customer
side) and the terminal spec's operator stream them, with the same equality.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.features import (
    DAY,
    Aggregate,
    FrameLike,
    KeyedWindowOperator,
    KeyedWindowSpec,
    StateRestoreError,
    Window,
    as_frame,
    pack_states,
    unpack_states,
    window_features_batch,
)
from pipelines.hashing import stable_hash64

__all__ = [
    "CUSTOMER_HISTORY_SPEC",
    "CUSTOMER_TERMINAL_SPEC",
    "HANDBOOK_CUSTOMER_SPEC",
    "HANDBOOK_FEATURES",
    "HANDBOOK_LABEL_DELAY",
    "HANDBOOK_TERMINAL_SPEC",
    "HISTORY_FEATURES",
    "TERMINAL_HISTORY_FEATURES",
    "TERMINAL_HISTORY_SPEC",
    "HandbookFeatures",
    "HistoryFeatures",
    "calendar_features",
    "customer_history_features",
    "days_since_known",
    "handbook_features_batch",
    "history_features_batch",
    "history_inputs",
    "terminal_history_features",
]

HANDBOOK_LABEL_DELAY = 7 * DAY
_HANDBOOK_DAYS = (1, 7, 30)


def _handbook_customer_spec() -> KeyedWindowSpec:
    aggregates: list[Aggregate] = []
    for n in _HANDBOOK_DAYS:
        window = Window(n * DAY)
        aggregates += [Aggregate(f"CUSTOMER_ID_NB_TX_{n}DAY_WINDOW", "count", window),
                       Aggregate(f"CUSTOMER_ID_AVG_AMOUNT_{n}DAY_WINDOW", "mean", window, "TX_AMOUNT")]
    # carry_residual: the handbook's pandas rolling sums never restart, even after long gaps.
    return KeyedWindowSpec("CUSTOMER_ID", "TX_DATETIME", tuple(aggregates), carry_residual=True)


def _handbook_terminal_spec() -> KeyedWindowSpec:
    aggregates: list[Aggregate] = []
    for n in _HANDBOOK_DAYS:
        window = Window(n * DAY, delay=HANDBOOK_LABEL_DELAY)
        aggregates += [Aggregate(f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW", "count", window),
                       Aggregate(f"TERMINAL_ID_RISK_{n}DAY_WINDOW", "share", window, "TX_FRAUD", empty=0.0)]
    return KeyedWindowSpec("TERMINAL_ID", "TX_DATETIME", tuple(aggregates),
                           label="TX_FRAUD", label_delay=HANDBOOK_LABEL_DELAY)


#: Customer-keyed: count and mean amount over the 1, 7 and 30 days ending at the transaction.
HANDBOOK_CUSTOMER_SPEC = _handbook_customer_spec()
#: Terminal-keyed: count and fraud share over 1, 7 and 30 days ending 7 days (the label delay) before.
HANDBOOK_TERMINAL_SPEC = _handbook_terminal_spec()
#: The 15 model inputs, in the handbook's order.
HANDBOOK_FEATURES = (
    "TX_DURING_WEEKEND", "TX_DURING_NIGHT",
    *(a.name for a in HANDBOOK_CUSTOMER_SPEC.aggregates),
    *(a.name for a in HANDBOOK_TERMINAL_SPEC.aggregates),
)


def calendar_features(transactions: FrameLike) -> pl.DataFrame:
    """``TX_DURING_WEEKEND`` (Saturday or Sunday) and ``TX_DURING_NIGHT`` (hour <= 6), as Int64.

    Example:
        >>> at = pl.DataFrame({"TX_DATETIME": [dt.datetime(2018, 7, 1, 6, 59), dt.datetime(2018, 7, 2, 7)]})
        >>> calendar_features(at).rows()
        [(1, 1), (0, 0)]
    """
    when = pl.col("TX_DATETIME")
    return as_frame(transactions).select(
        (when.dt.weekday() >= 6).cast(pl.Int64).alias("TX_DURING_WEEKEND"),
        (when.dt.hour() <= 6).cast(pl.Int64).alias("TX_DURING_NIGHT"),
    )


def _handbook_frame(
    transactions: pl.DataFrame, customer: pl.DataFrame, terminal: pl.DataFrame
) -> pl.DataFrame:
    """``TRANSACTION_ID`` and the 15 inputs with the published dtypes (counts as Float64)."""
    parts = [transactions.select("TRANSACTION_ID"), calendar_features(transactions), customer, terminal]
    frame = pl.concat(parts, how="horizontal")
    return frame.with_columns(pl.col(pl.Int64).exclude("TRANSACTION_ID", "TX_DURING_WEEKEND",
                                                       "TX_DURING_NIGHT").cast(pl.Float64))


def handbook_features_batch(transactions: FrameLike) -> pl.DataFrame:
    """The handbook's 15 inputs over a whole history (offline, pure Polars).

    Args:
        transactions: Handbook transactions (``TRANSACTION_ID``, ``TX_DATETIME``,
            ``CUSTOMER_ID``, ``TERMINAL_ID``, ``TX_AMOUNT``, ``TX_FRAUD``), each key's rows in
            time order; include at least 37 days before the rows whose features you use.

    Returns:
        ``TRANSACTION_ID`` then :data:`HANDBOOK_FEATURES`, one row per input row, input order.

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3))
        >>> handbook_features_batch(t).columns[:3]
        ['TRANSACTION_ID', 'TX_DURING_WEEKEND', 'TX_DURING_NIGHT']
    """
    frame = as_frame(transactions)
    return _handbook_frame(frame, window_features_batch(frame, HANDBOOK_CUSTOMER_SPEC),
                           window_features_batch(frame, HANDBOOK_TERMINAL_SPEC))


class HandbookFeatures:
    """The handbook's 15 inputs, streamed: a customer-keyed and a terminal-keyed operator.

    The two operators share nothing: a runtime may run them in one actor (this class) or as
    two keyed stages (``customer`` and ``terminal``, each partitioned by its own key). The
    customer operator reads ``CUSTOMER_ID``, ``TX_DATETIME`` and ``TX_AMOUNT``; the terminal
    operator reads ``TERMINAL_ID``, ``TX_DATETIME`` and the label ``TX_FRAUD``, the latter
    only for rows at least 7 days older than the event (see the module docstring).

    Attributes:
        customer: The operator of :data:`HANDBOOK_CUSTOMER_SPEC`.
        terminal: The operator of :data:`HANDBOOK_TERMINAL_SPEC`.

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3))
        >>> online = HandbookFeatures()
        >>> parts = [online.update(t.slice(0, 50)), online.update(t.slice(50))]
        >>> pl.concat(parts).equals(handbook_features_batch(t))
        True
    """

    def __init__(self) -> None:
        self.customer = KeyedWindowOperator(HANDBOOK_CUSTOMER_SPEC)
        self.terminal = KeyedWindowOperator(HANDBOOK_TERMINAL_SPEC)

    def update(self, batch: FrameLike) -> pl.DataFrame:
        """Add a batch of transactions; return ``TRANSACTION_ID`` and the 15 inputs per row."""
        frame = as_frame(batch)
        return _handbook_frame(frame, self.customer.update(frame), self.terminal.update(frame))

    def snapshot(self) -> bytes:
        """Both operators' states as bytes."""
        return pack_states([self.customer.snapshot(), self.terminal.snapshot()])

    def restore(self, data: bytes) -> None:
        """Restore both operators from :meth:`snapshot`.

        Raises:
            StateRestoreError: the snapshot is corrupt or not a handbook snapshot.
        """
        parts = unpack_states(data)
        if len(parts) != 2:
            raise StateRestoreError(f"expected 2 operator states, got {len(parts)}")
        self.customer.restore(parts[0])
        self.terminal.restore(parts[1])


#: The history windows end this long before the transaction: they hold the key's earlier
#: transactions only (event times are microseconds), never the transaction itself.
BEFORE = dt.timedelta(microseconds=1)
HISTORY = 30 * DAY
_HOURS_WITHOUT_HISTORY = HISTORY / dt.timedelta(hours=1)
_DAYS_WITHOUT_HISTORY = HISTORY / DAY
_TERMINAL_DELAYS = (14, 21, 28)
#: Unit conversions as multipliers. Polars divides a column by a scalar as a multiplication by
#: its reciprocal, except for a column of one row, which it divides: the two differ in the last
#: bit, so a quotient would depend on how the events were batched. A product does not.
_HOURS_PER_US = 1 / 3.6e9
_DAYS_PER_US = 1 / 8.64e10


def _customer_history_spec() -> KeyedWindowSpec:
    window = Window(HISTORY, delay=BEFORE)
    return KeyedWindowSpec("CUSTOMER_ID", "TX_DATETIME", (
        Aggregate("_CUSTOMER_COUNT", "count", window),
        Aggregate("_CUSTOMER_MEAN", "mean", window, "TX_AMOUNT"),
        Aggregate("_CUSTOMER_MEAN_SQUARE", "mean", window, "_TX_AMOUNT_SQUARE"),
        Aggregate("_CUSTOMER_LAST_US", "last", window, "_TX_EPOCH_US"),
    ))


def _customer_terminal_spec() -> KeyedWindowSpec:
    window = Window(HISTORY, delay=BEFORE)
    return KeyedWindowSpec("_CUSTOMER_TERMINAL", "TX_DATETIME", (
        Aggregate("_PAIR_COUNT", "count", window),
        Aggregate("_PAIR_LAST_US", "last", window, "_TX_EPOCH_US"),
    ))


def _terminal_history_spec() -> KeyedWindowSpec:
    aggregates = tuple(
        Aggregate(f"TERMINAL_ID_RISK_7DAY_WINDOW_{d}DAY_BEFORE", "share", Window(7 * DAY, delay=d * DAY),
                  "TX_FRAUD", empty=0.0)
        for d in _TERMINAL_DELAYS)
    known = Window(HISTORY, delay=HANDBOOK_LABEL_DELAY)
    fraud_times = (Aggregate("_TERMINAL_FIRST_FRAUD_US", "min", known, "_FRAUD_FIRST_US"),
                   Aggregate("_TERMINAL_LAST_FRAUD_US", "max", known, "_FRAUD_LAST_US"))
    return KeyedWindowSpec("TERMINAL_ID", "TX_DATETIME", aggregates + fraud_times,
                           label="TX_FRAUD", label_delay=HANDBOOK_LABEL_DELAY)


#: Customer-keyed: the customer's transactions in the 30 days before this one.
CUSTOMER_HISTORY_SPEC = _customer_history_spec()
#: Keyed by (customer, terminal): the customer's transactions at this terminal in the 30 days before.
CUSTOMER_TERMINAL_SPEC = _customer_terminal_spec()
#: Terminal-keyed: the fraud share of the weeks ending 14, 21 and 28 days before, and the
#: times of the first and last frauds among the 30 days ending 7 days before.
TERMINAL_HISTORY_SPEC = _terminal_history_spec()
#: The terminal-keyed history features, in order.
TERMINAL_HISTORY_FEATURES = (
    *(a.name for a in TERMINAL_HISTORY_SPEC.aggregates if not a.name.startswith("_")),
    "TERMINAL_ID_DAYS_SINCE_FIRST_KNOWN_FRAUD",
    "TERMINAL_ID_DAYS_SINCE_LAST_KNOWN_FRAUD",
)
#: The customer-side history features (customer and customer-terminal keys), in order.
CUSTOMER_HISTORY_FEATURES = (
    "CUSTOMER_ID_NB_TX_BEFORE_30DAY_WINDOW",
    "CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW",
    "CUSTOMER_ID_AMOUNT_ZSCORE_30DAY_WINDOW",
    "CUSTOMER_ID_HOURS_SINCE_LAST_TX",
    "CUSTOMER_TERMINAL_NB_TX_BEFORE_30DAY_WINDOW",
    "CUSTOMER_TERMINAL_DAYS_SINCE_LAST_TX",
)
#: Every history feature, in order: the model inputs beyond the handbook's 15.
HISTORY_FEATURES = (*CUSTOMER_HISTORY_FEATURES, *TERMINAL_HISTORY_FEATURES)


def history_inputs(transactions: FrameLike) -> pl.DataFrame:
    """The columns the history operators read: the key, the time and the amount, plus the
    amount's square, the time as epoch microseconds (Float64, exact below 2**53 us, year
    2255) and the (customer, terminal) key, a stable 64-bit hash of the pair.

    Example:
        >>> at = pl.DataFrame({"CUSTOMER_ID": [1], "TERMINAL_ID": [2], "TX_AMOUNT": [3.0],
        ...                    "TX_DATETIME": [dt.datetime(1970, 1, 1, 0, 0, 1)]})
        >>> history_inputs(at)["_TX_EPOCH_US"].to_list()
        [1000000.0]
    """
    frame = as_frame(transactions)
    pair = frame.select(pl.format("{}:{}", "CUSTOMER_ID", "TERMINAL_ID")).to_series().to_arrow()
    return frame.select(
        "CUSTOMER_ID", "TX_DATETIME", "TX_AMOUNT",
        _TX_AMOUNT_SQUARE=pl.col("TX_AMOUNT") * pl.col("TX_AMOUNT"),
        _TX_EPOCH_US=pl.col("TX_DATETIME").dt.epoch("us").cast(pl.Float64),
        _CUSTOMER_TERMINAL=pl.Series(stable_hash64(pair).view(np.int64)),
    )


def _history_input_table(batch: pa.Table) -> pa.Table:
    """:func:`history_inputs` as an Arrow table, computed with Arrow and numpy for integer
    ids, a microsecond time and a Float64 amount without nulls (the live path: bit for bit
    the Polars expressions, which run for any other input)."""
    if not _plain_history_inputs(batch):
        return history_inputs(batch).to_arrow()
    customer, terminal = batch.column("CUSTOMER_ID"), batch.column("TERMINAL_ID")
    time, amount = batch.column("TX_DATETIME"), batch.column("TX_AMOUNT")
    pair = pc.binary_join_element_wise(customer.cast(pa.string()), terminal.cast(pa.string()), ":")
    money = amount.to_numpy()
    return pa.table({
        "CUSTOMER_ID": customer, "TX_DATETIME": time, "TX_AMOUNT": amount,
        "_TX_AMOUNT_SQUARE": money * money,
        "_TX_EPOCH_US": np.asarray(time.to_numpy()).view(np.int64).astype(np.float64),
        "_CUSTOMER_TERMINAL": stable_hash64(pair).view(np.int64)})


def _plain_history_inputs(batch: pa.Table) -> bool:
    """Integer ids, a microsecond timestamp and a Float64 amount, none null."""
    names = ("CUSTOMER_ID", "TERMINAL_ID", "TX_DATETIME", "TX_AMOUNT")
    if any(name not in batch.column_names for name in names):
        return False
    customer, terminal, time, amount = (batch.column(name) for name in names)
    return (pa.types.is_integer(customer.type) and pa.types.is_integer(terminal.type)
            and pa.types.is_timestamp(time.type) and time.type.unit == "us"
            and pa.types.is_float64(amount.type)
            and not any(c.null_count for c in (customer, terminal, time, amount)))


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 (nulls as NaN: they only reach branches that are not taken)."""
    return np.asarray(table.column(name).to_numpy(), dtype=np.float64)


def _customer_history_arrays(inputs: pa.Table, customer: dict[str, np.ndarray],
                             pair: dict[str, np.ndarray]) -> pa.Table:
    """:func:`customer_history_features` in numpy, operation for operation (the same IEEE
    results: the online path's, equal to the offline Polars one bit for bit), from the
    operators' features as floats (:meth:`KeyedWindowOperator.update_numpy`)."""
    count, mean = customer["_CUSTOMER_COUNT"], customer["_CUSTOMER_MEAN"]
    amount, now = _floats(inputs, "TX_AMOUNT"), _floats(inputs, "_TX_EPOCH_US")
    pairs, seen = pair["_PAIR_COUNT"], count > 0
    with np.errstate(all="ignore"):  # the branch not taken may divide by zero, as in Polars
        spread = customer["_CUSTOMER_MEAN_SQUARE"] - mean * mean
        deviation = np.sqrt(np.where(spread < 0.0, 0.0, spread))
        columns = [
            count,
            np.where(seen, amount / (mean + 1.0), 1.0),
            np.where(seen, (amount - mean) / (deviation + 1.0), 0.0),
            np.where(seen, (now - customer["_CUSTOMER_LAST_US"]) * _HOURS_PER_US,
                     _HOURS_WITHOUT_HISTORY),
            pairs,
            np.where(pairs > 0, (now - pair["_PAIR_LAST_US"]) * _DAYS_PER_US, _DAYS_WITHOUT_HISTORY),
        ]
    return pa.table(dict(zip(CUSTOMER_HISTORY_FEATURES, columns, strict=True)))


def customer_history_features(
    inputs: pl.DataFrame, customer: pl.DataFrame, pair: pl.DataFrame
) -> pl.DataFrame:
    """:data:`CUSTOMER_HISTORY_FEATURES` from the operators' outputs (Float64, never null).

    A customer without earlier transactions in the window has ratio 1, z-score 0, and 30
    days (720 hours) since its last transaction; likewise for a terminal new to the card.
    The amount is compared with the mean of the earlier amounts plus one (a currency unit),
    so a small mean does not blow the ratio up.
    """
    count, mean = pl.col("_CUSTOMER_COUNT"), pl.col("_CUSTOMER_MEAN")
    deviation = (pl.col("_CUSTOMER_MEAN_SQUARE") - mean * mean).clip(lower_bound=0.0).sqrt()
    amount, now = pl.col("TX_AMOUNT"), pl.col("_TX_EPOCH_US")
    seen = count > 0
    return pl.concat([inputs, customer, pair], how="horizontal").select(
        count.cast(pl.Float64).alias(CUSTOMER_HISTORY_FEATURES[0]),
        pl.when(seen).then(amount / (mean + 1.0)).otherwise(1.0).alias(CUSTOMER_HISTORY_FEATURES[1]),
        pl.when(seen).then((amount - mean) / (deviation + 1.0)).otherwise(0.0)
        .alias(CUSTOMER_HISTORY_FEATURES[2]),
        pl.when(seen).then((now - pl.col("_CUSTOMER_LAST_US")) * _HOURS_PER_US)
        .otherwise(_HOURS_WITHOUT_HISTORY)
        .alias(CUSTOMER_HISTORY_FEATURES[3]),
        pl.col("_PAIR_COUNT").cast(pl.Float64).alias(CUSTOMER_HISTORY_FEATURES[4]),
        pl.when(pl.col("_PAIR_COUNT") > 0).then((now - pl.col("_PAIR_LAST_US")) * _DAYS_PER_US)
        .otherwise(_DAYS_WITHOUT_HISTORY).alias(CUSTOMER_HISTORY_FEATURES[5]),
    )


def history_features_batch(transactions: FrameLike) -> pl.DataFrame:
    """:data:`HISTORY_FEATURES` over a whole history (offline, pure Polars).

    Args:
        transactions: as for :func:`handbook_features_batch`.

    Returns:
        ``TRANSACTION_ID`` then :data:`HISTORY_FEATURES`, one row per input row, input order.

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3))
        >>> history_features_batch(t).columns[1]
        'CUSTOMER_ID_NB_TX_BEFORE_30DAY_WINDOW'
    """
    frame = as_frame(transactions)
    inputs = history_inputs(frame)
    customer = customer_history_features(
        inputs, window_features_batch(inputs, CUSTOMER_HISTORY_SPEC),
        window_features_batch(inputs, CUSTOMER_TERMINAL_SPEC))
    epoch_us = pl.col("TX_DATETIME").dt.epoch("us").cast(pl.Float64)
    fraud = pl.col("TX_FRAUD") != 0
    terminal = window_features_batch(frame.with_columns(
        _FRAUD_FIRST_US=pl.when(fraud).then(epoch_us).otherwise(float("inf")),
        _FRAUD_LAST_US=pl.when(fraud).then(epoch_us).otherwise(float("-inf"))), TERMINAL_HISTORY_SPEC)
    return pl.concat([frame.select("TRANSACTION_ID"), customer, terminal_history_features(
        inputs["_TX_EPOCH_US"], terminal)], how="horizontal")


def terminal_history_features(epoch_us: pl.Series, terminal: pl.DataFrame) -> pl.DataFrame:
    """:data:`TERMINAL_HISTORY_FEATURES` from the terminal operator's outputs.

    Args:
        epoch_us: each transaction's time in epoch microseconds (Float64).
        terminal: the outputs of :data:`TERMINAL_HISTORY_SPEC` (or the stage's equivalent):
            the three shares, and the transaction times (epoch us) of the first and last
            known frauds (infinite, or null, when there is none).

    Returns:
        The shares, and the days since the first and the last known fraud (0: none known).
    """
    def days_since(column: str) -> pl.Expr:
        at = pl.col(column)
        known = at.is_finite().fill_null(False)
        return pl.when(known).then((pl.col("_NOW_US") - at) * _DAYS_PER_US).otherwise(0.0)

    shares = [name for name in TERMINAL_HISTORY_FEATURES if "_RISK_" in name]
    return terminal.with_columns(_NOW_US=epoch_us).select(
        *shares,
        days_since("_TERMINAL_FIRST_FRAUD_US").alias(TERMINAL_HISTORY_FEATURES[-2]),
        days_since("_TERMINAL_LAST_FRAUD_US").alias(TERMINAL_HISTORY_FEATURES[-1]))


def days_since_known(now_us: np.ndarray, at: np.ndarray) -> np.ndarray:
    """:func:`terminal_history_features`' days since a known fraud, in numpy (the live
    path): days from ``at`` (epoch us; infinite or NaN when none is known) to ``now_us``,
    0 when none is known."""
    with np.errstate(all="ignore"):  # the branch not taken may be infinite
        return np.where(np.isfinite(at), (now_us - at) * _DAYS_PER_US, 0.0)


class HistoryFeatures:
    """The customer-side history features, streamed: a customer-keyed and a
    (customer, terminal)-keyed operator, both run where the customer's events are.

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3))
        >>> online = HistoryFeatures()
        >>> parts = [online.update(t.slice(0, 50)), online.update(t.slice(50))]
        >>> offline = history_features_batch(t).select(CUSTOMER_HISTORY_FEATURES)
        >>> pl.concat(parts).equals(offline)
        True
    """

    def __init__(self, allowed_lateness: dt.timedelta = dt.timedelta(0)) -> None:
        self.specs = tuple(dataclasses.replace(spec, allowed_lateness=allowed_lateness)
                           for spec in (CUSTOMER_HISTORY_SPEC, CUSTOMER_TERMINAL_SPEC))
        self.customer, self.pair = (KeyedWindowOperator(spec) for spec in self.specs)

    def update(self, batch: FrameLike) -> pl.DataFrame:
        """Add a batch of transactions; return :data:`CUSTOMER_HISTORY_FEATURES` per row."""
        table = batch if isinstance(batch, pa.Table) else as_frame(batch).to_arrow()
        frame = pl.from_arrow(self.update_arrow(table))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def update_arrow(self, batch: pa.Table) -> pa.Table:
        """:meth:`update` on an Arrow table, the features as one (the live path, without a
        Polars query: each costs a tenth of a millisecond or more whatever the rows)."""
        inputs = _history_input_table(batch)
        return _customer_history_arrays(inputs, self.customer.update_numpy(inputs),
                                        self.pair.update_numpy(inputs))

    def snapshot(self) -> bytes:
        """Both operators' states as bytes."""
        return pack_states([self.customer.snapshot(), self.pair.snapshot()])

    def restore(self, data: bytes) -> None:
        """Restore both operators from :meth:`snapshot`.

        Raises:
            StateRestoreError: the snapshot is corrupt or not a history snapshot.
        """
        parts = unpack_states(data)
        if len(parts) != 2:
            raise StateRestoreError(f"expected 2 operator states, got {len(parts)}")
        self.customer, self.pair = (KeyedWindowOperator(spec) for spec in self.specs)
        self.customer.restore(parts[0])
        self.pair.restore(parts[1])
