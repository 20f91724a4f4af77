"""What the commands do with `--artifacts`: a directory is used in place, as always; a URL
(`s3://bucket/prefix`, `file:///path`) is mirrored into a local cache directory first (the
current version downloaded and verified), and commands then read that copy."""

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from recsys.core.errors import ArtifactError, RecsysError
from recsys.core.object_store import is_remote
from recsys.core.remote import RemoteVersions, mirror_current
from recsys.core.versions import VersionStore

log = logging.getLogger(__name__)


def default_cache_dir(url: str) -> Path:
    """One local copy per URL: $XDG_CACHE_HOME/recsys/remote/<hash of the URL>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "recsys" / "remote" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def cache_dir_for(artifacts: str, cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir(artifacts)).resolve()


def readable_root(
    artifacts: str,
    cache_dir: Path | None = None,
    versions: list[str] | None = None,
    say: Callable[[str], None] = log.info,
) -> Path:
    """A local artifacts root holding the current version (and `versions`, if named)."""
    if not is_remote(artifacts):
        return Path(artifacts)
    remote = RemoteVersions(artifacts)
    root = cache_dir_for(artifacts, cache_dir)
    mirror_current(remote, root, say)
    visible = None
    for name in versions or []:
        if not (VersionStore(root).versions / name).is_dir():
            visible = visible if visible is not None else remote.visible()
            if name not in visible:
                raise ArtifactError(
                    f"{artifacts}: no version {name!r}; have {', '.join(visible) or 'none'}"
                )
            remote.download(name, VersionStore(root).versions, say)
    return root


def rollback_target(served: list[str], current: str | None, to: str | None) -> str:
    """The version a rollback moves `current` to: `to`, else the newest version that
    served before the current one."""
    if to is not None:
        if to not in served:
            raise RecsysError(f"version {to!r} never served (rejected or unknown); not rolled back")
        return to
    older = [name for name in served if current is None or name < current]
    if not older:
        raise RecsysError(f"no version served before {current}; nothing to roll back to")
    return older[-1]


def rollback(artifacts: str, to: str | None) -> tuple[str | None, str]:
    """Move `current` back; returns (from, to). Every serving host follows on its poll."""
    if is_remote(artifacts):
        remote = RemoteVersions(artifacts)
        pointer = remote.pointer()
        target = rollback_target(remote.served(), pointer.version, to)
        remote.promote(target, pointer)
        return pointer.version, target
    store = VersionStore(Path(artifacts))
    current = store.current_name()
    target = rollback_target(store.served(), current, to)
    store.promote(target)
    return current, target
