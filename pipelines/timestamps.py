"""Event-time parsing, per batch: any common timestamp form to ``timestamp[us, UTC]``.

Accepted: Arrow/Polars datetimes (naive ones are taken as UTC), dates (midnight UTC),
epoch numbers (``unit``; ``auto`` reads magnitudes as s, ms, us or ns) and strings holding
either ISO 8601 (``2018-04-01T00:00:31Z``, ``...+02:00``, ``2018-04-01 00:00:31``, a date)
or an epoch number. Anything else becomes null, which validation reports as
``bad_timestamp``.

Range. Event times are ``timestamp[us]`` but pass through nanosecond arithmetic downstream
(Polars, pandas), so only :data:`MIN_TIME` .. :data:`MAX_TIME` (1677-09-21 .. 2262-04-11,
what int64 nanoseconds hold) can be represented. A finite epoch beyond that range parses to
one microsecond past the nearest bound rather than to null, so that validation reports it
as out of range (:func:`outside_representable_range`), not as unreadable.

Durations in configs (``20m``, ``1d12h``) are read by :func:`parse_duration`.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

TimeUnit = Literal["auto", "s", "ms", "us", "ns"]

_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
)
_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
# int64 nanoseconds span 1677-09-21 .. 2262-04-11: the range in whole microseconds.
_MAX_US = (2**63 - 1) // 1_000
_MIN_US = -_MAX_US
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The earliest and latest event times that can be represented (see the module docstring).
MIN_TIME = _EPOCH + dt.timedelta(microseconds=_MIN_US)
MAX_TIME = _EPOCH + dt.timedelta(microseconds=_MAX_US)


def epoch_micros(moment: dt.datetime) -> int:
    """Microseconds since the epoch (a naive time is taken as UTC, as Polars takes it).

    Example:
        >>> epoch_micros(dt.datetime(1970, 1, 1, 0, 0, 1)), epoch_micros(MAX_TIME) == _MAX_US
        (1000000, True)
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


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
    # Saturate just past the range (not null): too far off is not the same as unreadable.
    # Both bounds are even, so exact as floats; one clip, where a when/then chain named
    # ``micros`` (and so planned it) five times.
    return pl.when(micros.is_finite()).then(
        micros.clip(float(_MIN_US - 1), float(_MAX_US + 1)).cast(pl.Int64))


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


def outside_representable_range(timestamp: pl.Expr) -> pl.Expr:
    """Whether a parsed ``Datetime('us', 'UTC')`` lies outside :data:`MIN_TIME`..:data:`MAX_TIME`.

    Example:
        >>> df = pl.DataFrame({"t": ["9999-01-01", "2024-01-01", "1e300"]})
        >>> df.select(outside_representable_range(parse_timestamp(pl.col("t"), pl.String))
        ...           ).to_series().to_list()
        [True, False, True]
    """
    return (timestamp < pl.lit(MIN_TIME)) | (timestamp > pl.lit(MAX_TIME))


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0, "w": 604_800.0}
_MAX_DURATION_S = 1_000 * 365.25 * 86_400
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")


def parse_duration(value: str | float | dt.timedelta, field: str = "duration") -> dt.timedelta:
    """A non-negative duration from config: ``500ms``, ``20m``, ``1h``, ``7d``, ``1d12h``, or
    a plain number of seconds (``90``, ``"1.5"``); ``timedelta`` values pass through.

    Units: ``ms``, ``s``, ``m`` (minutes), ``h``, ``d``, ``w``; parts add up, largest first
    or not. ``field`` names the setting in the error.

    Raises:
        ValueError: naming ``field``, for anything else (negative, empty, unknown unit).

    Example:
        >>> parse_duration("1d12h"), parse_duration("500ms"), parse_duration(90)
        (datetime.timedelta(days=1, seconds=43200), datetime.timedelta(microseconds=500000), \
datetime.timedelta(seconds=90))
    """
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(text := value.strip().lower()):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    elif isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d+)?", value.strip()):
        seconds = float(value)
    else:
        raise ValueError(f"{field}: {value!r} is not a duration "
                         "(examples: 500ms, 20m, 1h, 7d, 1d12h, or a number of seconds)")
    if not math.isfinite(seconds) or not 0 <= seconds < _MAX_DURATION_S:
        raise ValueError(f"{field}: {value!r} is not a non-negative duration under 1000 years")
    return dt.timedelta(seconds=seconds)


def _duration(value: Any, info: ValidationInfo) -> dt.timedelta:
    return parse_duration(value, info.field_name or "duration")


#: A duration setting in a config: ``500ms``, ``20m``, ``1h``, ``7d``, ``1d12h`` or seconds
#: (see :func:`parse_duration`); dumped as seconds, which it reads back.
Duration = Annotated[
    dt.timedelta,
    BeforeValidator(_duration),
    PlainSerializer(lambda value: value.total_seconds(), return_type=float, when_used="json"),
]
