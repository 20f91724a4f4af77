"""No training process outlives the command that started it. torchrun starts each rank in
a session of its own, so a node whose `recsys build` is killed (a machine lost, a job
cancelled) would otherwise leave its ranks running: they keep answering the other nodes'
collectives, and the build there trains on instead of failing."""

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # prctl(2)
POLL_SECONDS = 0.5


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when the process that started it dies
    (Linux; elsewhere a no-op). torchrun's launcher stops its ranks on SIGTERM."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_when_orphaned(what: str) -> None:
    """Exit this process as soon as its parent is gone (it is handed to another, such as
    init): a daemon thread watches the parent id, since torchrun's launcher starts the
    ranks itself and no `preexec_fn` of ours reaches them."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        print(f"{what}: its launcher exited, stopping", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
