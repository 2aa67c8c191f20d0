"""Unit tests for pipelines.fraud.simulator (the handbook's transaction generator, no Ray)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.fraud import simulator as sim
from pipelines.fraud.simulator import (
    LABEL_SCHEMA,
    TRANSACTION_SCHEMA,
    SimulationSpec,
    fraud_labels,
    simulate_transactions,
    write_monthly,
)

SHARED_DATA = (Path(__file__).parents[2] / ".." / "shared" / "data").resolve()
REFERENCE_DIR = SHARED_DATA / "fraud-handbook"
REFERENCE_FILES = sorted(REFERENCE_DIR.glob("transactions-2018-*.parquet"))
needs_reference = pytest.mark.skipif(
    not REFERENCE_FILES,
    reason=f"reference data absent: no transactions-2018-*.parquet in {REFERENCE_DIR}",
)

SMALL = SimulationSpec(n_customers=300, n_terminals=600, n_days=40, seed=7)
# Share of Normal(43200, 20000) strictly inside (0, 86400): transactions kept per draw.
KEPT_SHARE = 0.9692


@pytest.fixture(scope="module")
def small() -> pa.Table:
    return simulate_transactions(SMALL)


@pytest.fixture(scope="module")
def full() -> pa.Table:
    return simulate_transactions(SimulationSpec())


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    if not REFERENCE_FILES:
        pytest.skip(f"reference data absent: no transactions files in {REFERENCE_DIR}")
    table = pa.concat_tables(pq.read_table(f) for f in REFERENCE_FILES)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


# --- determinism and schema -------------------------------------------------------------


def test_same_seed_gives_byte_identical_output(small: pa.Table) -> None:
    again = simulate_transactions(SMALL)
    assert again.equals(small, check_metadata=True)
    assert parquet_bytes(again) == parquet_bytes(small)


def test_different_seed_gives_different_output(small: pa.Table) -> None:
    other = simulate_transactions(dataclasses.replace(SMALL, seed=8))
    assert not other.equals(small)


def test_schema_is_the_documented_one(small: pa.Table) -> None:
    assert small.schema.equals(TRANSACTION_SCHEMA, check_metadata=False)
    assert [f.name for f in small.schema] == [
        "TRANSACTION_ID",
        "TX_DATETIME",
        "CUSTOMER_ID",
        "TERMINAL_ID",
        "TX_AMOUNT",
        "TX_TIME_SECONDS",
        "TX_TIME_DAYS",
        "TX_FRAUD",
        "TX_FRAUD_SCENARIO",
    ]
    assert small.schema.metadata[b"sorted_by"] == b"TX_DATETIME,TRANSACTION_ID"


@needs_reference
def test_schema_equals_reference_files(small: pa.Table) -> None:
    for path in REFERENCE_FILES:
        ref = pq.read_schema(path)
        assert small.schema.equals(ref, check_metadata=False), path.name
        assert small.schema.metadata[b"sorted_by"] == ref.metadata[b"sorted_by"]


# --- structure --------------------------------------------------------------------------


def test_sorted_with_sequential_ids_and_consistent_times(small: pa.Table) -> None:
    c = columns(small)
    n = small.num_rows
    assert n > 0
    np.testing.assert_array_equal(c["TRANSACTION_ID"], np.arange(n))
    assert (np.diff(c["TX_TIME_SECONDS"]) >= 0).all()
    start = np.datetime64(SMALL.start_date, "ns")
    offsets = (c["TX_DATETIME"] - start) // np.timedelta64(1, "s")
    np.testing.assert_array_equal(offsets, c["TX_TIME_SECONDS"])
    np.testing.assert_array_equal(c["TX_TIME_DAYS"], c["TX_TIME_SECONDS"] // 86_400)
    assert c["TX_TIME_DAYS"].min() >= 0 and c["TX_TIME_DAYS"].max() < SMALL.n_days
    assert (c["TX_AMOUNT"] >= 0).all()
    np.testing.assert_allclose(c["TX_AMOUNT"], np.round(c["TX_AMOUNT"], 2), rtol=0, atol=1e-9)
    assert c["CUSTOMER_ID"].max() < SMALL.n_customers
    assert c["TERMINAL_ID"].max() < SMALL.n_terminals


def test_terminals_are_within_radius_and_isolated_customers_are_silent() -> None:
    spec = SimulationSpec(n_customers=400, n_terminals=150, n_days=10, radius=4.0, seed=3)
    c = columns(simulate_transactions(spec))
    profiles = sim._draw_profiles(np.random.default_rng(spec.seed), spec)
    cust_xy, term_xy = profiles.customer_xy, profiles.terminal_xy
    dist = np.linalg.norm(cust_xy[c["CUSTOMER_ID"]] - term_xy[c["TERMINAL_ID"]], axis=1)
    assert (dist < spec.radius).all()
    all_dist = np.linalg.norm(cust_xy[:, None, :] - term_xy[None, :, :], axis=2)
    isolated = np.flatnonzero((all_dist >= spec.radius).all(axis=1))
    assert len(isolated) > 0  # the spec is chosen so that some customers have no terminal
    assert not np.isin(c["CUSTOMER_ID"], isolated).any()


@settings(max_examples=40, deadline=None)
@given(
    n_customers=st.integers(1, 40),
    n_terminals=st.integers(1, 80),
    radius=st.sampled_from([0.3, 5.0, 17.5, 150.0]),
    seed=st.integers(0, 2**16),
)
def test_available_terminals_match_brute_force(
    n_customers: int, n_terminals: int, radius: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    cust = rng.uniform(0, 100, size=(n_customers, 2))
    term = rng.uniform(0, 100, size=(n_terminals, 2))
    offsets, ids = sim._available_terminals(cust, term, radius)
    dist = np.sqrt(((cust[:, None, :] - term[None, :, :]) ** 2).sum(axis=2))
    for i in range(n_customers):
        expected = np.flatnonzero(dist[i] < radius)
        np.testing.assert_array_equal(ids[offsets[i] : offsets[i + 1]], expected)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 4), rows=st.integers(1, 30), seed=st.integers(0, 99))
def test_draw_distinct_gives_distinct_values_in_range(n: int, k: int, rows: int, seed: int) -> None:
    drawn = sim._draw_distinct(np.random.default_rng(seed), rows, n, k)
    assert drawn.shape == (rows, min(k, n))
    assert ((drawn >= 0) & (drawn < n)).all()
    assert all(len(set(row)) == len(row) for row in drawn.tolist())


def test_draw_distinct_is_uniform() -> None:
    drawn = sim._draw_distinct(np.random.default_rng(0), 60_000, 5, 2)
    freq = np.bincount(drawn.ravel(), minlength=5) / drawn.size
    np.testing.assert_allclose(freq, 0.2, atol=0.01)
    pairs = np.bincount(drawn[:, 0] * 5 + drawn[:, 1], minlength=25).reshape(5, 5)
    upper = pairs[np.triu_indices(5, 1)] / len(drawn)
    np.testing.assert_allclose(upper, 0.1, atol=0.01)


def test_window_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    ids, days = rng.integers(0, 6, 500), rng.integers(0, 30, 500)
    start_ids, start_days = rng.integers(0, 6, 8), rng.integers(0, 30, 8)
    mask = sim._window_mask(ids, days, start_ids, start_days, 5, 30)
    expected = [
        any(i == si and sd <= d < sd + 5 for si, sd in zip(start_ids, start_days, strict=True))
        for i, d in zip(ids, days, strict=True)
    ]
    np.testing.assert_array_equal(mask, expected)


def test_customer_fraud_picks_a_third_of_each_window() -> None:
    spec = SimulationSpec(n_customers=20, n_terminals=10, n_days=30, seed=0)
    rng = np.random.default_rng(4)
    customer, day = rng.integers(0, 20, 3000), np.sort(rng.integers(0, 30, 3000))
    counts = sim._customer_fraud_counts(np.random.default_rng(9), customer, day, spec)
    chosen = sim._draw_distinct(np.random.default_rng(9), spec.n_days, spec.n_customers, 3)
    windows = np.zeros(len(customer), dtype=np.int64)
    expected_total = 0
    for d, row in enumerate(chosen):
        inside = np.isin(customer, row) & (day >= d) & (day < d + 14)
        windows += inside
        expected_total += int(inside.sum()) // 3
    assert counts.sum() == expected_total
    assert (counts <= windows).all()


# --- fraud scenarios --------------------------------------------------------------------


def test_fraud_rules_hold(full: pa.Table) -> None:
    c = columns(full)
    scenario, amount, fraud = c["TX_FRAUD_SCENARIO"], c["TX_AMOUNT"], c["TX_FRAUD"]
    assert set(np.unique(scenario)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(fraud, (scenario > 0).astype(np.int64))
    assert fraud[amount > 220].all()  # scenario 1, unless 2 or 3 overwrote it
    assert (amount[scenario == 1] > 220).all()
    assert (amount[scenario == 0] <= 220).all()
    assert (scenario[amount > 220] != 0).all()


def test_compromised_terminals_defraud_whole_days(full: pa.Table) -> None:
    c = columns(full)
    days, n_days = c["TX_TIME_DAYS"], SimulationSpec().n_days
    key = c["TERMINAL_ID"] * n_days + days
    hit_keys = np.unique(key[c["TX_FRAUD_SCENARIO"] == 2])
    on_hit = np.isin(key, hit_keys)
    assert np.isin(c["TX_FRAUD_SCENARIO"][on_hit], [2, 3]).all()
    compromised = np.unique(c["TERMINAL_ID"][c["TX_FRAUD_SCENARIO"] == 2])
    assert 0.8 * 2 * n_days <= len(compromised) <= 2 * n_days


def test_compromised_customers_get_five_times_their_amounts(full: pa.Table) -> None:
    c = columns(full)
    scenario, customer, amount = c["TX_FRAUD_SCENARIO"], c["CUSTOMER_ID"], c["TX_AMOUNT"]
    n_days = SimulationSpec().n_days
    victims = np.unique(customer[scenario == 3])
    assert 0.6 * 3 * n_days <= len(victims) <= 3 * n_days
    genuine = scenario == 0
    sums = np.bincount(customer[genuine], weights=amount[genuine], minlength=5000)
    mean_genuine = sums / np.maximum(np.bincount(customer[genuine], minlength=5000), 1)
    ratio = amount[scenario == 3] / mean_genuine[customer[scenario == 3]]
    assert 4.0 < np.median(ratio) < 6.0
    # A third of a victim's transactions in its 14-day window: roughly n_tx * 14 / 3 each.
    share = (scenario == 3).sum() / np.isin(customer, victims).sum()
    assert 0.02 < share < 0.2


# --- volume and rates -------------------------------------------------------------------


def test_volume_and_fraud_rate_match_the_method(full: pa.Table) -> None:
    c = columns(full)
    per_day = full.num_rows / SimulationSpec().n_days
    expected = 5000 * 2.0 * KEPT_SHARE  # mean of U(0, 4) is 2 transactions per day
    assert abs(per_day / expected - 1) < 0.04
    assert 0.005 < c["TX_FRAUD"].mean() < 0.013
    assert abs(np.mean(c["TX_TIME_SECONDS"] % 86_400) / 43_200 - 1) < 0.01


@needs_reference
def test_volume_and_fraud_share_match_reference(
    full: pa.Table, reference: dict[str, np.ndarray]
) -> None:
    c = columns(full)
    ref_days = int(reference["TX_TIME_DAYS"].max()) + 1
    ours = c["TX_TIME_DAYS"] < ref_days  # compare the same calendar span
    ref_per_day = len(reference["TX_TIME_DAYS"]) / ref_days
    assert abs(ours.sum() / ref_days / ref_per_day - 1) < 0.05
    ref_rate = reference["TX_FRAUD"].mean()
    assert abs(c["TX_FRAUD"][ours].mean() / ref_rate - 1) < 0.3
    for s in (1, 2, 3):
        ref_share = (reference["TX_FRAUD_SCENARIO"] == s).mean()
        our_share = (c["TX_FRAUD_SCENARIO"][ours] == s).mean()
        assert 0.5 < our_share / ref_share < 2.0, f"scenario {s}"
    assert abs(c["TX_AMOUNT"][ours].mean() / reference["TX_AMOUNT"].mean() - 1) < 0.05
    ref_customers = len(np.unique(reference["CUSTOMER_ID"]))
    assert len(np.unique(c["CUSTOMER_ID"][ours])) >= 0.99 * ref_customers
    assert len(np.unique(c["TERMINAL_ID"])) == len(np.unique(reference["TERMINAL_ID"]))
    ref_tod = reference["TX_TIME_SECONDS"] % 86_400
    our_tod = c["TX_TIME_SECONDS"][ours] % 86_400
    assert abs(our_tod.std() / ref_tod.std() - 1) < 0.02


# --- write_monthly ----------------------------------------------------------------------


def test_write_monthly_names_and_round_trip(tmp_path: Path) -> None:
    spec = SimulationSpec(n_customers=200, n_terminals=400, start_date="2018-04-20", n_days=45)
    table = simulate_transactions(spec)
    paths = write_monthly(table, tmp_path / "out")
    assert [p.name for p in paths] == [
        "transactions-2018-04.parquet",
        "transactions-2018-05.parquet",
        "transactions-2018-06.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]
    parts = [pq.read_table(p) for p in paths]
    assert pa.concat_tables(parts).equals(table, check_metadata=True)
    for month, part in zip((4, 5, 6), parts, strict=True):
        stamps = part.column("TX_DATETIME").to_pylist()
        assert {(t.year, t.month) for t in stamps} == {(2018, month)}
    assert write_monthly(table, tmp_path / "out") == paths  # overwrite in place
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_write_monthly_empty_table_writes_nothing(tmp_path: Path) -> None:
    assert write_monthly(TRANSACTION_SCHEMA.empty_table(), tmp_path) == []


# --- fraud_labels -----------------------------------------------------------------------


def test_fraud_labels(small: pa.Table) -> None:
    labels = fraud_labels(small, delay_days=7)
    assert labels.schema.equals(LABEL_SCHEMA, check_metadata=False)
    c, lab = columns(small), columns(labels)
    fraud_ids = c["TRANSACTION_ID"][c["TX_FRAUD"] == 1]
    assert len(fraud_ids) > 0
    np.testing.assert_array_equal(np.sort(lab["TRANSACTION_ID"]), fraud_ids)
    idx = lab["TRANSACTION_ID"]  # ids equal row positions in a simulated table
    for name in ("CUSTOMER_ID", "TERMINAL_ID", "TX_DATETIME", "TX_FRAUD_SCENARIO"):
        np.testing.assert_array_equal(lab[name], c[name][idx])
    assert ((lab["REPORTED_AT"] - lab["TX_DATETIME"]) == np.timedelta64(7, "D")).all()
    order = np.lexsort((lab["TRANSACTION_ID"], lab["REPORTED_AT"]))
    np.testing.assert_array_equal(order, np.arange(len(order)))


def test_fraud_labels_delay_zero_empty_and_invalid(small: pa.Table) -> None:
    labels = fraud_labels(small, delay_days=0)
    np.testing.assert_array_equal(
        labels.column("REPORTED_AT").to_numpy(), labels.column("TX_DATETIME").to_numpy()
    )
    genuine = small.filter(pc.equal(small.column("TX_FRAUD"), 0))
    empty = fraud_labels(genuine)
    assert empty.num_rows == 0 and empty.schema.equals(LABEL_SCHEMA, check_metadata=False)
    with pytest.raises(ValueError, match="delay_days"):
        fraud_labels(small, delay_days=-1)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_customers", 0),
        ("n_customers", -5),
        ("n_customers", 2.5),
        ("n_terminals", 0),
        ("n_days", 0),
        ("n_days", True),
        ("radius", 0.0),
        ("radius", -1.0),
        ("radius", float("nan")),
        ("radius", float("inf")),
        ("seed", -1),
        ("start_date", "2018-02-30"),
        ("start_date", "not a date"),
        ("start_date", None),
    ],
)
def test_spec_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SimulationSpec(**{field: value})


def test_spec_defaults_and_start() -> None:
    spec = SimulationSpec()
    assert (spec.n_customers, spec.n_terminals, spec.n_days) == (5000, 10000, 183)
    assert (spec.start_date, spec.radius, spec.seed) == ("2018-04-01", 5.0, 0)
    assert spec.start == np.datetime64(dt.datetime(2018, 4, 1), "ns")
    assert SimulationSpec(radius=3).radius == 3
