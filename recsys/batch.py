"""What a batch job asks for, read the same way by every engine (`recsys recommend` in one
process or on Ray): the users, and the items hidden since the version was built."""

from enum import StrEnum
from pathlib import Path

import polars as pl

from recsys.core import schema as s
from recsys.core.errors import RecsysError


class BatchEngine(StrEnum):
    local = "local"  # this process
    ray = "ray"  # Ray Data actors (recsys.ray_batch)


def requested_users(users: str, every_user: pl.Series) -> pl.Series:
    """`users` is 'all' (every user of the version, `every_user`) or a Parquet/CSV file
    with a user_id column: its distinct IDs, in file order (CSV IDs read as text)."""
    if users == "all":
        return every_user
    from features.sources import CSV_SUFFIXES, scan_table

    path = Path(users)
    if not path.is_file():
        raise RecsysError(f"{path}: no such file")
    frame = scan_table(
        path, string_columns=(s.USER_ID,) if path.suffix.lower() in CSV_SUFFIXES else ()
    )
    if s.USER_ID not in frame.collect_schema().names():
        raise RecsysError(f"{path}: column 'user_id' is missing")
    return frame.select(s.USER_ID).collect()[s.USER_ID].unique(maintain_order=True).drop_nulls()


def hidden_items(root: Path) -> list[str]:
    """Raw IDs (as text) of the items hidden through `PUT /admin/items`, on this host's
    files or the hosts' shared log: batch answers leave them out as the service does."""
    from features.catalogue_log import changes_path, latest_changes
    from recsys.pipeline import shared_changes

    changes = latest_changes(changes_path(root), shared_changes())
    return [key for key, change in changes.items() if not change.available]
