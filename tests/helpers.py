"""Helpers shared by test modules (pytest puts this directory on sys.path)."""

import subprocess
import sys


def recsys(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The `recsys` command as a user runs it: a subprocess, its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "recsys", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
