"""A serving host's copy of versions on object storage.

`recsys serve --artifacts s3://... --cache-dir DIR` runs one `HostSync` in its parent
process: it polls the remote `current` pointer, downloads a new version into DIR under a
temporary name, verifies every checksum, renames it into place and only then moves DIR's
own `current` symlink, which the workers follow as they follow any local pointer. The
version before it stays in DIR (a rollback is one symlink away); older ones are deleted,
which never disturbs a worker that still maps one (Linux keeps an unlinked file's pages).
A failed poll or download keeps the host on its version, is logged in one line, counted
in /metrics, and retried after a back-off that doubles up to a minute: no reload loop.
"""

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from recsys.core.errors import ArtifactError, RecsysError
from recsys.core.object_store import StorageError
from recsys.core.remote import RemoteVersions, mirror_current
from recsys.core.versions import VersionStore

log = logging.getLogger(__name__)

SYNC_FAILURES = Counter(
    "recsys_sync_failures_total",
    "Failed syncs with object storage (storage: unreachable or refused; verify: a version "
    "failed its checksums or is incomplete)",
    ["reason"],
)
SYNCED = Counter("recsys_sync_versions_total", "Versions downloaded and verified")
SYNC_BACKOFF = Gauge(
    "recsys_sync_backoff_seconds", "Wait before the next sync (0: healthy)", multiprocess_mode="max"
)
MAX_BACKOFF_SECONDS = 60.0
REPORT_SECONDS = 60.0


def _reason(exc: Exception) -> str:
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, ArtifactError):
        return "verify"
    return "other"


class HostSync:
    def __init__(
        self,
        remote: RemoteVersions,
        root: Path,
        poll_seconds: float,
        host_id: str,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.remote = remote
        self.store = VersionStore(root)
        self.poll_seconds = poll_seconds
        self.host_id = host_id
        self.say = say
        self.failures = 0
        # The version before the current one, kept for a rollback (after a restart: the
        # newest other version in the cache directory).
        held = self.store.current_name()
        others = [name for name in self.store.list() if name != held]
        self.previous: str | None = others[-1] if others else None
        self._reported: tuple[list[str], float] = ([], float("-inf"))  # held, when

    def once(self) -> None:
        """Follow the remote pointer once; raises what went wrong."""
        before = self.store.current_name()
        pointer = mirror_current(self.remote, self.store.root, self.say, forget_missing=False)
        now = pointer.version
        if now is not None and now != before:
            SYNCED.inc()
            self.previous = before
            self.say(f"current is now version {now} (was {before or 'nothing'})")
        self._drop_old()
        self._report([v for v in (self.store.current_name(), self.previous) if v])

    def _report(self, held: list[str]) -> None:
        """Tell the store what this host holds: when it changes, and at least every
        REPORT_SECONDS (a write per poll would be tens of thousands of PUTs a day)."""
        now = time.monotonic()
        if held == self._reported[0] and now - self._reported[1] < REPORT_SECONDS:
            return
        interval = max(self.poll_seconds, REPORT_SECONDS)  # pruning trusts it this long
        with contextlib.suppress(RecsysError):  # a report is advice; the next one says it again
            self.remote.report_host(self.host_id, held, interval)
            self._reported = (held, now)

    def _drop_old(self) -> None:
        keep = {self.store.current_name(), self.previous}
        for name in self.store.list():
            if name not in keep:
                shutil.rmtree(self.store.versions / name, ignore_errors=True)

    def attempt(self) -> float:
        """One sync, failures logged and counted; returns the wait before the next."""
        try:
            self.once()
        except Exception as exc:  # every failure keeps the version held; retried later
            self.failures += 1
            SYNC_FAILURES.labels(_reason(exc)).inc()
            wait = min(MAX_BACKOFF_SECONDS, max(self.poll_seconds, 1.0) * 2 ** (self.failures - 1))
            SYNC_BACKOFF.set(wait)
            problem = str(exc) if isinstance(exc, RecsysError) else f"{type(exc).__name__}: {exc}"
            log.error(
                "sync with %s failed (%s); keeping version %s, next try in %.0f s",
                self.remote.url,
                problem,
                self.store.current_name() or "none",
                wait,
            )
            return wait
        self.failures = 0
        SYNC_BACKOFF.set(0)
        return self.poll_seconds

    def until_a_version(self, stop: threading.Event) -> bool:
        """At start-up: sync until a version is on local disk (a restarted host serves its
        copy at once); False if `stop` was set first."""
        while not stop.is_set():
            wait = self.attempt()
            if self.store.current_name() is not None:
                return True
            if not self.failures:
                log.error("%s holds no current version yet; waiting for a build", self.remote.url)
            stop.wait(wait)
        return False

    def follow(self, stop: threading.Event) -> None:
        """Poll until `stop` is set (the serving host's background thread)."""
        wait = self.poll_seconds
        while not stop.wait(wait):
            wait = self.attempt()

    def start(self) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.follow, args=(stop,), name="sync", daemon=True)
        thread.start()
        return thread, stop
