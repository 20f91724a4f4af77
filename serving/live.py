"""The version a service worker answers with, swapped atomically when `current` moves.

Each worker watches the `current` pointer (and `POST /admin/reload` asks it directly),
loads a newly promoted version in a background thread while the old one keeps answering,
then replaces one reference. A request reads that reference once and uses the version it
got to the end, so no request mixes two versions; the old version's index and arrays are
released when the last request holding it finishes. Cache keys carry the version, so
results cached for the old version are never served for the new one. A version that fails
to load (corrupt, incomplete) is logged and skipped; the worker keeps the one it has.
"""

import asyncio
import contextlib
import gc
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter

from features.event_stream import SharedLog
from recsys.core.errors import RecsysError
from recsys.core.versions import VersionStore
from serving.fresh import DEFAULT_PER_USER
from serving.metrics import MODEL_VERSION
from serving.state import VersionState

log = logging.getLogger(__name__)

RELOADS = Counter("recsys_model_reloads_total", "Version switches by outcome", ["outcome"])


def settle_heap() -> None:
    """Put everything alive now (the loaded version, the model, the libraries) out of the
    cyclic garbage collector's reach. Otherwise each full collection walks all of it: ~190
    ms on a 1M-item version, during which the worker answers nothing. Frozen objects are
    still freed by reference counting; the previous freeze is undone first, so a replaced
    version's cycles are collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# The loading thread runs at a mild niceness under SCHED_BATCH: it never preempts the
# threads answering when it wakes, and each nice-0 thread it competes with gets about 3x
# its CPU share. Nice 19 (a 1/68 share) starved it on a busy host: a version's load of 30
# ms of CPU took 8-9 s beside four busy processes, and with the service's own load on top
# a promoted version went unserved for more than a minute.
LOADER_NICENESS = 5


def _background_loader() -> None:
    """Lower this thread's priority (Linux schedules threads alone): the load of a large
    version is seconds of CPU that would otherwise compete as an equal with the event
    loop's requests; but only mildly, so that a busy host still switches in bounded time."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread


class LiveVersion:
    def __init__(
        self,
        store: VersionStore,
        fresh_per_user: int = DEFAULT_PER_USER,
        shared: SharedLog | None = None,
    ) -> None:
        self.store = store
        self.fresh_per_user = fresh_per_user
        self.shared = shared  # the hosts' shared log of events and catalogue changes
        self.state: VersionState | None = None
        self.failed: str | None = None  # last version that could not be loaded
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(1, "version-loader", initializer=_background_loader)

    def load_now(self) -> VersionState:
        """The first load, at start-up: without a version there is nothing to serve."""
        self.state = VersionState.load(self.store.current(), self.fresh_per_user, self.shared)
        settle_heap()
        MODEL_VERSION.labels(self.state.version).set(1)
        return self.state

    async def refresh(self, force: bool = False) -> bool:
        """Switch to the version `current` points at if it is new; True if switched.
        With `force`, a version that failed before is tried again and failures raise."""
        async with self._lock:
            name = self.store.current_name()
            if name is None or (self.state is not None and name == self.state.version):
                return False
            if name == self.failed and not force:
                return False
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(
                    self._loader,
                    VersionState.load,
                    self.store.versions / name,
                    self.fresh_per_user,
                    self.shared,
                )
            except Exception as exc:  # any failure keeps the old version; retried on change
                RELOADS.labels("failed").inc()
                self.failed = name
                problem = (
                    str(exc) if isinstance(exc, RecsysError) else f"{type(exc).__name__}: {exc}"
                )
                log.error("keeping version %s: cannot load %s (%s)", self.version, name, problem)
                if force:
                    raise RecsysError(f"cannot load {name} ({problem})") from exc
                return False
            previous, self.state, self.failed = self.version, loaded, None
            del loaded
            # GET routes run on this loop without awaiting, so none holds the old version
            # now; a thread-pool request that still does keeps it alive until the next swap.
            settle_heap()
            if previous is not None:
                MODEL_VERSION.labels(previous).set(0)
            MODEL_VERSION.labels(name).set(1)
            RELOADS.labels("switched").inc()
            log.info("switched from version %s to %s", previous, name)
            return True

    @property
    def version(self) -> str | None:
        return None if self.state is None else self.state.version

    async def follow_events(self, interval: float) -> None:
        """Read what the event segments and the catalogue changes gained every `interval`
        seconds until cancelled (other workers' writes; this worker reads its own as it
        writes them)."""
        while True:
            await asyncio.sleep(interval)
            state = self.state
            if state is None:
                continue
            try:
                state.fresh.poll()
                state.catalogue.poll()
            except Exception:  # never let the follower die; the next poll tries again
                log.exception("event follower")

    async def watch(self, interval: float) -> None:
        """Poll the pointer every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # never let the watcher die; the next poll tries again
                log.exception("version watcher")
