"""What an ingest can take from the previous one: a nightly rebuild over a log that grows
by new partitions reads only the new files, and the rows it read last time come from the
previous version's cleaned table (already validated, deduplicated and indexed).

That is correct only where it changes nothing: every file the previous ingest read is
still listed with the same size and ETag (a local file: size and modification time), the
column mapping and feature settings are the same, and the files keep their ID type. Any
other case reads every file again and says why. Inputs that are re-read whole each time
(the posted-events snapshot) are `volatile`: the previous rows they gave reappear in the
new snapshot and collapse with them as duplicates, so the caller vouches that none of them
was pruned in between (`allowed`).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.remote_logs import LogFile, RemoteFile
from recsys.core.artifacts import MANIFEST, read_manifest
from recsys.core.errors import ArtifactError

log = logging.getLogger(__name__)


def input_identity(path: LogFile, volatile: bool = False) -> dict[str, Any]:
    """What identifies one input file's content when it was read."""
    if isinstance(path, RemoteFile):
        identity = path.described()
    else:
        stat = path.stat()
        identity = {"url": str(path.resolve()), "size": stat.st_size, "etag": str(stat.st_mtime_ns)}
    return identity | ({"volatile": True} if volatile else {})


def read_every_file(reason: str) -> None:
    log.info("ingest: reading every file: %s", reason)


def announce(plan: "Reuse", reading: int) -> None:
    log.info(
        "ingest: %d file(s) unchanged since the previous ingest, taken from its cleaned "
        "table; reading %d",
        plan.reused_files,
        reading,
    )


def _key(identity: dict[str, Any]) -> tuple[str, int, str]:
    return str(identity["url"]), int(identity["size"]), str(identity["etag"])


@dataclass(frozen=True)
class Reuse:
    """The previous ingest whose cleaned rows stand in for the files it read, and the
    positions (in the source's order) of the files still to read."""

    directory: Path
    manifest: dict[str, Any]
    unread: tuple[int, ...]
    reused_files: int


def plan_reuse(
    inputs: list[dict[str, Any]],
    previous: Path | None,
    columns: dict[str, str],
    feature_config: dict[str, Any],
) -> Reuse | None:
    """The previous ingest to build on, or None (logged) where every file must be read."""
    if previous is None or not (previous / MANIFEST).is_file():
        return None  # no earlier ingest there
    try:
        manifest = read_manifest(previous, verify=True)
    except ArtifactError as exc:
        read_every_file(f"the previous ingest is unusable ({exc})")
        return None
    sources = manifest.get("sources", {})
    earlier = sources.get("input_files")
    reason = None
    if manifest.get("kind") != "ingest" or not isinstance(earlier, list) or not earlier:
        reason = "the previous ingest did not record its files"
    elif sources.get("columns") != dict(columns):
        reason = "the column mapping changed"
    elif manifest.get("feature_config") != feature_config:
        reason = "the feature settings changed"
    if reason is not None:
        read_every_file(reason)
        return None
    if any(i.get("volatile") and not {"read", "valid"} <= i.keys() for i in earlier):
        read_every_file("the previous ingest did not count its posted events")
        return None
    now = [_key(i) for i in inputs]
    kept = {_key(i) for i in earlier if not i.get("volatile")}
    missing = kept - set(now)
    if missing:
        url = sorted(missing)[0][0]
        read_every_file(f"{len(missing)} file(s) read last time changed or are gone ({url})")
        return None
    unread = tuple(n for n, key in enumerate(now) if key not in kept or inputs[n].get("volatile"))
    return Reuse(previous, manifest, unread, len(kept))
