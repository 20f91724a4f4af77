"""Per-file validation: schema errors stop the run with file and column named; row errors
(null IDs, unparsable timestamps, invalid weights) send the row to the rejects table with a
reason, so nothing is dropped silently."""

from dataclasses import dataclass

import polars as pl

from features.remote_logs import LogFile
from recsys.core import schema as s
from recsys.core.errors import DataValidationError
from recsys.core.ids import MAX_WEIGHT

# Text timestamps in any of these layouts are accepted (plus integer or float seconds).
TIMESTAMP_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)
ORDER = "_order"  # global input order: file index in the high bits, row in the low bits
_ROW = "_row"
_REASON = "_reason"
_ROW_BITS = 40


@dataclass(frozen=True)
class ValidatedLog:
    """One input file split lazily into canonical kept rows and rejected rows."""

    path: LogFile
    kept: pl.LazyFrame  # user_id, item_id, timestamp, weight, event, _order
    rejects: pl.LazyFrame  # recsys.core.schema.REJECT_SCHEMA
    read: pl.LazyFrame  # one row, one column: rows read from the file
    id_dtypes: dict[str, pl.DataType]
    has_timestamp: bool


def _id_expr(path: LogFile, name: str, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_integer():
        return pl.col(name).cast(pl.Int64)
    if dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum):
        return pl.col(name).cast(pl.String).str.strip_chars()
    raise DataValidationError(path, name, f"expected integer or string IDs, found {dtype}")


def _names(names: list[str], limit: int = 20, width: int = 40) -> str:
    """Column names for a message: at most `limit`, each cut to `width` characters and
    printable (a binary file's "header" is bytes), so one bad file is one readable line."""
    shown = [repr(n[:width])[1:-1] for n in names[:limit]]
    more = f", ... ({len(names) - limit:,} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def _timestamp_expr(path: LogFile, dtype: pl.DataType) -> pl.Expr:
    """Canonical timestamp: Int64 seconds since the epoch, null where it cannot be parsed."""
    col = pl.col(s.TIMESTAMP)
    if dtype.is_integer():  # a UInt64 beyond Int64 (1e19) is one bad row, not a bad file
        return col.cast(pl.Int64, strict=False)
    if dtype.is_float():
        return pl.when(col.is_finite()).then(col.floor()).cast(pl.Int64, strict=False)
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("s")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.epoch("s")
    if dtype == pl.String:
        text = col.str.strip_chars()
        seconds = text.cast(pl.Float64, strict=False)
        parsed = [
            text.str.to_datetime(fmt, strict=False, time_zone="UTC").dt.epoch("s")
            for fmt in TIMESTAMP_FORMATS
        ]
        from_number = (
            pl.when(seconds.is_finite()).then(seconds.floor()).cast(pl.Int64, strict=False)
        )
        return pl.coalesce(text.str.to_integer(strict=False), from_number, *parsed)
    raise DataValidationError(
        path, s.TIMESTAMP, f"expected integer seconds, datetime or date text, found {dtype}"
    )


def _weight_expr(path: LogFile, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(s.WEIGHT)
    if dtype.is_numeric():
        return col.cast(pl.Float64)
    if dtype == pl.String:
        return col.str.strip_chars().cast(pl.Float64, strict=False)
    raise DataValidationError(path, s.WEIGHT, f"expected numbers, found {dtype}")


def validate_log(path: LogFile, frame: pl.LazyFrame, file_index: int) -> ValidatedLog:
    """Check one file's schema now; describe its row checks lazily."""
    schema = frame.collect_schema()
    missing = [c for c in s.REQUIRED_COLUMNS if c not in schema]
    if missing:
        raise DataValidationError(
            path, missing[0], f"required column is missing (found: {_names(schema.names())})"
        )
    id_dtypes = {c: schema[c] for c in s.REQUIRED_COLUMNS}
    canonical = {c: _id_expr(path, c, schema[c]) for c in s.REQUIRED_COLUMNS}
    has_timestamp = s.TIMESTAMP in schema
    canonical[s.TIMESTAMP] = (
        _timestamp_expr(path, schema[s.TIMESTAMP]) if has_timestamp else pl.lit(None, pl.Int64)
    )
    canonical[s.WEIGHT] = (
        _weight_expr(path, schema[s.WEIGHT]) if s.WEIGHT in schema else pl.lit(1.0, pl.Float64)
    )
    canonical[s.EVENT] = (
        pl.col(s.EVENT).cast(pl.String) if s.EVENT in schema else pl.lit(None, pl.String)
    )

    raw = frame.with_row_index(_ROW).with_columns(
        **{f"_c_{name}": expr for name, expr in canonical.items()}
    )
    checks = [
        (pl.col(s.USER_ID).is_null(), "null user_id"),
        (pl.col(s.ITEM_ID).is_null(), "null item_id"),
        *[(pl.col(f"_c_{c}").cast(pl.String) == "", f"empty {c}") for c in s.REQUIRED_COLUMNS],
    ]
    if has_timestamp:
        checks += [
            (pl.col(s.TIMESTAMP).is_null(), "null timestamp"),
            (pl.col(f"_c_{s.TIMESTAMP}").is_null(), "unparsable timestamp"),
        ]
    weight = pl.col(f"_c_{s.WEIGHT}")
    checks += [
        (
            weight.is_null() | ~weight.is_finite() | (weight < 0),
            "invalid weight (null, not a number, infinite or negative)",
        ),
        # Larger weights overflow the Float32 the trainer reads (1e308 became inf, then NaN).
        (weight > MAX_WEIGHT, f"weight above {MAX_WEIGHT:g}"),
    ]
    reason: pl.Expr = pl.lit(None, pl.String)
    for failed, why in reversed(checks):  # the first failed check names the reason
        reason = pl.when(failed).then(pl.lit(why)).otherwise(reason)
    raw = raw.with_columns(reason.alias(_REASON))

    def as_text(name: str) -> pl.Expr:
        return pl.col(name).cast(pl.String) if name in schema else pl.lit(None, pl.String)

    rejects = raw.filter(pl.col(_REASON).is_not_null()).select(
        pl.lit(str(path)).alias("file"),
        pl.col(_ROW).cast(pl.UInt64).alias("row"),
        pl.col(_REASON).alias("reason"),
        *[as_text(c).alias(c) for c in (s.USER_ID, s.ITEM_ID, s.TIMESTAMP, s.WEIGHT)],
    )
    kept = raw.filter(pl.col(_REASON).is_null()).select(
        *[pl.col(f"_c_{name}").alias(name) for name in canonical],
        (pl.lit(file_index << _ROW_BITS, pl.UInt64) + pl.col(_ROW).cast(pl.UInt64)).alias(ORDER),
    )
    kept = kept.with_columns(pl.col(s.WEIGHT).cast(pl.Float32))
    read = frame.select(pl.len().alias("read"))
    return ValidatedLog(path, kept, rejects, read, id_dtypes, has_timestamp)
