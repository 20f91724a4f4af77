"""What the service reports to Prometheus, and the middleware that counts requests.

Label values are bounded: routes are the app's route templates (or "unmatched"), methods
the standard HTTP verbs (anything else is "other"), statuses the three-digit codes, so no
client can grow `/metrics` by sending odd requests."""

import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("recsys_http_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram(
    "recsys_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INDEX_SECONDS = Histogram(
    "recsys_index_query_seconds",
    "Index query time",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
)
EVENTS = Counter("recsys_events_total", "Posted events by outcome", ["outcome"])
# 1 for the version this host answers with: `count by (version) (recsys_model_version_info
# == 1)` over every host shows version skew in one query.
MODEL_VERSION = Gauge(
    "recsys_model_version_info",
    "The loaded version (1) and versions loaded before (0)",
    ["version"],
    multiprocess_mode="livemax",
)
CATALOGUE_CHANGES = Counter("recsys_catalogue_changes_total", "Item changes", ["change"])
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class Measure:
    """Request counts and latency by route and status, and the `X-Model-Version` header
    (`version(scope)`), in one plain ASGI middleware: the decorator kind wraps every
    response in extra tasks and queues, and each layer costs a share of a cache hit."""

    def __init__(self, app: ASGIApp, version: Callable[[Scope], str | None]) -> None:
        self.app, self.version = app, version
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                version = self.version(scope)
                if version is not None:
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-model-version", version.encode()),
                    ]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            count, latency = self._series(path, scope["method"], status)
            count.inc()
            latency.observe(time.perf_counter() - started)

    def _series(self, path: str, method: str, status: int) -> tuple[Counter, Histogram]:
        """The labelled children, looked up once per (route, method, status): bounded, as
        the labels are (see the module docstring)."""
        key = (path, method_label(method), status)
        found = self._children.get(key)
        if found is None:
            found = (REQUESTS.labels(path, key[1], str(status)), LATENCY.labels(path))
            self._children[key] = found
        return found
