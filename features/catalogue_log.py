"""Catalogue changes made between builds (`PUT /admin/items/{id}`): items hidden or made
available again, and new items with their features. One append-only JSON-lines file,
`ARTIFACTS/catalogue/changes.jsonl`, written under an exclusive lock and fsync'd before
the service answers, so every worker, every restart and every later version applies the
same changes in the same order (the last change of an item wins). Readers take whole
lines only, from a remembered offset, as with the event segments."""

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features.side_tables import read_side_table
from recsys.core import schema as s

CATALOGUE_DIR = "catalogue"
CHANGES_FILE = "changes.jsonl"

Features = dict[str, list[str]]  # column -> values, as text


@dataclass(frozen=True)
class ItemChange:
    item_id: int | str
    available: bool
    features: Features | None = None  # None: unchanged
    at: float = 0.0  # seconds since the epoch, when the service took it


def changes_path(artifacts: Path) -> Path:
    return artifacts / CATALOGUE_DIR / CHANGES_FILE


def append_change(path: Path, change: ItemChange) -> None:
    """Append one change durably; concurrent writers (workers) take turns on a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(change), separators=(",", ":")) + "\n").encode()
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if created:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_changes(path: Path, start: int = 0) -> tuple[list[ItemChange], int]:
    """Changes after byte `start` (whole lines only) and the offset to continue from."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            chunk = handle.read()
    except FileNotFoundError:
        return [], start
    end = chunk.rfind(b"\n") + 1
    changes = []
    for line in chunk[:end].splitlines():
        try:
            changes.append(ItemChange(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # not written by append_change
    return changes, start + end


def latest_changes(path: Path) -> dict[str, ItemChange]:
    """Each item's state after every change (item ID as text -> its last change, with the
    last features given to it)."""
    state: dict[str, ItemChange] = {}
    for change in read_changes(path)[0]:
        key = str(change.item_id)
        before = state.get(key)
        features = change.features
        if features is None and before is not None:
            features = before.features
        state[key] = ItemChange(change.item_id, change.available, features, change.at)
    return state


def _cell(values: list[str], dtype: pl.DataType, separator: str) -> Any:
    """A new item's values as one cell of a column of `dtype`."""
    if isinstance(dtype, pl.List):
        return pl.Series(values).cast(dtype.inner, strict=False).to_list()
    if dtype == pl.String:
        return separator.join(values) if values else None
    return pl.Series(values[:1]).cast(dtype, strict=False).to_list()[0] if values else None


def merged_item_table(
    changes: Path,
    table: Path | None,
    out: Path,
    columns: dict[str, str] | None = None,
    separator: str = "|",
) -> Path | None:
    """The item table with the features given through the service (`PUT /admin/items`),
    written to `out` (None: no item was given features): a known item's given columns
    replace its cells, new items are added as rows. The key keeps the table's own name
    (`columns` maps ours -> theirs)."""
    given = {k: c for k, c in latest_changes(changes).items() if c.features is not None}
    if not given:
        return None
    key = (columns or {}).get(s.ITEM_ID, s.ITEM_ID)
    base = read_side_table(table, s.ITEM_ID, columns)[0] if table is not None else None
    schema = dict(base.schema) if base is not None else {}
    key_dtype = schema.get(
        s.ITEM_ID,
        pl.Int64 if all(isinstance(c.item_id, int) for c in given.values()) else pl.String,
    )
    names = sorted({c for change in given.values() for c in change.features or {}})
    for name in names:  # a column the table lacks: text, or lists of text for several values
        several = any(len((c.features or {}).get(name, [])) > 1 for c in given.values())
        schema.setdefault(name, pl.List(pl.String()) if several else pl.String())
    rows = pl.DataFrame(
        {
            s.ITEM_ID: pl.Series([str(c.item_id) for c in given.values()]).cast(
                key_dtype, strict=False
            ),
            **{
                name: pl.Series(
                    name,
                    [
                        _cell((c.features or {}).get(name, []), schema[name], separator)
                        for c in given.values()
                    ],
                    dtype=schema.get(name),
                    strict=False,
                )
                for name in names
            },
        }
    ).filter(pl.col(s.ITEM_ID).is_not_null())
    merged = rows
    if base is not None:  # known items: the columns given replace theirs; new ones are added
        known = pl.col(s.ITEM_ID).is_in(base[s.ITEM_ID].implode())
        updated = base.update(rows.filter(known), on=s.ITEM_ID, how="left", include_nulls=False)
        merged = pl.concat([updated, rows.filter(~known)], how="diagonal_relaxed")
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.rename({s.ITEM_ID: key}).write_parquet(out)
    return out
