"""Catalogue changes made between builds (`PUT /admin/items/{id}`): items hidden or made
available again, and new items with their features. One append-only JSON-lines file,
`ARTIFACTS/catalogue/changes.jsonl`, written under an exclusive lock and fsync'd before
the service answers, so every worker, every restart and every later version applies the
same changes in the same order (the last change of an item wins). Readers take whole
lines only, from a remembered offset, as with the event segments."""

import fcntl
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features.side_tables import read_side_table
from recsys.core import schema as s
from recsys.core.ids import MAX_ID_CHARS, canonical_integer, checked_text

log = logging.getLogger(__name__)

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


def encode_change(change: ItemChange) -> bytes:
    """One change as a JSON line; ValueError if a reader could not read it back."""
    checked_change(asdict(change))
    return (json.dumps(asdict(change), separators=(",", ":")) + "\n").encode()


def append_change(path: Path, change: ItemChange) -> None:
    """Append one change durably; concurrent writers (workers) take turns on a lock. A
    change that a reader could not read back is refused (ValueError) before a byte is
    written; the whole line is written or the file is cut back to where it was."""
    line = encode_change(change)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError("the disk took no bytes")
                view = view[written:]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, before)
            raise
    finally:
        os.close(fd)  # releases the lock
    if created:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


MAX_VALUES = 100  # values of one feature column of one item


def checked_change(record: Any) -> ItemChange:
    """A stored (or about to be stored) change, if every field keeps the rules that every
    reader relies on; ValueError saying why not."""
    if not isinstance(record, dict) or set(record) - {"item_id", "available", "features", "at"}:
        raise ValueError("not a change record")
    item = record.get("item_id")
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise ValueError("item_id must be an integer or text")
    if isinstance(item, str):
        checked_text(item, "item_id", MAX_ID_CHARS)
    elif canonical_integer(item) is None:
        raise ValueError("item_id is beyond 64 bits")
    if not isinstance(record.get("available"), bool):
        raise ValueError("available must be true or false")
    at = record.get("at", 0.0)
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError("at must be a finite number")
    features = record.get("features")
    if features is not None:
        if not isinstance(features, dict) or not features:
            raise ValueError("features must be a non-empty object")
        for column, values in features.items():
            checked_text(column, "feature column")
            if not isinstance(values, list) or len(values) > MAX_VALUES:
                raise ValueError(f"feature {column}: a list of at most {MAX_VALUES} values")
            for value in values:
                checked_text(value, f"feature {column}")
    return ItemChange(item, record["available"], features, float(at))


def parse_changes(data: bytes, source: str, start: int = 0) -> list[ItemChange]:
    """The changes of whole JSON lines. A line no reader could use (not JSON, a lone
    surrogate, a field of the wrong type) is quarantined: skipped and logged with its byte
    offset, never a failed restart or build."""
    changes = []
    offset = start
    for line in data.split(b"\n")[:-1]:
        at, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            changes.append(checked_change(json.loads(line)))
        except (ValueError, TypeError) as exc:
            log.warning("%s, byte %d: change quarantined (%s)", source, at, str(exc)[:80])
    return changes


