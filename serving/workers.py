"""Run an ASGI app in N uvicorn worker processes that each listen on their own socket bound
to the same port (SO_REUSEPORT), so that the kernel spreads connections over the workers.

uvicorn's own `--workers` shares one listening socket: every worker wakes for a new
connection and the first to run accepts everything queued, so a burst of keep-alive
connections (a load balancer's pool, a load generator's 16) lands on one worker while the
others idle. Measured here with `wrk -c16`: 16 of 16 connections on one worker, and half
the throughput of two. With a socket each, connections are spread by the kernel's hash of
their addresses. The parent process holds the port (bound, never listening, so it gets no
connections), restarts a worker that dies, and stops them all on SIGTERM or SIGINT.
"""

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from serving.drain import DrainingServer
from serving.multiprocess_dir import fresh_metrics_dir

log = logging.getLogger(__name__)

HTTP_PROTOCOL = "serving.protocol:NoDelayH11Protocol"
RESTART_CHECK_SECONDS = 0.5
STARTUP_FAILURE = 3  # uvicorn's exit status when the app cannot start: not worth retrying


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _plain_socket(host: str, port: int) -> socket.socket:
    """A socket bound to the port alone, as uvicorn binds one (SO_REUSEADDR only)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _claim_port(host: str, port: int) -> socket.socket:
    """The parent's hold on the port. A plain bind first: SO_REUSEPORT sockets of the same
    user may share a port, so without this check a second `recsys serve` started on a busy
    port by mistake would silently take half of the first one's connections."""
    with _plain_socket(host, port) as probe:
        port = probe.getsockname()[1]  # the port chosen when 0 was asked for
    return _port_socket(host, port)


def _bound(claim: Callable[[str, int], socket.socket], host: str, port: int) -> socket.socket:
    """The port, bound before anything says it is listening; a busy port stops the
    service in one line (exit status 1), whatever the number of workers."""
    try:
        return claim(host, port)
    except OSError as exc:
        raise SystemExit(f"cannot bind {host}:{port}: {exc.strerror}") from exc


def _config(app: str, factory: bool, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, factory=factory, http=HTTP_PROTOCOL, host=host, port=port, log_level=log_level
    )


def _worker(
    app: str, factory: bool, host: str, port: int, log_level: str, drain_seconds: float
) -> None:
    config = _config(app, factory, host, port, log_level)
    # uvicorn loads the app (and the model) before it listens on the socket, so the kernel
    # sends this worker nothing until it can answer.
    DrainingServer(config, drain_seconds).run(sockets=[_port_socket(host, port)])


def _serve_alone(
    app: str,
    factory: bool,
    host: str,
    port: int,
    log_level: str,
    announce: Callable[[str, int], None] | None,
    drain_seconds: float,
) -> None:
    """One worker in this process, on a socket bound before the port is announced:
    uvicorn binds only once the app has loaded, after the announcement."""
    with _bound(_plain_socket, host, port) as sock:
        port = sock.getsockname()[1]
        if announce is not None:
            announce(host, port)
        config = _config(app, factory, host, port, log_level)
        DrainingServer(config, drain_seconds).run(sockets=[sock])


def serve(
    app: str,
    *,
    factory: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "warning",
    announce: Callable[[str, int], None] | None = None,
    drain_seconds: float = 0.0,
    metrics_dir: str | None = None,
) -> None:
    """Serve `app` ("module:attribute") until SIGTERM or SIGINT, each worker draining for
    `drain_seconds` first (serving.drain); `announce(host, port)` is called once the port
    is known (uvicorn's own start-up lines are left out: one line). `metrics_dir`: the
    workers' Prometheus directory, when the caller made it (see serving.multiprocess_dir)."""
    if workers == 1:
        _serve_alone(app, factory, host, port, log_level, announce, drain_seconds)
        return
    holder = _bound(_claim_port, host, port)
    port = holder.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    stopping = False
    # Workers count into files of one fresh directory, and /metrics sums them (the
    # environment is read when a worker first imports prometheus-client).
    metrics_dir = metrics_dir or fresh_metrics_dir()
    # Each worker's Polars pool gets its share of the cores (read when a worker imports
    # Polars), not all of them: loading a version runs Polars beside the answering threads.
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("POLARS_MAX_THREADS", str(max(1, cores // workers)))

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def start() -> BaseProcess:
        process = spawn.Process(
            target=_worker, args=(app, factory, host, port, log_level, drain_seconds)
        )
        process.start()
        return process

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = [start() for _ in range(workers)]
    if announce is not None:
        announce(host, port)
    try:
        while not stopping:
            time.sleep(RESTART_CHECK_SECONDS)
            for n, process in enumerate(processes):
                if process.is_alive() or stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    raise SystemExit(f"worker {process.pid} could not start the app; stopping")
                log.error("worker %d exited (%s); starting another", process.pid, process.exitcode)
                if process.pid is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(process.pid, metrics_dir)
                processes[n] = start()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=drain_seconds + 30)
            if process.is_alive():
                process.kill()
                process.join()
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
