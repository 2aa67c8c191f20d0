"""Typing payload fields per batch: source values (any dtype, or JSON text) to Arrow types.

A cast that fails leaves null where the input was not: that is how validation finds a bad
field without looking at rows one by one.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipelines.errors import SchemaError
from pipelines.timestamps import parse_timestamp

_TRUTH = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def polars_dtype(arrow: pa.DataType) -> pl.DataType:
    """The Polars dtype of an Arrow type (through an empty array: one source of truth)."""
    return pl.from_arrow(pa.array([], arrow)).dtype


def cast_field(expr: pl.Expr, source: pl.DataType, target: pa.DataType) -> pl.Expr:
    """An expression casting ``expr`` of dtype ``source`` to the Arrow type ``target``.

    Values that cannot be read become null (strings from CSV and JSON are parsed; floats
    with a fractional part do not become ints).

    Example:
        >>> df = pl.DataFrame({"v": ["1", "x", None]})
        >>> df.select(cast_field(pl.col("v"), pl.String, pa.int64())).to_series().to_list()
        [1, None, None]
    """
    text = source == pl.String
    if pa.types.is_integer(target):
        dtype = polars_dtype(target)
        value = expr.str.strip_chars() if text else expr
        as_float = value.cast(pl.Float64, strict=False)
        whole = as_float.is_finite() & (as_float == as_float.floor())
        return pl.when(whole).then(as_float.cast(dtype, strict=False)).otherwise(None)
    if pa.types.is_floating(target):
        value = expr.str.strip_chars() if text else expr
        return value.cast(polars_dtype(target), strict=False)
    if pa.types.is_boolean(target):
        if text:
            return expr.str.strip_chars().str.to_lowercase().replace_strict(
                _TRUTH, default=None, return_dtype=pl.Boolean
            )
        return expr.cast(pl.Boolean, strict=False)
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return expr.cast(pl.String, strict=False)
    if pa.types.is_timestamp(target):
        return parse_timestamp(expr, source)
    if pa.types.is_date32(target):
        if text:
            return expr.str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
        return parse_timestamp(expr, source).dt.date()
    if pa.types.is_list(target) or pa.types.is_struct(target):
        if text:
            return expr.str.json_decode(polars_dtype(target))
        return expr.cast(polars_dtype(target), strict=False)
    raise SchemaError(f"payload fields of type {target} are not supported")
