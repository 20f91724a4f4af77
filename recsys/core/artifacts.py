"""Self-describing artifact directories: atomic writes, a manifest with checksums, and
verification on load, so a reader never sees a half-written or tampered file."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from recsys.core.errors import ArtifactError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(frame: pl.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp)


def write_json(payload: dict[str, Any], target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def confined(root: Path, relative: str) -> Path:
    """Resolve `relative` under `root`, refusing anything that escapes it."""
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ArtifactError(f"{root}: manifest path '{relative}' points outside the directory")
    return resolved


def _artifact_files(root: Path) -> list[Path]:
    """Every file but the manifest being written (nested manifests, such as the ingest
    output's inside a version, are covered like any other file)."""
    own = root / MANIFEST
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p != own and not p.name.startswith(".")
    )


def write_manifest(root: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` last, with a SHA-256 of every other file in `root`."""
    checksums = {p.relative_to(root).as_posix(): sha256_file(p) for p in _artifact_files(root)}
    manifest = {**payload, "checksums": checksums}
    write_json(manifest, root / MANIFEST)
    return manifest


def read_manifest(root: Path, verify: bool = True) -> dict[str, Any]:
    """Read a manifest and, by default, check every listed file against its checksum."""
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{root}: no {MANIFEST}; the directory is incomplete or not an artifact"
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if verify:
        checksums = manifest.get("checksums")
        if not isinstance(checksums, dict) or not checksums:
            raise ArtifactError(f"{path}: no checksums to verify; the manifest was altered")
        for relative, expected in checksums.items():
            file = confined(root, relative)
            if not file.is_file():
                raise ArtifactError(f"{root}: file '{relative}' listed in the manifest is missing")
            if sha256_file(file) != expected:
                raise ArtifactError(f"{root}: checksum mismatch for '{relative}'")
    return manifest
