"""The fraud handbook's 15 model inputs, built on the engine's keyed window operators.

Customer-keyed: count and mean amount over the 1, 7 and 30 days ending at the transaction.
Terminal-keyed: count and fraud share over the 1, 7 and 30 days ending 7 days (the label
delay) before it. :func:`handbook_features_batch` computes them over a whole history (pure
Polars, the offline oracle); :class:`HandbookFeatures` streams them batch by batch, and the
two agree exactly (see :mod:`pipelines.features` for the window semantics).
"""

from __future__ import annotations

import polars as pl

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

__all__ = [
    "HANDBOOK_CUSTOMER_SPEC",
    "HANDBOOK_FEATURES",
    "HANDBOOK_LABEL_DELAY",
    "HANDBOOK_TERMINAL_SPEC",
    "HandbookFeatures",
    "calendar_features",
    "handbook_features_batch",
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
