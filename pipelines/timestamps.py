"""Event-time parsing, per batch: any common timestamp form to ``timestamp[us, UTC]``.

Accepted: Arrow/Polars datetimes (naive ones are taken as UTC), dates (midnight UTC),
epoch numbers (``unit``; ``auto`` reads magnitudes as s, ms, us or ns) and strings holding
either ISO 8601 (``2018-04-01T00:00:31Z``, ``...+02:00``, ``2018-04-01 00:00:31``, a date)
or an epoch number. Anything else becomes null, which validation reports as
``bad_timestamp``.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

TimeUnit = Literal["auto", "s", "ms", "us", "ns"]

_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
)
_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
# Years 1677..2262 fit in int64 nanoseconds; bound epochs so nothing overflows.
_MAX_EPOCH_US = 9_000_000_000_000_000


def _epoch_to_us(number: pl.Expr, unit: TimeUnit) -> pl.Expr:
    if unit == "auto":
        size = number.abs()
        scale = (
            pl.when(size < 1e11).then(1_000_000.0)
            .when(size < 1e14).then(1_000.0)
            .when(size < 1e17).then(1.0)
            .otherwise(0.001)
        )
    else:
        scale = pl.lit(float(_US_PER[unit]))
    micros = (number.cast(pl.Float64) * scale).round(0)
    return pl.when(micros.abs() < _MAX_EPOCH_US).then(micros.cast(pl.Int64)).otherwise(None)


def _from_micros(micros: pl.Expr) -> pl.Expr:
    return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def parse_timestamp(expr: pl.Expr, dtype: pl.DataType, unit: TimeUnit = "auto") -> pl.Expr:
    """An expression turning ``expr`` (of ``dtype``) into ``Datetime('us', 'UTC')``.

    Example:
        >>> df = pl.DataFrame({"t": ["2018-04-01T00:00:31Z", "1522540831", "nope"]})
        >>> df.select(parse_timestamp(pl.col("t"), pl.String)).to_series().dt.second().to_list()
        [31, 31, None]
    """
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return expr.dt.cast_time_unit("us").dt.replace_time_zone("UTC")
        return expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(dtype, pl.Date):
        return expr.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        return _from_micros(_epoch_to_us(expr, unit))
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        text = expr.cast(pl.String).str.strip_chars()
        parsed = [
            text.str.to_datetime(fmt, strict=False, time_zone="UTC", time_unit="us")
            for fmt in _ISO_FORMATS
        ]
        date_only = text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))
        number = text.cast(pl.Float64, strict=False)
        return pl.coalesce(
            *parsed,
            date_only.dt.replace_time_zone("UTC"),
            _from_micros(_epoch_to_us(number, unit)),
        )
    return pl.lit(None, dtype=pl.Datetime("us", "UTC"))
