"""Simulated card transactions with labelled fraud, generated with numpy.

This is the project's own implementation of the transaction generator described in
*Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*
(Le Borgne, Siblini, Lebichot, Bontempi, Université Libre de Bruxelles, 2022), chapter 3,
"Simulated dataset". It is written from the handbook's prose description only (the
handbook's code is GPL-3.0 and is not used here), and it is fully vectorised.

The method:

1. Customers get a position ``(x, y)`` uniform in a 100 x 100 square, a mean amount
   uniform in [5, 100), a standard deviation of half that mean, and a mean number of
   transactions per day uniform in [0, 4).
2. Terminals get a position uniform in the same square. A customer can use the terminals
   strictly closer than ``radius``; a customer with none makes no transactions.
3. Each day, each customer makes Poisson(mean per day) transactions. A transaction's time of
   day is Normal(43200 s, 20000 s), dropped unless it falls strictly inside the day; its
   amount is Normal(mean, std), redrawn as Uniform(0, 2 x mean) when negative, rounded to
   cents; its terminal is uniform among the customer's terminals.
4. Transactions are sorted by time (ties: customer, then draw order) and numbered from 0.
5. Fraud, applied in this order, a later scenario overwriting the scenario code:
   (1) every amount above 220 is fraud; (2) each day two random terminals are compromised
   and all their transactions in that day and the next 27 are fraud; (3) each day three
   random customers are compromised and, among their transactions of that day and the
   next 13, a third (rounded down, drawn at random) get five times their amount and are
   fraud. A transaction picked by several scenario-3 draws is multiplied each time.

The output table has the columns and types of the handbook's published files (see
``TRANSACTION_SCHEMA``). The whole default run (5,000 customers, 10,000 terminals, 183 days,
about 1.8 million transactions) takes under a second on two cores.

Example:
    >>> table = simulate_transactions(SimulationSpec(n_customers=50, n_terminals=100, n_days=3))
    >>> table.column_names[:3]
    ['TRANSACTION_ID', 'TX_DATETIME', 'CUSTOMER_ID']
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store import write_parquet_atomic

SECONDS_PER_DAY = 86_400
AREA_SIZE = 100.0
TIME_OF_DAY_MEAN = SECONDS_PER_DAY / 2
TIME_OF_DAY_STD = 20_000.0
FRAUD_AMOUNT_THRESHOLD = 220.0
TERMINALS_PER_DAY = 2
TERMINAL_WINDOW_DAYS = 28
CUSTOMERS_PER_DAY = 3
CUSTOMER_WINDOW_DAYS = 14
CUSTOMER_FRAUD_DIVISOR = 3
CUSTOMER_AMOUNT_FACTOR = 5.0
SORTED_BY = "TX_DATETIME,TRANSACTION_ID"

TRANSACTION_SCHEMA = pa.schema(
    [
        ("TRANSACTION_ID", pa.int64()),
        ("TX_DATETIME", pa.timestamp("ns")),
        ("CUSTOMER_ID", pa.int64()),
        ("TERMINAL_ID", pa.int64()),
        ("TX_AMOUNT", pa.float64()),
        ("TX_TIME_SECONDS", pa.int64()),
        ("TX_TIME_DAYS", pa.int64()),
        ("TX_FRAUD", pa.int64()),
        ("TX_FRAUD_SCENARIO", pa.int64()),
    ]
)

LABEL_SCHEMA = pa.schema(
    [
        ("TRANSACTION_ID", pa.int64()),
        ("CUSTOMER_ID", pa.int64()),
        ("TERMINAL_ID", pa.int64()),
        ("TX_DATETIME", pa.timestamp("ns")),
        ("REPORTED_AT", pa.timestamp("ns")),
        ("TX_FRAUD_SCENARIO", pa.int64()),
    ]
)


@dataclass(frozen=True)
class SimulationSpec:
    """Parameters of one simulation run; validated on construction.

    Attributes:
        n_customers: Number of customers (positive).
        n_terminals: Number of terminals (positive).
        start_date: First simulated day, ISO ``YYYY-MM-DD``.
        n_days: Number of simulated days (positive).
        radius: Distance under which a terminal is available to a customer (positive).
        seed: Seed of ``numpy.random.default_rng`` (non-negative).

    Example:
        >>> SimulationSpec(n_days=30).n_customers
        5000
    """

    n_customers: int = 5000
    n_terminals: int = 10000
    start_date: str = "2018-04-01"
    n_days: int = 183
    radius: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_days"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        radius = self.radius
        if (
            isinstance(radius, bool)
            or not isinstance(radius, int | float)
            or not (math.isfinite(radius) and radius > 0)
        ):
            raise ValueError(f"radius must be a positive finite number, got {radius!r}")
        try:
            dt.date.fromisoformat(self.start_date)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"start_date must be an ISO date YYYY-MM-DD, got {self.start_date!r}"
            ) from exc

    @property
    def start(self) -> np.datetime64:
        """Midnight of ``start_date`` as ``datetime64[ns]``."""
        return np.datetime64(dt.date.fromisoformat(self.start_date), "ns")


class _Profiles(NamedTuple):
    customer_xy: np.ndarray  # (n_customers, 2)
    mean_amount: np.ndarray
    std_amount: np.ndarray
    mean_tx_per_day: np.ndarray
    terminal_xy: np.ndarray  # (n_terminals, 2)


class _Raw(NamedTuple):
    seconds: np.ndarray
    customer: np.ndarray
    terminal: np.ndarray
    amount: np.ndarray


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _draw_profiles(rng: np.random.Generator, spec: SimulationSpec) -> _Profiles:
    """Draw customer then terminal profiles (the first draws of a run's generator)."""
    n = spec.n_customers
    customer_xy = rng.uniform(0.0, AREA_SIZE, size=(n, 2))
    mean_amount = rng.uniform(5.0, 100.0, size=n)
    mean_tx_per_day = rng.uniform(0.0, 4.0, size=n)
    terminal_xy = rng.uniform(0.0, AREA_SIZE, size=(spec.n_terminals, 2))
    return _Profiles(customer_xy, mean_amount, mean_amount / 2.0, mean_tx_per_day, terminal_xy)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(lo[i], hi[i])`` for all i, without a Python loop."""
    lengths = hi - lo
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(lo - starts, lengths)


def _available_terminals(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Terminals strictly within ``radius`` of each customer, as CSR ``(offsets, ids)``.

    Terminals are bucketed on a grid of cells no smaller than ``radius`` and sorted by cell
    (column-major), so the 3 x 3 cells around a customer are three contiguous runs: only
    those candidates are compared, and the cost is linear in their number. Each customer's
    terminal ids are returned in increasing order.
    """
    cell = max(radius, AREA_SIZE / 2**20)
    n_cells = int(AREA_SIZE // cell) + 1
    t_cells = np.clip((terminal_xy // cell).astype(np.int64), 0, n_cells - 1)
    t_keys = t_cells[:, 0] * n_cells + t_cells[:, 1]
    order = np.argsort(t_keys, kind="stable")
    sorted_keys = t_keys[order]
    c_cells = np.clip((customer_xy // cell).astype(np.int64), 0, n_cells - 1)
    columns = c_cells[:, :1] + np.array([-1, 0, 1])  # (n_customers, 3) neighbour columns
    rows = c_cells[:, 1:]
    first = (columns * n_cells + np.maximum(rows - 1, 0)).ravel()
    last = (columns * n_cells + np.minimum(rows + 1, n_cells - 1)).ravel()
    lo = np.searchsorted(sorted_keys, first, side="left")
    hi = np.searchsorted(sorted_keys, last, side="right")
    hi = np.where(((columns >= 0) & (columns < n_cells)).ravel(), hi, lo)
    n = len(customer_xy)
    owner = np.repeat(np.arange(n, dtype=np.int64).repeat(3), hi - lo)
    terminal = order[_ranges(lo, hi)]
    dx = customer_xy[owner, 0] - terminal_xy[terminal, 0]
    dy = customer_xy[owner, 1] - terminal_xy[terminal, 1]
    near = np.sqrt(dx * dx + dy * dy) < radius
    owner, terminal = owner[near], terminal[near]
    terminal = terminal[np.argsort(owner * len(terminal_xy) + terminal)]
    counts = np.bincount(owner, minlength=n)
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), terminal.astype(np.int64)


def _draw_transactions(rng: np.random.Generator, profiles: _Profiles, spec: SimulationSpec) -> _Raw:
    """Draw every transaction of every day (unsorted, day-major order)."""
    offsets, terminal_ids = _available_terminals(
        profiles.customer_xy, profiles.terminal_xy, spec.radius
    )
    n_available = np.diff(offsets)
    counts = rng.poisson(profiles.mean_tx_per_day, size=(spec.n_days, spec.n_customers))
    counts[:, n_available == 0] = 0
    flat = counts.ravel()
    day = np.repeat(np.arange(spec.n_days, dtype=np.int64), counts.sum(axis=1))
    customer = np.repeat(np.tile(np.arange(spec.n_customers, dtype=np.int64), spec.n_days), flat)
    time = rng.normal(TIME_OF_DAY_MEAN, TIME_OF_DAY_STD, size=len(customer))
    inside = (time > 0) & (time < SECONDS_PER_DAY)
    day, customer, time = day[inside], customer[inside], time[inside]
    seconds = day * SECONDS_PER_DAY + time.astype(np.int64)
    mean = profiles.mean_amount[customer]
    amount = rng.normal(mean, profiles.std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    amount = np.round(amount, 2)
    pick = rng.integers(0, n_available[customer])
    terminal = terminal_ids[offsets[customer] + pick]
    return _Raw(seconds, customer, terminal, amount)


def _draw_distinct(rng: np.random.Generator, n_rows: int, n: int, k: int) -> np.ndarray:
    """Draw ``min(k, n)`` distinct values of ``range(n)`` per row, uniformly, vectorised.

    Each step draws ``v`` in ``range(n - i)`` and shifts it past the values already chosen
    in its row (taken in increasing order), which is uniform over the unused values.
    """
    k = min(k, n)
    chosen = np.empty((n_rows, 0), dtype=np.int64)
    for i in range(k):
        value = rng.integers(0, n - i, size=n_rows)
        for j in range(i):  # chosen is sorted per row
            value += value >= chosen[:, j]
        chosen = np.sort(np.column_stack((chosen, value)), axis=1)
    return chosen


def _window_mask(
    ids: np.ndarray,
    days: np.ndarray,
    start_ids: np.ndarray,
    start_days: np.ndarray,
    window: int,
    n_days: int,
) -> np.ndarray:
    """True where ``(ids, days)`` falls in ``[start_day, start_day + window)`` of its id."""
    ends = np.minimum(start_days + window, n_days)
    hit_days = _ranges(start_days, ends)
    hit_ids = np.repeat(start_ids, ends - start_days)
    keys = np.unique(hit_ids * n_days + hit_days)
    return np.isin(ids * n_days + days, keys)


def _customer_fraud_counts(
    rng: np.random.Generator, customer: np.ndarray, day: np.ndarray, spec: SimulationSpec
) -> np.ndarray:
    """How many scenario-3 draws picked each transaction (usually 0 or 1)."""
    chosen = _draw_distinct(rng, spec.n_days, spec.n_customers, CUSTOMERS_PER_DAY)
    group = np.repeat(np.arange(spec.n_days, dtype=np.int64), chosen.shape[1])
    keys = customer * spec.n_days + day
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    first = chosen.ravel() * spec.n_days
    lo = np.searchsorted(sorted_keys, first + group)
    hi = np.searchsorted(sorted_keys, first + np.minimum(group + CUSTOMER_WINDOW_DAYS, spec.n_days))
    candidates = by_key[_ranges(lo, hi)]
    cand_group = np.repeat(group, hi - lo)
    group_size = np.bincount(cand_group, minlength=spec.n_days)
    order = np.lexsort((rng.random(len(candidates)), cand_group))
    group_start = np.cumsum(group_size) - group_size
    rank = np.arange(len(candidates)) - group_start[cand_group[order]]
    picked = rank < (group_size // CUSTOMER_FRAUD_DIVISOR)[cand_group[order]]
    return np.bincount(candidates[order][picked], minlength=len(customer))


def _apply_fraud(
    rng: np.random.Generator, raw: _Raw, spec: SimulationSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(amount, scenario)`` after scenarios 1, 2 then 3 (see module docstring)."""
    day = raw.seconds // SECONDS_PER_DAY
    scenario = np.zeros(len(day), dtype=np.int64)
    scenario[raw.amount > FRAUD_AMOUNT_THRESHOLD] = 1
    terminals = _draw_distinct(rng, spec.n_days, spec.n_terminals, TERMINALS_PER_DAY)
    start_days = np.repeat(np.arange(spec.n_days, dtype=np.int64), terminals.shape[1])
    compromised = _window_mask(
        raw.terminal, day, terminals.ravel(), start_days, TERMINAL_WINDOW_DAYS, spec.n_days
    )
    scenario[compromised] = 2
    times = _customer_fraud_counts(rng, raw.customer, day, spec)
    amount = raw.amount.copy()
    hit = times > 0
    amount[hit] = np.round(amount[hit] * CUSTOMER_AMOUNT_FACTOR ** times[hit], 2)
    scenario[hit] = 3
    return amount, scenario


def _to_table(
    raw: _Raw, amount: np.ndarray, scenario: np.ndarray, spec: SimulationSpec
) -> pa.Table:
    """Assemble the output table (rows already sorted) with ``TRANSACTION_SCHEMA``."""
    seconds = raw.seconds
    datetimes = spec.start + seconds.astype("timedelta64[s]").astype("timedelta64[ns]")
    columns = [
        np.arange(len(seconds), dtype=np.int64),
        datetimes,
        raw.customer,
        raw.terminal,
        amount,
        seconds,
        seconds // SECONDS_PER_DAY,
        (scenario > 0).astype(np.int64),
        scenario,
    ]
    fields = TRANSACTION_SCHEMA
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, fields, strict=True)]
    metadata = {"sorted_by": SORTED_BY, "source": f"eventray pipelines.fraud.simulator {spec!r}"}
    return pa.Table.from_arrays(arrays, schema=TRANSACTION_SCHEMA.with_metadata(metadata))


def simulate_transactions(spec: SimulationSpec) -> pa.Table:
    """Simulate the handbook's transactions with fraud labels.

    Args:
        spec: Simulation parameters; the same spec always gives the same table.

    Returns:
        A table with ``TRANSACTION_SCHEMA``, sorted by ``TX_DATETIME`` then
        ``TRANSACTION_ID`` (which runs 0..n-1 in that order).

    Example:
        >>> t = simulate_transactions(SimulationSpec(n_customers=100, n_terminals=200, n_days=7))
        >>> t.column("TRANSACTION_ID")[0].as_py()
        0
    """
    rng = np.random.default_rng(spec.seed)
    profiles = _draw_profiles(rng, spec)
    raw = _draw_transactions(rng, profiles, spec)
    order = np.argsort(raw.seconds, kind="stable")
    raw = _Raw(*(column[order] for column in raw))
    amount, scenario = _apply_fraud(rng, raw, spec)
    return _to_table(raw, amount, scenario, spec)


def write_monthly(table: pa.Table, out_dir: str | Path) -> list[Path]:
    """Write one Parquet file per calendar month, named ``transactions-YYYY-MM.parquet``.

    Rows keep their order within each file. Each file is written to a temporary name in
    ``out_dir`` and renamed into place, so readers never see a partial file.

    Args:
        table: Transactions with a ``TX_DATETIME`` column (e.g. from ``simulate_transactions``).
        out_dir: Destination directory, created if missing.

    Returns:
        The written paths, in month order (empty for an empty table).

    Example:
        >>> t = simulate_transactions(SimulationSpec(n_customers=20, n_terminals=50, n_days=2))
        >>> [p.name for p in write_monthly(t, tempfile.mkdtemp())]  # doctest: +SKIP
        ['transactions-2018-04.parquet']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table.num_rows == 0:
        return []
    months = table.column("TX_DATETIME").to_numpy().astype("datetime64[M]")
    paths = []
    for month in np.unique(months):
        path = out / f"transactions-{month}.parquet"
        write_parquet_atomic(table.filter(pa.array(months == month)), path)
        paths.append(path)
    return paths


def fraud_labels(table: pa.Table, delay_days: int = 7) -> pa.Table:
    """Fraud reports as they would arrive: one row per fraudulent transaction.

    Args:
        table: Transactions with ``TRANSACTION_SCHEMA`` columns.
        delay_days: Days between a transaction and its fraud report (non-negative).

    Returns:
        A table with ``LABEL_SCHEMA`` (``REPORTED_AT = TX_DATETIME + delay_days``), sorted
        by ``REPORTED_AT`` then ``TRANSACTION_ID``.

    Example:
        >>> t = simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=30))
        >>> fraud_labels(t, delay_days=7).column_names[-2:]
        ['REPORTED_AT', 'TX_FRAUD_SCENARIO']
    """
    if not _is_int(delay_days) or delay_days < 0:
        raise ValueError(f"delay_days must be a non-negative integer, got {delay_days!r}")
    fraud = table.filter(pc.equal(table.column("TX_FRAUD"), 1))
    tx_datetime = fraud.column("TX_DATETIME").cast(pa.timestamp("ns"))
    reported = pc.add(tx_datetime, pa.scalar(dt.timedelta(days=delay_days), pa.duration("ns")))
    labels = pa.Table.from_arrays(
        [
            fraud.column("TRANSACTION_ID"),
            fraud.column("CUSTOMER_ID"),
            fraud.column("TERMINAL_ID"),
            tx_datetime,
            reported,
            fraud.column("TX_FRAUD_SCENARIO"),
        ],
        schema=LABEL_SCHEMA,
    )
    return labels.sort_by([("REPORTED_AT", "ascending"), ("TRANSACTION_ID", "ascending")])
