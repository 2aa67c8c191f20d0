"""Route filters in Arrow compute against the same filters in Polars, on generated filters and
batches: the two engines must agree on every row (null counted as no match)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import sqlglot
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.route_filters import compile_filter
from pipelines.routing import safe_filter_sql

DATA = pa.struct([("amt", pa.float64()), ("n", pa.int64()), ("small", pa.int32()),
                  ("s", pa.string()), ("flag", pa.bool_())])
SCHEMA = pa.schema([("key", pa.string()), ("source", pa.large_string()), ("data", DATA)])

NUMBERS = ["data.amt", "data.n", "data.small", "LENGTH(data.s)", "LENGTH(key)"]
TEXTS = ["key", "source", "data.s", "LOWER(data.s)", "UPPER(key)"]
NUMBER_LITERALS = ["0", "1", "2", "-1", "-2", "1.5", "-0.5", "3e0"]
TEXT_LITERALS = ["'a'", "'b'", "'ab'", "'A'", "''", "'é'"]
PATTERNS = ["'a%'", "'%b'", "'_'", "'a_b%'", "'%'", "'%É%'"]


def _predicates() -> st.SearchStrategy[str]:
    number, text = st.sampled_from(NUMBERS), st.sampled_from(TEXTS)
    number_literal, text_literal = st.sampled_from(NUMBER_LITERALS), st.sampled_from(TEXT_LITERALS)
    op = st.sampled_from(["=", "<>", "<", "<=", ">", ">="])
    return st.one_of(
        st.builds("{} {} {}".format, number, op, number_literal | number),
        st.builds("{} {} {}".format, text, op, text_literal | text),
        st.builds("{} {} {}".format, text, st.sampled_from(["LIKE", "ILIKE", "NOT LIKE"]),
                  st.sampled_from(PATTERNS)),
        st.builds("{} IS {}NULL".format, number | text | st.just("data.flag"),
                  st.sampled_from(["", "NOT "])),
        st.builds("{} IN ({})".format, st.sampled_from(["data.n", "data.small"]),
                  st.lists(st.sampled_from(["0", "1", "2", "-1"]), min_size=1, max_size=3).map(", ".join)),
        st.builds("data.amt IN ({})".format,
                  st.lists(st.sampled_from(NUMBER_LITERALS), min_size=1, max_size=3).map(", ".join)),
        st.builds("{} IN ({})".format, text,
                  st.lists(st.sampled_from(TEXT_LITERALS), min_size=1, max_size=3).map(", ".join)),
        st.builds("{} BETWEEN {} AND {}".format, number, number_literal, number_literal),
        st.builds("{}({}, {})".format, st.sampled_from(["STARTS_WITH", "ENDS_WITH"]), text, text_literal),
        st.sampled_from(["data.flag", "data.flag = TRUE", "NOT data.flag", "data.n = NULL",
                         "TRUE", "FALSE"]),
    )


def _filters() -> st.SearchStrategy[str]:
    return st.recursive(_predicates(), lambda inner: st.one_of(
        st.builds("({}) AND ({})".format, inner, inner),
        st.builds("({}) OR ({})".format, inner, inner),
        st.builds("NOT ({})".format, inner)), max_leaves=4)


def _batches() -> st.SearchStrategy[pa.Table]:
    text = st.none() | st.sampled_from(["a", "b", "ab", "A", "", "aXb", "é", "É", "ba"])
    row = st.tuples(st.sampled_from(["a", "b", "ab", "A", "é"]), st.sampled_from(["a", "src"]),
                    st.none() | st.sampled_from([-2.0, -0.5, 0.0, 1.0, 1.5, 2.0, 3.0]),
                    st.none() | st.integers(-2, 3), st.none() | st.integers(-2, 3), text,
                    st.none() | st.booleans(), st.booleans())

    def table(rows: list[tuple]) -> pa.Table:
        data = pa.array([None if gone else {"amt": amt, "n": n, "small": small, "s": s, "flag": flag}
                         for _, _, amt, n, small, s, flag, gone in rows], DATA)
        return pa.table({"key": [r[0] for r in rows], "source": [r[1] for r in rows], "data": data},
                        schema=SCHEMA)
    return st.lists(row, min_size=1, max_size=12).map(table)


def polars_mask(text: str, batch: pa.Table) -> np.ndarray:
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    condition = pl.sql_expr(safe_filter_sql(text)).fill_null(False)
    return frame.with_columns(m=condition).get_column("m").to_numpy().astype(bool)


def arrow_mask(text: str, batch: pa.Table) -> np.ndarray | None:
    compiled = compile_filter(sqlglot.parse_one(safe_filter_sql(text), read="postgres"), SCHEMA)
    return None if compiled is None else np.asarray(compiled(batch).to_numpy(zero_copy_only=False), bool)


@settings(max_examples=400, deadline=None)
@given(_filters(), _batches())
def test_arrow_filters_equal_polars(text: str, batch: pa.Table) -> None:
    try:
        expected = polars_mask(text, batch)
    except Exception:  # Polars refuses it (a type error): the router refuses it at start-up
        return
    got = arrow_mask(text, batch)
    if got is not None:
        assert got.tolist() == expected.tolist(), text


@pytest.mark.parametrize("text", [
    "data.amt > 1", "key IN ('a', 'b') AND NOT data.s IS NULL", "LOWER(data.s) LIKE 'a%'",
    "data.n BETWEEN -1 AND 2 OR data.flag", "STARTS_WITH(source, 's')", "data.amt >= -0.5",
])
def test_the_common_filters_compile_to_arrow(text: str) -> None:
    """What a route usually says runs in Arrow; arithmetic, casts, unknown columns do not."""
    tree = sqlglot.parse_one(safe_filter_sql(text), read="postgres")
    assert compile_filter(tree, SCHEMA) is not None


@pytest.mark.parametrize("text", [
    "data.amt * 2 > 1", "CAST(data.n AS DOUBLE PRECISION) > 1", "COALESCE(data.s, 'a') = 'a'",
    "data.missing = 1", "Key = 'a'", "data.s LIKE 'a\\%'", "data.n IN (1.5)", "data.amt = 'a'",
])
def test_the_rest_is_left_to_polars(text: str) -> None:
    tree = sqlglot.parse_one(safe_filter_sql(text), read="postgres")
    assert compile_filter(tree, SCHEMA) is None


EDGE_ROWS = pa.table({
    "key": ["a", "A", "ab", "é", "b", "aXb"],
    "source": ["src", "a", "src", "É", "", "s"],
    "data": pa.array([{"amt": 1.5, "n": -1, "small": 2, "s": "ab", "flag": True},
                      {"amt": None, "n": None, "small": None, "s": None, "flag": None},
                      None,
                      {"amt": -0.5, "n": 3, "small": -2, "s": "É", "flag": False},
                      {"amt": 2.0, "n": 0, "small": 0, "s": "", "flag": True},
                      {"amt": 0.0, "n": 1, "small": 1, "s": "A_b", "flag": False}], DATA),
}, schema=SCHEMA)


@pytest.mark.parametrize("text", [
    "key ILIKE 'a%'", "key NOT ILIKE 'a%'", "key LIKE 'a_b'", "data.s LIKE 'A_b'", "source LIKE '%'",
    "data.s NOT LIKE '%b'", "data.flag IS NOT NULL", "data.s IS NULL", "data.n NOT IN (-1, 3)",
    "data.n IN (-1, 3)", "data.amt IN (1.5, -0.5)", "data.amt NOT IN (1, 2)", "key NOT IN ('a', 'b')",
    "data.small NOT BETWEEN -1 AND 1", "data.amt BETWEEN -1 AND 1.5", "LENGTH(data.s) = 1",
    "LOWER(source) = 'é'", "UPPER(key) = 'É'", "STARTS_WITH(key, 'a')", "ENDS_WITH(data.s, 'b')",
    "NOT data.flag", "data.flag = FALSE", "data.n = NULL", "NOT (data.n <> 3)", "data.small > data.amt",
    "data.amt >= -0.5 AND data.n < 2", "data.amt < 0 OR data.flag", "key < 'b'", "source >= key",
])
def test_each_construct_equals_polars(text: str) -> None:
    """Every construct compiled to Arrow, negated or not, on rows with null fields, a null
    payload, upper and lower and accented text: the mask Polars gives."""
    got = arrow_mask(text, EDGE_ROWS)
    assert got is not None, f"{text} should compile to Arrow"
    assert got.tolist() == polars_mask(text, EDGE_ROWS).tolist()
