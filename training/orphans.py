"""No training process outlives the command that started it. torchrun starts each rank in
a session of its own, so a node whose `recsys build` is killed (a machine lost, a job
cancelled) would otherwise leave its ranks running: they keep answering the other nodes'
collectives, and the build there trains on instead of failing."""

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

import psutil

_PR_SET_PDEATHSIG = 1  # prctl(2)
POLL_SECONDS = 0.5
LAUNCHER_VARIABLE = "RECSYS_LAUNCHER_PID"  # the `recsys build` whose ranks these are


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when the process that started it dies
    (Linux; elsewhere a no-op). torchrun's launcher stops its ranks on SIGTERM."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_when_orphaned(what: str) -> None:
    """Exit this process as soon as its parent (torchrun's launcher) or the command named
    by LAUNCHER_VARIABLE is gone: a daemon thread watches both, since torchrun starts
    the ranks itself and no `preexec_fn` of ours reaches them. The command is watched by
    its process ID too because a launcher killed before this rank started its watch
    would leave it a parent that is already the one it was handed to."""
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_VARIABLE) or 0)

    def watch() -> None:
        while os.getppid() == parent and (not launcher or _running(launcher)):
            time.sleep(POLL_SECONDS)
        with contextlib.suppress(OSError, ValueError):  # the pipe went with the launcher
            print(f"{what}: its launcher exited, stopping", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
