"""One build at a time per artifacts directory.

The lock is an advisory `flock` on the artifacts directory itself: the kernel releases it
when the holder dies, however it dies (SIGKILL included), so a stale lock can never block
the next build, and no file can be deleted from under it (a lock on `.build.lock` was lost
when someone removed the file, and a second build then deleted the first one's staging
directory). `<root>/.build.lock` records who holds it (pid, host, start time), which names
the running build in the error a second build gets, and tells the next holder that the
previous one died without finishing (its pid is still written there) so it can clean up.
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

from recsys.core.errors import RecsysError

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
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        path.write_text(json.dumps(me))
        try:
            yield stale
        finally:
            path.write_text("")  # a clean exit leaves an empty file: nothing stale
    finally:
        os.close(directory)  # releases the flock
