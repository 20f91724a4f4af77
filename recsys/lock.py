"""One build at a time per artifacts directory.

The lock is an advisory `flock` on `<root>/.build.lock`: the kernel releases it when the
holder dies, however it dies (SIGKILL included), so a stale lock can never block the next
build. The file also records who holds it (pid, host, start time), which names the running
build in the error a second build gets, and tells the next holder that the previous one
died without finishing (its pid is still written there) so it can clean up after it.
"""

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys.errors import RecsysError

log = logging.getLogger(__name__)

LOCK_FILE = ".build.lock"


class BuildLockedError(RecsysError):
    """Another build holds the lock of this artifacts directory."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except (OSError, ValueError):
        return {}


@contextmanager
def build_lock(root: Path) -> Iterator[dict[str, Any]]:
    """Hold the build lock of `root`; yields what the previous holder left behind
    (empty when it finished cleanly, its pid/host/start when it died mid-build)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise BuildLockedError(
                f"{root}: another build is running (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('started', '?')})"
            ) from None
        stale = _holder(path)
        if stale:
            log.warning(
                "%s: the previous build (pid %s, started %s) died without releasing its lock; "
                "taking over",
                root,
                stale.get("pid"),
                stale.get("started"),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves an empty file: nothing stale
    finally:
        os.close(fd)  # releases the flock
