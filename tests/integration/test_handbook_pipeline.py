"""The fraud pipeline over the handbook's five months, on a real local Ray (one run).

`eventray run configs/fraud.yaml --input ../shared/data/fraud-handbook` (the session's run,
``handbook_run`` in tests/conftest.py, which the store's tests read too) stores every
transaction once with its label event, and the scores table's 15 inputs, streamed by the
two keyed stages, equal the Polars batch reference exactly and the handbook's published
features of July and August except where the handbook's own tie order decides (see
tests/unit/test_features.py). Skipped without the shared data.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipelines.fraud.features import HANDBOOK_FEATURES, handbook_features_batch
from tests.support import HandbookRun, parity_report

pytestmark = pytest.mark.slow
N_TRANSACTIONS = 1_466_282


def test_every_transaction_is_stored_once_with_its_label(handbook_run: HandbookRun) -> None:
    summary, store = handbook_run.summary, handbook_run.store
    assert summary["events_in"] == summary["derived"] == N_TRANSACTIONS
    assert summary["stored"] == 2 * N_TRANSACTIONS and summary["dead_lettered"] == 0
    counts = pl.scan_parquet(store / "events" / "**" / "*.parquet", hive_partitioning=True).group_by(
        "event_type").agg(pl.len(), pl.col("data").struct.field("TRANSACTION_ID").n_unique()).sort(
        "event_type").collect().rows()
    assert counts == [("fraud.reported", N_TRANSACTIONS, N_TRANSACTIONS),
                      ("transaction.created", N_TRANSACTIONS, N_TRANSACTIONS)]


def test_streamed_inputs_equal_the_reference_and_the_published_features(
    handbook_run: HandbookRun, handbook_dir: Path
) -> None:
    store = handbook_run.store
    transactions = pl.concat([pl.read_parquet(handbook_dir / f"transactions-2018-0{m}.parquet")
                              for m in range(4, 9)])
    scores = pl.read_parquet(store / "scores" / "**" / "*.parquet", hive_partitioning=True)
    online = transactions.select("TRANSACTION_ID").join(
        scores.select("TRANSACTION_ID", *HANDBOOK_FEATURES), on="TRANSACTION_ID", how="left",
        maintain_order="left")
    assert_frame_equal(online, handbook_features_batch(transactions), check_exact=True)
    published = pl.concat([pl.read_parquet(handbook_dir / f"features-2018-0{m}.parquet") for m in (7, 8)])
    report = parity_report(transactions, published, online)
    assert report.filter(~pl.col("terminal_tie"))["other_equal"].all()
    assert report.filter(~pl.col("customer_tie"))["count_equal"].all()
    # mean amounts after a same-second pair carry the handbook's tie order (< 500 rows)
    assert report.filter(~pl.col("customer_tie") & ~pl.col("customer_equal")).height < 500
