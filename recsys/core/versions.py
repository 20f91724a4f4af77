"""Immutable version directories under an artifacts root, and an atomically switched
`current` pointer:

    <root>/versions/<version>/...   one complete, checksummed build each
    <root>/current -> versions/<version>

A build writes into a hidden staging directory, writes the manifest last, renames the
directory into place, verifies it, and only then swaps the `current` symlink with an
atomic rename. A crash at any point leaves `current` on a complete version.
"""

import builtins
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from recsys.core.artifacts import MANIFEST, read_manifest, write_manifest
from recsys.core.errors import ArtifactError

VERSIONS = "versions"
CURRENT = "current"
_STAGING_PREFIX = ".staging-"


def verify_version(path: Path) -> dict[str, Any]:
    """The manifest of a committed version, after checking every file against it and that
    it names its own directory (a copied or renamed version would otherwise look new on
    every poll of the pointer, and be reloaded forever)."""
    manifest = read_manifest(path, verify=True)
    if manifest.get("version") != path.name:
        raise ArtifactError(
            f"{path / MANIFEST}: names version {manifest.get('version')!r} but lives in "
            f"'{path.name}'; a version directory must keep the name its build gave it"
        )
    return manifest


class VersionStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = root / VERSIONS

    @staticmethod
    def new_version_name() -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)

    def stage(self) -> tuple[str, Path]:
        """A fresh staging directory for a version that is not yet visible."""
        name = self.new_version_name()
        staging = self.versions / f"{_STAGING_PREFIX}{name}"
        staging.mkdir(parents=True)
        return name, staging

    def commit(self, name: str, staging: Path, manifest: dict[str, Any]) -> Path:
        """Seal a staged version: manifest with checksums, rename into place, verify."""
        write_manifest(staging, {**manifest, "version": name})
        final = self.versions / name
        os.replace(staging, final)
        read_manifest(final, verify=True)
        return final

    def promote(self, name: str) -> None:
        """Point `current` at a committed version with one atomic rename."""
        target = self.versions / name
        read_manifest(target, verify=True)
        link = self.root / CURRENT
        tmp = self.root / f".{CURRENT}-{secrets.token_hex(4)}"
        tmp.symlink_to(Path(VERSIONS) / name)
        os.replace(tmp, link)

    def current_name(self) -> str | None:
        link = self.root / CURRENT
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    def current(self) -> Path:
        """The directory of the current version; a clear error if there is none."""
        name = self.current_name()
        if name is None or not (self.versions / name).is_dir():
            raise ArtifactError(f"{self.root}: no current version; run `recsys build` first")
        return self.versions / name

    def list(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted(
            p.name for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def served(self) -> builtins.list[str]:
        """Versions that served (promoted, or a first build: no gate), oldest first."""
        found = []
        for name in self.list():
            try:
                gate = read_manifest(self.versions / name, verify=False).get("gate")
            except ArtifactError:
                continue
            if gate is None or gate.get("promoted"):
                found.append(name)
        return found

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def discard_abandoned_staging(self) -> builtins.list[str]:
        """Remove staging directories left by builds that died (call with the build lock)."""
        if not self.versions.is_dir():
            return []
        abandoned = [p for p in self.versions.iterdir() if p.name.startswith(_STAGING_PREFIX)]
        for path in abandoned:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in abandoned]

    def prune(self, keep: int) -> builtins.list[str]:
        """Delete the oldest versions beyond the newest `keep`; never the current one."""
        if keep < 1:
            raise ValueError("keep at least one version")
        current = self.current_name()
        removable = [name for name in self.list() if name != current]
        excess = len(removable) - (keep - (1 if current else 0))
        doomed = removable[: max(0, excess)]
        for name in doomed:
            shutil.rmtree(self.versions / name)
        return doomed
