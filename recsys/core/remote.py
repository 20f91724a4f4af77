"""Versions on object storage, shared by the hosts that build and serve them:

    <url>/versions/<v>/...      immutable; manifest.json (checksums of the rest) uploaded last,
                                so a version without a manifest is invisible
    <url>/current               {"version": ...}: replaced only by a conditional write
    <url>/locks/build           the cross-host build lock, a lease its holder renews
    <url>/hosts/<host>.json     the versions a serving host holds, and when it last said so

Nothing here is ever read in place: a version is downloaded into a local directory under a
temporary name, every checksum is verified, and only then is it renamed into place, so a
mapped index file is never a partial download and never overwritten.
"""

import builtins
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.core.artifacts import MANIFEST, read_manifest
from recsys.core.errors import ArtifactError, RecsysError
from recsys.core.lock import BuildLockedError
from recsys.core.object_store import CREATE, ObjectStore, PreconditionFailed
from recsys.core.versions import VERSIONS, VersionStore

log = logging.getLogger(__name__)

POINTER = "current"
LOCK = "locks/build"
HOSTS = "hosts"
DOWNLOAD_PREFIX = ".download-"
LOCK_LEASE_SECONDS = 300.0  # a build that dies frees the lock after this long
# A host's report protects its versions from pruning for this many of its poll intervals
# (plus a margin for clocks that disagree a little).
REPORT_INTERVALS = 2
REPORT_MARGIN_SECONDS = 30.0


class PromotionLost(RecsysError):
    """Another build (or a rollback) moved `current` after this build read it."""


