"""Rendered cache hits: the response bytes of a user's answered GET, kept per worker by the
exact request (path and query string) and sent again without routing or validation.

A cache hit's answer logic is ~10 us; routing and parameter validation in the framework
cost several times that. A request identical to one answered from the cache a moment ago
is answered here from the bytes that answer sent, when the entry still holds:

- it is younger than RECSYS_LOCAL_CACHE_SECONDS (what an admin flush or an entry Redis
  dropped may take to reach every worker, as for the per-worker cache tier);
- the worker serves the same version and catalogue generation (`VersionState.scope`);
- the user has taken no event since (their posted-event sequence is unchanged).

Only answers the full route gave are kept, so a request it would refuse (bad k, bad filter,
missing key) never gets here; an API key is checked here as there on every request."""

import hmac
import json
import time
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.cache import CACHE_EVENTS

USER_ROUTE = "/v1/users/{user_id}/recommendations"
MAX_BYTES = 32 << 20  # per worker: k up to 1,000 makes bodies of up to ~60 kB
CACHE_HITS = CACHE_EVENTS.labels("hit")


def render_json(payload: object) -> bytes:
    """orjson, or the standard library for what orjson refuses (an ID past 64 bits)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return json.dumps(payload).encode()


@dataclass(frozen=True, slots=True)
class Rendered:
    expires: float  # time.monotonic()
    scope: str  # VersionState.scope when it was answered
    user: str  # the user's key in the posted-event log
    sequence: int  # their posted-event sequence then
    body: bytes


@dataclass(frozen=True, slots=True)
class RouteLabel:
    """What the metrics middleware reads of the route that answered: its template."""

    path: str


USER_ROUTE_LABEL = RouteLabel(USER_ROUTE)
RequestKey = tuple[str, bytes]  # (path, raw query string)


class RenderedAnswers:
    """Bounded by entries and bytes, oldest out first. Used on the event loop only (the
    async route keeps, the middleware reads), so it takes no lock."""

    def __init__(self, entries: int, seconds: float, max_bytes: int = MAX_BYTES) -> None:
        self.entries, self.seconds, self.max_bytes = entries, seconds, max_bytes
        self._data: dict[RequestKey, Rendered] = {}
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.entries > 0 and self.seconds > 0

    def keep(self, key: RequestKey, scope: str, user: str, sequence: int, body: bytes) -> None:
        if not self.enabled or len(body) > self.max_bytes:
            return
        self._drop(key)
        self._data[key] = Rendered(time.monotonic() + self.seconds, scope, user, sequence, body)
        self._bytes += len(body)
        while len(self._data) > self.entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._data)))

    def find(self, key: RequestKey) -> Rendered | None:
        """The entry if it has not expired (the caller checks scope and sequence)."""
        entry = self._data.get(key)
        if entry is not None and entry.expires < time.monotonic():
            self._drop(key)
            return None
        return entry

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0

    def _drop(self, key: RequestKey) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.body)


class RenderedHits:
    """Answers a GET whose rendered answer still holds (see the module docstring); hands
    every other request on. It sits inside the metrics middleware, which counts its
    answers under the user route."""

    def __init__(self, app: ASGIApp, client_keys: list[bytes]) -> None:
        self.app, self.client_keys = app, client_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            held = getattr(scope["app"].state, "resources", None)
            state = held.live.state if held is not None else None
            rendered = held.answers.rendered if held is not None else None
            if state is not None and rendered is not None and rendered.enabled:
                entry = rendered.find((scope["path"], scope["query_string"]))
                if (
                    entry is not None
                    and entry.scope == state.scope
                    and entry.sequence == state.fresh.sequence_of(entry.user)
                    and self._allowed(scope)
                ):
                    CACHE_HITS.inc()
                    scope["route"] = USER_ROUTE_LABEL  # for the metrics' route label
                    await _send_json(send, entry.body)
                    return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        """The /v1 routes' key check (serving.routes.require_client), when keys are set."""
        if not self.client_keys:
            return True
        raw = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        given = raw.decode("latin-1").encode()  # as the route reads a header
        return any([hmac.compare_digest(given, key) for key in self.client_keys])


async def _send_json(send: Send, body: bytes) -> None:
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