def read_changes(path: Path, start: int = 0) -> tuple[list[ItemChange], int]:
    """Changes after byte `start` (whole lines only) and the offset to continue from."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            chunk = handle.read()
    except FileNotFoundError:
        return [], start
    end = chunk.rfind(b"\n") + 1
    return parse_changes(chunk[:end], str(path), start), start + end


def merged_features(before: Features | None, after: Features | None) -> Features | None:
    """An item's features after a change: the columns it gives replace theirs, the others
    stay. Why: `PUT` with `{"genres": [...]}` changes the genres, not the year."""
    if after is None or before is None:
        return before if after is None else after
    return {**before, **after}


def latest_changes(path: Path, shared: list[ItemChange] | None = None) -> dict[str, ItemChange]:
    """Each item's state after every change of the file, then of the shared log (item ID
    as text -> its last availability, with every column given to it, the latest value of
    each)."""
    state: dict[str, ItemChange] = {}
    for change in read_changes(path)[0] + (shared or []):
        key = str(change.item_id)
        before = state.get(key)
        features = merged_features(before.features if before else None, change.features)
        state[key] = ItemChange(change.item_id, change.available, features, change.at)
    return state


_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _inner(dtype: pl.DataType) -> pl.DataType:
    inner = dtype.inner if isinstance(dtype, pl.List) else dtype
    return inner() if isinstance(inner, type) else inner


def _refused(column: str, value: Any, dtype: pl.DataType) -> ValueError:
    shown = ascii(value)[:60]
    return ValueError(f"feature {column}: {shown} is no {dtype} value (the item table's type)")


def _as_integer(value: Any) -> int | None:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return canonical_integer(value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def typed_value(column: str, value: Any, dtype: pl.DataType) -> Any:
    """One value (a JSON value, or the text stored for it) as the item table holds it in
    `column` of `dtype` (a list column: its element type); ValueError naming the column,
    the type and the value where the type cannot hold it exactly. Why: the build casts
    the table's cells to its types, so a value it cannot hold ("abc", 1995.5, true or
    2**66 for an Int32 year) would become null there while the service filed it as a
    category; the service and every build read each value through here."""
    inner = _inner(dtype)
    if inner == pl.String or isinstance(inner, pl.Categorical | pl.Enum):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            value = str(value)
        if isinstance(value, str):
            return value
        raise _refused(column, value, inner)
    if inner == pl.Boolean:
        if isinstance(value, bool) or value in ("true", "false"):
            return value in (True, "true")
        raise _refused(column, value, inner)
    number: int | float | None
    if inner.is_integer():
        number = _as_integer(value)
    elif inner.is_float() or isinstance(inner, pl.Decimal):
        number = _as_float(value)
    else:
        number = None
    if number is None:
        raise _refused(column, value, inner)
    try:
        held = pl.Series([number]).cast(inner, strict=True).to_list()[0]
    except (pl.exceptions.PolarsError, OverflowError, TypeError, ValueError):
        held = None
    if held is None or (inner.is_float() and not math.isfinite(held)):
        raise _refused(column, value, inner)  # beyond the type's range
    return held


def value_text(value: Any) -> str:
    """How a typed value is stored in a change (`ItemChange.features` holds text): read
    back by `typed_value` as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def cell(column: str, values: list[str], dtype: pl.DataType, separator: str) -> Any:
    """An item's values (as stored) as one cell of the item table's `column` of `dtype`,
    the rule every reader shares: a list column holds each value as one element, as the
    build reads a list column (a `|` inside a value is no separator there); a text column
    joins several values with the separator (which the build splits again); any other
    column holds one value. ValueError, naming the column, for a value it cannot hold."""
    if isinstance(dtype, pl.List):
        return [typed_value(column, v, dtype) for v in values]
    if dtype == pl.String:
        return separator.join(values) if values else None
    if len(values) > 1:
        raise ValueError(f"feature {column}: one value, not {len(values)} (a {dtype} column)")
    return typed_value(column, values[0], dtype) if values else None


def item_cells(
    features: Features, schema: dict[str, pl.DataType], separator: str, item: object = ""
) -> dict[str, Any]:
    """An item's cells for the columns given (those of `schema`). A value stored before
    the service checked types, that the column's type cannot hold, is quarantined: its
    column is left as it was, and logged, never a failed build or restart."""
    cells: dict[str, Any] = {}
    for column, values in features.items():
        if column not in schema:
            continue
        try:
            cells[column] = cell(column, values, schema[column], separator)
        except ValueError as exc:
            log.warning("item %s: value quarantined (%s)", item, str(exc)[:120])
    return cells


def merged_item_table(
    changes: Path,
    table: Path | None,
    out: Path,
    columns: dict[str, str] | None = None,
    separator: str = "|",
    shared: list[ItemChange] | None = None,
) -> Path | None:
    """The item table with the features given through the service (`PUT /admin/items`),
    written to `out` (None: no item was given features): a known item's given columns
    replace its cells, new items are added as rows. The key keeps the table's own name
    (`columns` maps ours -> theirs)."""
    given = {k: c for k, c in latest_changes(changes, shared).items() if c.features is not None}
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
    cells = [item_cells(c.features or {}, schema, separator, c.item_id) for c in given.values()]
    rows = pl.DataFrame(
        {
            s.ITEM_ID: pl.Series([str(c.item_id) for c in given.values()]).cast(
                key_dtype, strict=False
            ),
            **{
                name: pl.Series(name, [one.get(name) for one in cells], dtype=schema[name])
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
