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
