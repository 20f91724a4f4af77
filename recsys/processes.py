"""Run `recsys serve` as a child process and wait until it answers: shared by the demo, the
end-to-end tests and the benchmarks, which all talk to the service over real HTTP."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str, timeout: float = 180, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers 200; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused, reset, timed out, or an HTTP error status
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready within {timeout:.0f}s")


def wait_listening(port: int, sockets: int, timeout: float = 180) -> None:
    """Poll until `sockets` sockets listen on `port`: each worker of `recsys serve` has its
    own and listens once its model is loaded, so one answer does not mean all are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = [
            c
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        ]
        if len(listening) >= sockets:
            return
        time.sleep(0.2)
    raise RuntimeError(f"fewer than {sockets} workers listen on port {port} after {timeout:.0f}s")


@contextmanager
def served(
    artifacts: Path | str,
    env: dict[str, str] | None = None,
    workers: int = 1,
    port: int | None = None,
    quiet: bool = True,
    log: Path | None = None,
    cache_dir: Path | None = None,
) -> Iterator[str]:
    """`recsys serve` on a free loopback port; yields its base URL once every worker
    listens, stops it on exit. `log`: a file that gets its output; `cache_dir`: the
    host's copy of artifacts on object storage."""
    port = port or free_port()
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(artifacts)]
    command += ["--port", str(port), "--workers", str(workers)]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    log_file = log.open("wb") if log is not None else None
    output = log_file or (subprocess.DEVNULL if quiet else None)
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=output, stderr=output
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", process=process)
        wait_listening(port, workers)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30 + float((env or {}).get("RECSYS_DRAIN_SECONDS", 0)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_file is not None:
            log_file.close()
