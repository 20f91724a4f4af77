"""Daily log files, the shape nightly rebuilds read: one Parquet file per UTC day under
`<dataset>/interactions/`, next to the item and user tables. Used to stage a log that
grows day by day in the nightly tests and benchmark."""

import shutil
from pathlib import Path

import polars as pl

from recsys.core import schema as s


def write_days(source: Path, out: Path, first_days: int | None = None) -> list[str]:
    """Copy the data set at `source` to `out` with its log cut into one file per day,
    keeping only the first `first_days` days (all when None). Rerun with a larger
    `first_days` to grow the log; existing day files are left as they are."""
    log = pl.read_parquet(source / "interactions")
    day = (pl.col(s.TIMESTAMP) // 86_400).alias("day")
    days = log.select(day.unique().sort())["day"].to_list()
    keep = days if first_days is None else days[:first_days]
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    for table in ("items.parquet", "users.parquet"):
        if (source / table).is_file() and not (out / table).is_file():
            shutil.copy(source / table, out / table)
    written = []
    for number in keep:
        path = out / "interactions" / f"day-{number}.parquet"
        if not path.is_file():
            log.filter(day == number).write_parquet(path)
            written.append(path.name)
    return written
