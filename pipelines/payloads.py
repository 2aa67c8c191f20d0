"""Typing payload fields per batch: source values (any dtype, or JSON text) to Arrow types.

A cast that fails leaves null where the input was not: that is how validation finds a bad
field without looking at rows one by one. Numbers must fit their type: NaN, infinities and
values out of the type's range fail (a NaN amount would otherwise poison every running sum
of its key), and so do timestamps outside 1677..2262. Blank text is a missing value (an
empty CSV field), not an unreadable one.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipelines.errors import SchemaError
from pipelines.timestamps import outside_representable_range, parse_timestamp

_TRUTH = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def polars_dtype(arrow: pa.DataType) -> pl.DataType:
    """The Polars dtype of an Arrow type (through an empty array: one source of truth)."""
    return pl.from_arrow(pa.array([], arrow)).dtype


def cast_field(expr: pl.Expr, source: pl.DataType, target: pa.DataType) -> pl.Expr:
    """An expression casting ``expr`` of dtype ``source`` to the Arrow type ``target``.

    Values that cannot be read become null (strings from CSV and JSON are parsed; floats
    with a fractional part do not become ints; NaN, infinities and values out of range do
    not become numbers).

    Example:
        >>> df = pl.DataFrame({"v": ["1", "x", None, "nan", "1e400"]})
        >>> df.select(cast_field(pl.col("v"), pl.String, pa.int64())).to_series().to_list()
        [1, None, None, None, None]
    """
    text = source == pl.String
    if pa.types.is_integer(target):
        return _cast_integer(expr.str.strip_chars() if text else expr, source,
                             polars_dtype(target))
    if pa.types.is_floating(target):
        value = expr.str.strip_chars() if text else expr
        number = value.cast(polars_dtype(target), strict=False)
        return pl.when(number.is_finite()).then(number).otherwise(None)
    if pa.types.is_boolean(target):
        if text:
            return expr.str.strip_chars().str.to_lowercase().replace_strict(
                _TRUTH, default=None, return_dtype=pl.Boolean
            )
        return expr.cast(pl.Boolean, strict=False)
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return expr.cast(pl.String, strict=False)
    if pa.types.is_timestamp(target):
        return representable(parse_timestamp(expr, source))
    if pa.types.is_date32(target):
        if text:
            return expr.str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
        return parse_timestamp(expr, source).dt.date()
    if pa.types.is_list(target) or pa.types.is_struct(target):
        if text:
            return expr.str.json_decode(polars_dtype(target))
        return expr.cast(polars_dtype(target), strict=False)
    raise SchemaError(f"payload fields of type {target} are not supported")


def representable(timestamp: pl.Expr) -> pl.Expr:
    """A parsed timestamp where 1677..2262 can hold it, else null (a column, ideally: the
    expression is used twice).

    Example:
        >>> df = pl.DataFrame({"t": ["2024-01-01", "9999-01-01"]})
        >>> df.select(representable(parse_timestamp(pl.col("t"), pl.String))).to_series().is_null().to_list()
        [False, True]
    """
    return pl.when(~outside_representable_range(timestamp)).then(timestamp).otherwise(None)


def _cast_integer(value: pl.Expr, source: pl.DataType, dtype: pl.DataType) -> pl.Expr:
    """Integers as they are (never through a float, which rounds past 2**53); numbers such
    as ``"1.0"`` or ``1e3`` when whole; null for fractions, NaN, infinities and overflow."""
    if source.is_integer():
        return value.cast(dtype, strict=False)
    as_float = value.cast(pl.Float64, strict=False)
    whole = as_float.is_finite() & (as_float == as_float.floor())
    via_float = pl.when(whole).then(as_float.cast(dtype, strict=False)).otherwise(None)
    if source == pl.String:
        # Digits that do not fit are out of range, even where a float would round them in.
        exact = value.cast(dtype, strict=False)
        return pl.when(value.str.contains(r"^[+-]?\d+$")).then(exact).otherwise(
            pl.coalesce(exact, via_float))
    return via_float


def is_blank(expr: pl.Expr, source: pl.DataType) -> pl.Expr:
    """Whether a source value is blank text (an empty CSV field): a missing value.

    Example:
        >>> df = pl.DataFrame({"v": ["", "  ", "7"]})
        >>> df.select(is_blank(pl.col("v"), pl.String)).to_series().to_list()
        [True, True, False]
    """
    if source != pl.String:
        return pl.lit(False)
    return expr.str.strip_chars() == ""
