"""Labelled fraud features for training and evaluation: from the event store, or offline.

The models (:mod:`models.fraud`, :mod:`models.evaluation`) want one frame: a row per
transaction with ``TRANSACTION_ID``, ``TX_DATETIME``, ``CUSTOMER_ID``, ``TERMINAL_ID``,
``TX_FRAUD`` and the handbook's 15 inputs (:data:`~models.fraud.HANDBOOK_FEATURES`), sorted
by ``TX_DATETIME`` then ``TRANSACTION_ID``. Two ways to build it:

- :func:`feature_frame` (the default everywhere): what the streaming pipeline wrote. The
  fraud step's rows of table ``scores`` (``step == "fraud"``, event type
  ``transaction.created``) carry the transaction's ids, time, amount and the 14 engineered
  inputs as the pipeline computed them; the labels are the ``fraud.reported`` events of
  table ``events`` (``data.TRANSACTION_ID``, ``data.TX_FRAUD``), one per transaction, 7 days
  after it. Features are joined to labels on ``TRANSACTION_ID``; a transaction whose label
  is not in the store yet is left out (it cannot be trained or scored against).
- :func:`offline_feature_frame`: the same frame computed from the handbook's (or the
  simulator's) monthly transaction files with
  :func:`pipelines.fraud.features.handbook_features_batch` over the whole history, so the windows
  are warm. Online equals offline, so both frames agree; it serves to develop models
  without a pipeline run and to cross-check a store (:func:`compare_frames`).

Errors are :class:`pipelines.errors.StoreError` (the store lacks the tables or holds
duplicates), :class:`pipelines.errors.ConfigError` (a bad folder or option) and
:class:`ModelCommandError` (a ``models`` error met by a command, see :func:`model_errors`).

Example:
    >>> frame = feature_frame("store/fraud", start=dt.date(2018, 7, 1))  # doctest: +SKIP
    >>> frame.columns[:4]  # doctest: +SKIP
    ['TRANSACTION_ID', 'TX_DATETIME', 'CUSTOMER_ID', 'TERMINAL_ID']
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from models.fraud import HANDBOOK_FEATURES, HISTORY_FEATURES, LABEL, ModelError
from pipelines.errors import ConfigError, PipelineError, StoreError
from pipelines.fraud.features import handbook_features_batch, history_features_batch
from pipelines.store import EventStore

FeatureSource = Literal["store", "offline"]
ID_COLUMNS: tuple[str, ...] = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID")
#: The columns of every frame built here, in order (a store written before the history
#: features existed gives the frame without :data:`~models.fraud.HISTORY_FEATURES`).
FRAME_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, LABEL, *HANDBOOK_FEATURES, *HISTORY_FEATURES)
FRAUD_STEP = "fraud"
TRANSACTION_TYPE = "transaction.created"
LABEL_TYPE = "fraud.reported"
#: Labels arrive this long after their transaction; label scans reach this far past ``end``.
LABEL_DELAY = dt.timedelta(days=7)
_LABEL_SLACK = dt.timedelta(days=1)
Day = dt.date | dt.datetime


class ModelCommandError(PipelineError):
    """A model cannot be trained or evaluated as asked (a :class:`models.fraud.ModelError`)."""


@contextmanager
def model_errors() -> Iterator[None]:
    """Re-raise the ``models`` package's errors as :class:`ModelCommandError` for the CLI."""
    try:
        yield
    except ModelError as error:
        raise ModelCommandError(str(error)) from error


def _moment(day: Day | None) -> dt.datetime | None:
    """A UTC-aware instant: a date is its midnight; a naive datetime is taken as UTC."""
    if day is None:
        return None
    if not isinstance(day, dt.datetime):
        day = dt.datetime.combine(day, dt.time())
    return day.replace(tzinfo=dt.UTC) if day.tzinfo is None else day.astimezone(dt.UTC)


