"""A stand-in for a fraud pipeline run: a real event store in the fraud step's layout.

Until the streaming fraud step is wired into a test run, the training and evaluation tests
need a store as such a run leaves it. This module writes one through
:meth:`pipelines.store.EventStore.write`, from transactions and their offline features
(:func:`pipelines.fraud.features.handbook_features_batch`, which the streaming features equal):

- ``scores``, event type ``transaction.created``: per transaction ``event_id``,
  ``event_type``, ``timestamp`` (UTC, us), ``key`` (the customer), ``step == "fraud"``,
  ``model`` (``"none"``), ``score`` (null: no model loaded), ``TRANSACTION_ID``,
  ``CUSTOMER_ID``, ``TERMINAL_ID``, ``TX_DATETIME`` (naive), ``TX_AMOUNT``, the 14
  engineered inputs under the handbook's names and the history features;
- ``events``: the ``transaction.created`` events and one ``fraud.reported`` event per
  transaction 7 days after it, ``data`` a struct (the union of both payloads) whose
  ``TRANSACTION_ID`` and ``TX_FRAUD`` carry the label.

It is not the pipeline: it writes what the pipeline is specified to write, in batches of
``batch_rows`` like partitions do, so the readers are tested on real Parquet files.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa

from models.fraud import HANDBOOK_FEATURES, HISTORY_FEATURES
from pipelines.fraud.features import handbook_features_batch, history_features_batch
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from pipelines.store import EventStore

LABEL_DELAY = dt.timedelta(days=7)
#: A small simulation covering the handbook's evaluation weeks (and its 4 folds), warm windows.
SMALL_SIMULATION = SimulationSpec(n_customers=600, n_terminals=1200, start_date="2018-05-20",
                                  n_days=87, seed=11)


def small_transactions(spec: SimulationSpec = SMALL_SIMULATION) -> pl.DataFrame:
    """The simulator's transactions as a Polars frame."""
    frame = pl.from_arrow(simulate_transactions(spec))
    assert isinstance(frame, pl.DataFrame)
    return frame


def write_transaction_files(transactions: pl.DataFrame, folder: Path) -> list[Path]:
    """The transactions as monthly ``transactions-YYYY-MM.parquet`` files (for ``--data``)."""
    return write_monthly(transactions.to_arrow(), folder)


def _utc(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def score_rows(transactions: pl.DataFrame) -> pl.DataFrame:
    """The fraud step's ``scores`` rows for ``transactions`` (features computed offline)."""
    features = handbook_features_batch(transactions).drop("TRANSACTION_ID")
    history = history_features_batch(transactions).select(HISTORY_FEATURES)
    return pl.concat([transactions.select(
        event_id=pl.format("tx-{}", "TRANSACTION_ID"), event_type=pl.lit("transaction.created"),
        timestamp=_utc("TX_DATETIME"), key=pl.col("CUSTOMER_ID").cast(pl.String), step=pl.lit("fraud"),
        model=pl.lit("none"), score=pl.lit(None, pl.Float64), TRANSACTION_ID="TRANSACTION_ID",
        CUSTOMER_ID="CUSTOMER_ID", TERMINAL_ID="TERMINAL_ID",
        TX_DATETIME=pl.col("TX_DATETIME").cast(pl.Datetime("us")), TX_AMOUNT="TX_AMOUNT",
    ), features.select(name for name in HANDBOOK_FEATURES if name != "TX_AMOUNT"), history], how="horizontal")


def event_rows(transactions: pl.DataFrame) -> pl.DataFrame:
    """``events``: the transactions and their ``fraud.reported`` labels, in time order."""
    payload = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD")
    created = transactions.select(
        event_id=pl.format("tx-{}", "TRANSACTION_ID"), event_type=pl.lit("transaction.created"),
        timestamp=_utc("TX_DATETIME"), key=pl.col("CUSTOMER_ID").cast(pl.String),
        data=pl.struct(*payload))
    labels = transactions.select(
        event_id=pl.format("label-{}", "TRANSACTION_ID"), event_type=pl.lit("fraud.reported"),
        timestamp=_utc("TX_DATETIME") + LABEL_DELAY, key=pl.col("TERMINAL_ID").cast(pl.String),
        data=pl.struct(*(pl.col(name) if name in ("TRANSACTION_ID", "TX_FRAUD")
                         else pl.lit(None, transactions.schema[name]).alias(name) for name in payload)))
    return pl.concat([created, labels]).sort("timestamp", maintain_order=True)


def write_stand_in_store(root: Path, transactions: pl.DataFrame, batch_rows: int = 25_000,
                         labels: bool = True) -> EventStore:
    """Write ``scores`` and ``events`` as a fraud pipeline run would (see the module docstring).

    Args:
        root: the store directory.
        transactions: simulator or handbook transactions, in time order.
        batch_rows: rows per written batch (one file per batch, event type and day).
        labels: write the ``fraud.reported`` events (False: a store whose labels are missing).
    """
    store = EventStore(root)
    events = event_rows(transactions)
    if not labels:
        events = events.filter(pl.col("event_type") != "fraud.reported")
    for table, rows in (("scores", score_rows(transactions)), ("events", events)):
        arrow: pa.Table = rows.to_arrow()
        for seq, start in enumerate(range(0, arrow.num_rows, batch_rows)):
            store.write(table, arrow.slice(start, batch_rows), writer="standin-p0", seq=seq)
    return store
