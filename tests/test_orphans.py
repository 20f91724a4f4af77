"""A training rank stops as soon as its launcher is gone, even where its output went to
the launcher: torchrun starts ranks in sessions of their own, so a node killed as a
process group left a rank training with the other nodes, and the watch that was to stop
it died on the write to the dead launcher's pipe (BrokenPipeError) before exiting."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

RANK = (  # argv[1] "late": the watch starts only once the launcher is gone
    "import os, sys, time\n"
    "from training.orphans import stop_when_orphaned\n"
    "parent = int(os.environ['RECSYS_LAUNCHER_PID'])\n"
    "while sys.argv[1] == 'late' and os.getppid() == parent:\n"
    "    time.sleep(0.05)\n"
    "stop_when_orphaned('rank 1')\n"
    "if sys.argv[1] == 'early':\n"
    "    print('watching', flush=True)\n"
    "while True:\n"
    "    time.sleep(0.05)\n"
)
# As `recsys build` starts torchrun, whose ranks get the same environment; argv[1] says
# when the rank starts its watch: "early" (before the launcher is killed) or "late".
LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "env = {**os.environ, 'RECSYS_LAUNCHER_PID': str(os.getpid())}\n"
    f"rank = subprocess.Popen([sys.executable, '-c', {RANK!r}, sys.argv[1]], env=env,"
    " stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)\n"
    "if sys.argv[1] == 'early':\n"
    "    rank.stdout.readline()\n"
    "print(rank.pid, flush=True)\n"
    "while True:\n"
    "    time.sleep(0.05)\n"
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("started", [True, False], ids=["watching", "before-its-watch"])
def test_a_rank_whose_launcher_is_killed_stops_though_its_output_pipe_is_gone(started: bool):
    """Killed while the rank watches, or before the rank has even started its watch (a
    rank's imports take seconds, and a launcher may die in them)."""
    how = "early" if started else "late"
    command = [sys.executable, "-c", LAUNCHER, how]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    rank = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 120  # generous: a busy machine, not a timing claim
    while not _gone(rank):
        assert time.monotonic() < deadline, "the orphaned rank kept running"
        time.sleep(0.1)