def _features_from_store(
    store: EventStore, start: dt.datetime | None, end: dt.datetime | None
) -> pl.DataFrame:
    scores = store.scan("scores", event_types=[TRANSACTION_TYPE], start=start, end=end)
    names = scores.collect_schema().names()
    missing = [name for name in (*ID_COLUMNS, *HANDBOOK_FEATURES, "step") if name not in names]
    if missing:
        raise StoreError(f"{store.root}: table 'scores' lacks the fraud step's columns {missing}")
    history = HISTORY_FEATURES if all(name in names for name in HISTORY_FEATURES) else ()
    return (
        scores.filter(pl.col("step") == FRAUD_STEP)
        .select(
            *(pl.col(name).cast(pl.Int64) for name in ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID")),
            pl.col("TX_DATETIME").cast(pl.Datetime("us")),
            *(pl.col(name) for name in (*HANDBOOK_FEATURES, *history)),
        )
        .collect()
    )


def _labels_from_store(
    store: EventStore, start: dt.datetime | None, end: dt.datetime | None
) -> pl.DataFrame:
    # A label is stamped 7 days after its transaction: scan that much past ``end``.
    reach = None if end is None else end + LABEL_DELAY + _LABEL_SLACK
    events = store.scan("events", event_types=[LABEL_TYPE], start=start, end=reach)
    labels = events.select(
        pl.col("data").struct.field("TRANSACTION_ID").cast(pl.Int64),
        pl.col("data").struct.field(LABEL).cast(pl.Int64),
    ).collect()
    return labels.unique("TRANSACTION_ID", keep="first", maintain_order=True)


def feature_frame(
    store_root: str | Path, start: Day | None = None, end: Day | None = None
) -> pl.DataFrame:
    """Labelled features of the transactions in ``[start, end)`` as the pipeline stored them.

    Args:
        store_root: the event store a fraud pipeline run wrote.
        start: first day (or instant, UTC) of transaction time; ``None``: from the beginning.
        end: the day (or instant) after the range; ``None``: to the end.

    Returns:
        :data:`FRAME_COLUMNS`, one row per labelled transaction, in time order.

    Raises:
        StoreError: the store lacks fraud scores or labels, or holds a transaction twice.
    """
    store = EventStore(store_root)
    lo, hi = _moment(start), _moment(end)
    features = _features_from_store(store, lo, hi)
    doubled = features.height - features.get_column("TRANSACTION_ID").n_unique()
    if doubled:
        raise StoreError(f"{store.root}: {doubled} transactions have more than one fraud score row")
    labelled = features.join(_labels_from_store(store, lo, hi), on="TRANSACTION_ID", how="inner")
    return labelled.select(name for name in FRAME_COLUMNS if name in labelled.columns).sort(
        "TX_DATETIME", "TRANSACTION_ID")


def read_transactions(directory: str | Path) -> pl.DataFrame:
    """Every ``transactions-*.parquet`` of ``directory`` (handbook or simulator files), in time order.

    Raises:
        ConfigError: there is no such file.
    """
    files = sorted(Path(directory).glob("transactions-*.parquet"))
    if not files:
        raise ConfigError(f"--data {directory}: no transactions-*.parquet files")
    return pl.concat([pl.read_parquet(path) for path in files]).sort("TX_DATETIME", "TRANSACTION_ID")


def offline_features(transactions: pl.DataFrame) -> pl.DataFrame:
    """:data:`FRAME_COLUMNS` for every row of ``transactions`` (the whole history, so warm).

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = pl.from_arrow(simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3)))
        >>> offline_features(t).columns == list(FRAME_COLUMNS)
        True
    """
    inputs = pl.concat([handbook_features_batch(transactions),
                        history_features_batch(transactions).drop("TRANSACTION_ID")], how="horizontal")
    frame = transactions.select(*ID_COLUMNS, "TX_AMOUNT", LABEL).join(
        inputs, on="TRANSACTION_ID", how="left", maintain_order="left")
    return frame.with_columns(pl.col("TX_DATETIME").cast(pl.Datetime("us"))).select(FRAME_COLUMNS)


def offline_feature_frame(
    directory: str | Path, start: Day | None = None, end: Day | None = None
) -> pl.DataFrame:
    """:func:`feature_frame`'s frame computed offline from monthly transaction files.

    The features are computed over every file of ``directory`` before the range is cut, so
    a row's windows see its whole past, as the pipeline's do.
    """
    frame = offline_features(read_transactions(directory))
    lo, hi = _moment(start), _moment(end)
    when = pl.col("TX_DATETIME").dt.replace_time_zone("UTC")
    if lo is not None:
        frame = frame.filter(when >= lo)
    if hi is not None:
        frame = frame.filter(when < hi)
    return frame


def load_frame(
    source: FeatureSource,
    *,
    store: str | Path | None = None,
    data: str | Path | None = None,
    start: Day | None = None,
    end: Day | None = None,
) -> pl.DataFrame:
    """The labelled frame from the store (``source="store"``) or offline from ``data``.

    Raises:
        ConfigError: the source's location was not given.
    """
    if source == "store":
        if store is None:
            raise ConfigError("--store is required to read features from the store")
        return feature_frame(store, start, end)
    if data is None:
        raise ConfigError("--data is required with --features offline")
    return offline_feature_frame(data, start, end)


def compare_frames(
    store_frame: pl.DataFrame, offline_frame: pl.DataFrame, rtol: float = 1e-9
) -> dict[str, int]:
    """Parity of two frames on their common transactions: rows compared, rows that differ.

    A feature differs when it is not within ``rtol`` (relative) of the other frame's value;
    the handbook's own features differ only for same-second ties, and the pipeline's and
    the offline ones should not differ at all.

    Example:
        >>> from pipelines.fraud.simulator import SimulationSpec, simulate_transactions
        >>> t = pl.from_arrow(simulate_transactions(SimulationSpec(n_customers=20, n_terminals=40, n_days=3)))
        >>> compare_frames(offline_features(t), offline_features(t))["differing_rows"]
        0
    """
    joined = store_frame.join(offline_frame, on="TRANSACTION_ID", how="inner", suffix="_OFFLINE")
    differs = np.zeros(joined.height, dtype=bool)
    compared = [name for name in (*HANDBOOK_FEATURES, *HISTORY_FEATURES, LABEL)
                if f"{name}_OFFLINE" in joined.columns]
    for name in compared:
        ours = joined.get_column(name).cast(pl.Float64).to_numpy()
        theirs = joined.get_column(f"{name}_OFFLINE").cast(pl.Float64).to_numpy()
        differs |= ~np.isclose(ours, theirs, rtol=rtol, atol=0.0)
    return {"store_rows": store_frame.height, "offline_rows": offline_frame.height,
            "common_rows": joined.height, "differing_rows": int(differs.sum())}