@dataclass(frozen=True)
class Pointer:
    """What `current` named when read, and the ETag a conditional write must match."""

    version: str | None
    etag: str  # CREATE when there was no pointer


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RemoteVersions:
    def __init__(self, url: str) -> None:
        self.objects = ObjectStore(url)
        self.url = self.objects.url

    # -- the pointer -------------------------------------------------------------------

    def pointer(self) -> Pointer:
        stored = self.objects.get(POINTER)
        if stored is None:
            return Pointer(None, CREATE)
        try:
            name = json.loads(stored.data)["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{self.url}/{POINTER}: not a version pointer ({exc})") from exc
        return Pointer(str(name), stored.etag)

    def promote(self, name: str, read: Pointer) -> None:
        """Point `current` at `name` if it still holds what `read` saw."""
        if not self.objects.exists(f"{VERSIONS}/{name}/{MANIFEST}"):
            raise ArtifactError(f"{self.url}: version {name} has no manifest; not promoted")
        body = json.dumps({"version": name, "promoted_at": _now(), "by": socket.gethostname()})
        try:
            self.objects.put(POINTER, body.encode(), expected=read.etag)
        except PreconditionFailed:
            now = self.pointer().version
            raise PromotionLost(
                f"{self.url}: current moved from {read.version or 'nothing'} to {now} while "
                f"this build ran; version {name} is stored but not current"
            ) from None
        log.info("%s: current -> %s", self.url, name)

    # -- versions ----------------------------------------------------------------------

    def visible(self) -> builtins.list[str]:
        """Versions whose manifest is stored (uploads in progress or abandoned are not)."""
        return [
            name
            for name in self.objects.children(VERSIONS)
            if not name.startswith(".") and self.objects.exists(f"{VERSIONS}/{name}/{MANIFEST}")
        ]

    def manifest(self, name: str) -> dict[str, Any]:
        stored = self.objects.get(f"{VERSIONS}/{name}/{MANIFEST}")
        if stored is None:
            raise ArtifactError(f"{self.url}: version {name} is not stored (no manifest)")
        try:
            return dict(json.loads(stored.data))
        except ValueError as exc:
            raise ArtifactError(f"{self.url}: manifest of {name} is not JSON ({exc})") from exc

    def upload(self, local: Path) -> None:
        """Upload a committed local version: every file its manifest lists, then the
        manifest, which makes it visible."""
        manifest = read_manifest(local, verify=False)
        name = local.name
        started = time.perf_counter()
        for relative in manifest["checksums"]:
            self.objects.upload(local / relative, f"{VERSIONS}/{name}/{relative}")
        self.objects.upload(local / MANIFEST, f"{VERSIONS}/{name}/{MANIFEST}")
        log.info(
            "uploaded version %s to %s (%d files) in %.1f s",
            name,
            self.url,
            len(manifest["checksums"]) + 1,
            time.perf_counter() - started,
        )

    def download(self, name: str, versions: Path, say: Callable[[str], None] = log.info) -> Path:
        """Download version `name` into `versions/<name>`: into a temporary directory
        first, every checksum verified, then one rename. Returns the final directory."""
        final = versions / name
        if final.is_dir():
            return final
        manifest = self.manifest(name)
        checksums = manifest.get("checksums")
        if not isinstance(checksums, dict) or not checksums or manifest.get("version") != name:
            raise ArtifactError(f"{self.url}: manifest of {name} is not a version's manifest")
        staging = versions / f"{DOWNLOAD_PREFIX}{name}-{secrets.token_hex(3)}"
        staging.mkdir(parents=True)
        try:
            started = time.perf_counter()
            say(f"downloading version {name} from {self.url}: {len(checksums)} files")
            for relative in checksums:
                target = staging / relative
                if not target.resolve().is_relative_to(staging.resolve()):
                    raise ArtifactError(f"{self.url}: manifest of {name} names '{relative}'")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.objects.download(f"{VERSIONS}/{name}/{relative}", target)
                except FileNotFoundError:
                    raise ArtifactError(
                        f"{self.url}: version {name} lost '{relative}' during the download "
                        "(deleted from storage?)"
                    ) from None
            (staging / MANIFEST).write_text(json.dumps(manifest))
            fetched = time.perf_counter()
            read_manifest(staging, verify=True)
            size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
            os.replace(staging, final)
            say(
                f"version {name}: {size / 1e6:.1f} MB downloaded in {fetched - started:.1f} s, "
                f"verified in {time.perf_counter() - fetched:.1f} s"
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def delete(self, name: str) -> None:
        """Delete a version, its manifest first (it is invisible from the first call)."""
        base = f"{VERSIONS}/{name}"
        self.objects.delete(f"{base}/{MANIFEST}")
        for relative in self.objects.files(base):
            self.objects.delete(f"{base}/{relative}")

    # -- hosts and pruning -------------------------------------------------------------

    def report_host(self, host: str, versions: builtins.list[str], poll_seconds: float) -> None:
        """Say which versions `host` holds now (its pruning protection)."""
        body = {"host": host, "versions": versions, "at": time.time(), "poll_seconds": poll_seconds}
        self.objects.put(f"{HOSTS}/{host}.json", json.dumps(body).encode())

    def held_by_hosts(self) -> set[str]:
        """Versions a host reported holding within its last poll intervals."""
        held: set[str] = set()
        for entry in self.objects.children(HOSTS):
            stored = self.objects.get(f"{HOSTS}/{entry}")
            if stored is None:
                continue
            try:
                report = json.loads(stored.data)
                fresh_for = REPORT_INTERVALS * float(report["poll_seconds"]) + REPORT_MARGIN_SECONDS
                if time.time() - float(report["at"]) <= fresh_for:
                    held.update(str(v) for v in report["versions"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s/%s/%s: not a host report; ignored", self.url, HOSTS, entry)
        return held

    def prune(self, keep: int) -> builtins.list[str]:
        """Delete the oldest versions beyond the newest `keep`; never the current one nor
        one a serving host reported holding lately."""
        current = self.pointer().version
        protected = self.held_by_hosts() | {current}
        removable = [name for name in self.visible() if name not in protected]
        excess = len(removable) - (keep - (1 if current else 0))
        doomed = removable[: max(0, excess)]
        for name in doomed:
            self.delete(name)
        return doomed

    def served(self) -> builtins.list[str]:
        """Versions that served (promoted, or a first build), oldest first."""
        found = []
        for name in self.visible():
            gate = self.manifest(name).get("gate")
            if gate is None or gate.get("promoted"):
                found.append(name)
        return found

    # -- the build lock ----------------------------------------------------------------

    @contextlib.contextmanager
    def build_lock(self, lease_seconds: float = LOCK_LEASE_SECONDS) -> Iterator[None]:
        """Hold the cross-host build lock: a lease object taken with a conditional write
        and renewed every third of the lease; a holder that dies frees it when the lease
        runs out."""
        held = self.objects.get(LOCK)
        expected = CREATE
        if held is not None:
            holder = _json(held.data)
            if not holder.get("released") and float(holder.get("expires", 0)) > time.time():
                raise BuildLockedError(
                    f"{self.url}: another build is running (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} since {holder.get('started', '?')})"
                )
            if not holder.get("released"):
                log.warning(
                    "%s: the build lock of %s (pid %s) ran out; taking over",
                    self.url,
                    holder.get("host"),
                    holder.get("pid"),
                )
            expected = held.etag
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}

        def lease() -> bytes:
            return json.dumps({**me, "expires": time.time() + lease_seconds}).encode()

        try:
            etag = self.objects.put(LOCK, lease(), expected=expected)
        except PreconditionFailed:
            raise BuildLockedError(f"{self.url}: another build took the lock just now") from None
        stop = threading.Event()

        def renew() -> None:
            nonlocal etag
            while not stop.wait(lease_seconds / 3):
                try:
                    etag = self.objects.put(LOCK, lease(), expected=etag)
                except PreconditionFailed:
                    log.error("%s: the build lock was taken over; promotion will refuse", self.url)
                    return
                except RecsysError as exc:  # storage unreachable for a while: try again
                    log.warning("%s: cannot renew the build lock (%s)", self.url, exc)

        renewer = threading.Thread(target=renew, name="build-lock", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(RecsysError):
                self.objects.put(LOCK, json.dumps({**me, "released": True}).encode(), etag)


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def clear_downloads(versions: Path) -> builtins.list[str]:
    """Remove what downloads that died left behind."""
    if not versions.is_dir():
        return []
    left = [p for p in versions.iterdir() if p.name.startswith(DOWNLOAD_PREFIX)]
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in left]


def mirror_current(
    remote: RemoteVersions,
    local: Path,
    say: Callable[[str], None] = log.info,
    forget_missing: bool = True,
) -> Pointer:
    """Make `local` an artifacts root whose `current` is the remote one (downloaded and
    verified if new); returns the pointer as read, for a later conditional promotion.
    When the store names no current version, `local` forgets its own (a build must not
    start from a stale copy) unless `forget_missing` is off (a serving host keeps
    answering with what it has)."""
    pointer = remote.pointer()
    store = VersionStore(local)
    clear_downloads(store.versions)
    if pointer.version is None:
        if forget_missing:
            (local / "current").unlink(missing_ok=True)
        elif store.current_name() is not None:
            log.warning("%s names no current version; keeping %s", remote.url, store.current_name())
        return pointer
    remote.download(pointer.version, store.versions, say)
    if store.current_name() != pointer.version:
        store.promote(pointer.version)
    return pointer


class MirroredStore(VersionStore):
    """A build's local working copy of remote artifacts: each committed version is
    uploaded, and promotion moves the remote pointer only if it still names what the
    build read at its start (then the local one)."""

    def __init__(self, root: Path, remote: RemoteVersions, read: Pointer) -> None:
        super().__init__(root)
        self.remote = remote
        self.read = read

    def commit(self, name: str, staging: Path, manifest: dict[str, Any]) -> Path:
        final = super().commit(name, staging, manifest)
        self.remote.upload(final)
        return final

    def promote(self, name: str) -> None:
        self.remote.promote(name, self.read)
        super().promote(name)

    def prune(self, keep: int) -> builtins.list[str]:
        super().prune(keep)
        return self.remote.prune(keep)
