"""pipelines.fraud.data: the labelled feature frame from a store, and offline, agree."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from pipelines.errors import ConfigError, StoreError
from pipelines.fraud.data import (
    FRAME_COLUMNS,
    compare_frames,
    feature_frame,
    load_frame,
    offline_feature_frame,
    offline_features,
)
from pipelines.fraud.simulator import SimulationSpec
from pipelines.store import EventStore
from tests.fraud_store import small_transactions, write_stand_in_store, write_transaction_files

# Small: 3 weeks are enough for every property checked here.
SPEC = SimulationSpec(n_customers=150, n_terminals=300, start_date="2018-07-01", n_days=21, seed=3)


@pytest.fixture(scope="module")
def transactions() -> pl.DataFrame:
    return small_transactions(SPEC)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory, transactions: pl.DataFrame) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_stand_in_store(root, transactions, batch_rows=2_000)
    return root


def test_store_frame_equals_the_offline_frame(store_root: Path, transactions: pl.DataFrame) -> None:
    frame = feature_frame(store_root)
    assert frame.columns == list(FRAME_COLUMNS)
    assert frame.equals(offline_features(transactions))
    assert compare_frames(frame, offline_features(transactions))["differing_rows"] == 0


def test_range_is_half_open_on_transaction_time(store_root: Path, transactions: pl.DataFrame) -> None:
    frame = feature_frame(store_root, dt.date(2018, 7, 8), dt.date(2018, 7, 15))
    days = frame.get_column("TX_DATETIME").dt.date()
    assert days.min() == dt.date(2018, 7, 8) and days.max() == dt.date(2018, 7, 14)
    expected = transactions.filter(pl.col("TX_DATETIME").dt.date().is_between(dt.date(2018, 7, 8),
                                                                              dt.date(2018, 7, 14)))
    assert frame.height == expected.height
    # Labels of the range's last days are stamped a week later: they are found all the same.
    assert frame.get_column("TX_FRAUD").to_list() == expected.get_column("TX_FRAUD").to_list()


def test_offline_frame_from_files_matches_the_store(tmp_path: Path, store_root: Path,
                                                    transactions: pl.DataFrame) -> None:
    write_transaction_files(transactions, tmp_path)
    start, end = dt.date(2018, 7, 10), dt.date(2018, 7, 20)
    offline = offline_feature_frame(tmp_path, start, end)
    assert offline.equals(feature_frame(store_root, start, end))
    assert load_frame("offline", data=tmp_path, start=start, end=end).equals(offline)


def test_a_changed_feature_is_counted_as_a_parity_difference(transactions: pl.DataFrame) -> None:
    offline = offline_features(transactions)
    changed = offline.with_columns(
        pl.when(pl.col("TRANSACTION_ID") < 5).then(pl.col("TERMINAL_ID_RISK_7DAY_WINDOW") + 1.0)
        .otherwise(pl.col("TERMINAL_ID_RISK_7DAY_WINDOW")).alias("TERMINAL_ID_RISK_7DAY_WINDOW"))
    assert compare_frames(changed, offline)["differing_rows"] == 5


def test_transactions_whose_label_has_not_arrived_are_left_out(tmp_path: Path,
                                                               transactions: pl.DataFrame) -> None:
    store = write_stand_in_store(tmp_path, transactions)
    # Labels are stamped 7 days late: without the label files from 07-20 on, the
    # transactions from 07-13 on have no label yet.
    for folder in (store.root / "events" / "event_type=fraud.reported").glob("date=2018-07-2*"):
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    frame = feature_frame(tmp_path)
    assert frame.get_column("TX_DATETIME").max() < dt.datetime(2018, 7, 13)
    assert frame.height == transactions.filter(pl.col("TX_DATETIME") < dt.datetime(2018, 7, 13)).height


def test_a_store_without_label_events_is_an_error(tmp_path: Path, transactions: pl.DataFrame) -> None:
    write_stand_in_store(tmp_path, transactions, labels=False)
    with pytest.raises(StoreError, match="events"):
        feature_frame(tmp_path)


def test_missing_scores_and_doubled_rows_are_store_errors(tmp_path: Path, store_root: Path) -> None:
    with pytest.raises(StoreError, match="scores"):
        feature_frame(tmp_path)
    scores = EventStore(store_root).scan("scores").drop("event_type", "date").collect()
    doubled = EventStore(tmp_path / "doubled")
    rows = scores.head(10).with_columns(event_type=pl.lit("transaction.created")).to_arrow()
    doubled.write("scores", rows, writer="a", seq=0)
    doubled.write("scores", rows, writer="b", seq=0)
    with pytest.raises(StoreError, match="10 transactions have more than one"):
        feature_frame(tmp_path / "doubled")


def test_locations_are_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--store"):
        load_frame("store")
    with pytest.raises(ConfigError, match="--data"):
        load_frame("offline")
    with pytest.raises(ConfigError, match="no transactions"):
        load_frame("offline", data=tmp_path)


def test_the_history_feature_names_are_the_models_ones() -> None:
    from models.fraud import HISTORY_FEATURES
    from pipelines.fraud.features import HISTORY_FEATURES as PIPELINE_HISTORY

    assert PIPELINE_HISTORY == HISTORY_FEATURES
