"""Stopping behind a load balancer without losing a request.

On the first SIGTERM (or SIGINT) a worker turns /readyz to 503 at once and goes on
answering for the drain period, so that a balancer checking /readyz takes the host out of
rotation first; then uvicorn's own graceful shutdown finishes the requests in flight. A
second SIGINT stops at once; a repeated SIGTERM changes nothing (systemd signals the whole
process group, and the parent of several workers passes the signal on).
"""

import logging
import signal
import threading
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

DRAINING = threading.Event()  # set for the rest of this process's life once it drains


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_seconds <= 0 or (DRAINING.is_set() and sig == signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        if DRAINING.is_set():
            return
        DRAINING.set()
        log.warning("draining: /readyz answers 503; stopping in %.1f s", self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, None))
        timer.daemon = True
        timer.start()
