"""The HTTP service: `create_app(settings)` builds a FastAPI app whose lifespan loads the
current version (manifest first, checksums verified, index mmap'd), opens the cache and
watches for newly promoted versions (serving.live).
Routes are thin: parse, look up, answer with the model version and the cache state."""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
import orjson
import redis
import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.errors import RecsysError
from recsys.versions import VersionStore
from serving.cache import CACHE_EVENTS, Cache, make_cache, pack_results, unpack_results
from serving.limits import BodyLimit
from serving.live import LiveVersion
from serving.settings import ServiceSettings
from serving.state import VersionState

log = logging.getLogger(__name__)

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

ItemId = int | str
Search = Callable[[], tuple[np.ndarray, np.ndarray]]  # a retrieval to run on a cache miss


class ScoredItem(BaseModel):
    item_id: ItemId
    score: float


class Recommendations(BaseModel):
    model_version: str
    user_id: ItemId | None = None
    items: list[ScoredItem]
    cached: bool = Field(description="True when the answer came from the cache")
    fallback: bool = Field(
        default=False, description="True when the user is unknown: popular items"
    )
    unknown_items: list[ItemId] = Field(
        default_factory=list, description="History or exclude IDs not in the catalogue, ignored"
    )


class RecommendationRequest(BaseModel):
    user_id: ItemId | None = None
    history: list[ItemId] = Field(
        default_factory=list, max_length=1000, description="Recent item IDs, oldest first"
    )
    k: int = Field(10, ge=1, le=1000)
    exclude: list[ItemId] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _needs_someone(self) -> "RecommendationRequest":
        if self.user_id is None and not self.history:
            raise ValueError("give a user_id, a history of item IDs, or both")
        return self


class SimilarItems(BaseModel):
    model_version: str
    item_id: ItemId
    items: list[ScoredItem]
    cached: bool


def _scored(state: VersionState, items: np.ndarray, scores: np.ndarray) -> list[dict[str, object]]:
    return [
        {"item_id": i, "score": s}
        for i, s in zip(state.item_ids(items), scores.astype(float).tolist(), strict=True)
    ]


def _json(payload: dict[str, object]) -> Response:
    """Answers are built as plain dicts and serialised with orjson: the response models
    above document them in the OpenAPI schema, but validating up to 1,000 items a second
    time per request would cost more than finding them."""
    try:
        body = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # e.g. an ID beyond 64 bits echoed back: stdlib handles it
        body = json.dumps(payload).encode()
    return Response(body, media_type="application/json")


def _recommendations(
    version: str,
    user_id: ItemId | None,
    items: list[dict[str, object]],
    cached: bool,
    fallback: bool = False,
    unknown_items: list[ItemId] | None = None,
) -> Response:
    return _json(
        {
            "model_version": version,
            "user_id": user_id,
            "items": items,
            "cached": cached,
            "fallback": fallback,
            "unknown_items": unknown_items or [],
        }
    )


class Measure:
    """Request counts and latency by route and status, as a plain ASGI middleware (the
    decorator kind wraps every response in extra tasks and queues)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(path, scope["method"], str(status)).inc()
            LATENCY.labels(path).observe(time.perf_counter() - started)


def create_app(settings: ServiceSettings) -> FastAPI:
    holder: dict[str, object] = {}
    live = LiveVersion(VersionStore(settings.artifacts))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(1)
        live.load_now()
        holder["cache"] = make_cache(
            settings.redis_url,
            settings.redis_timeout_ms,
            settings.redis_retry_seconds,
            settings.lru_entries,
        )
        holder["search"] = ThreadPoolExecutor(
            settings.search_thread_count(), thread_name_prefix="search"
        )
        log.info("serving version %s", live.version)
        watcher = None
        if settings.reload_poll_seconds > 0:
            watcher = asyncio.create_task(live.watch(settings.reload_poll_seconds))
        yield
        if watcher is not None:
            watcher.cancel()
        holder["search"].shutdown(wait=True)  # type: ignore[attr-defined]
        holder.clear()

    app = FastAPI(
        title="recsys",
        version="1",
        description="Recommendations from a two-tower model over an Annoy index, cached in Redis.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Measure)

    def state() -> VersionState:
        """The version this request uses from start to end (read once: see serving.live)."""
        current = live.state
        if current is None:
            raise HTTPException(503, "no model loaded yet")
        return current

    client_keys = settings.client_keys()
    # The GET routes run on the event loop: a lookup and a Redis round trip bounded by its
    # millisecond timeout, where a thread-pool hop would cost more than a cache hit; only
    # a miss's search goes to the search threads (cached_search). History requests run
    # the user tower and stay in FastAPI's thread pool.

    async def require_client(x_api_key: Annotated[str | None, Header()] = None) -> None:
        """With RECSYS_API_KEYS set, the /v1 routes need one of them (constant-time check
        against every key, so timing tells nothing about which prefix matched)."""
        if not client_keys:
            return
        given = (x_api_key or "").encode()
        if not any([hmac.compare_digest(given, key) for key in client_keys]):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    # Without client keys the /v1 routes carry no dependency at all: FastAPI resolves each
    # one on every request, a cost comparable to the rest of a cache hit.
    client_check = [Depends(require_client)] if client_keys else []

    def require_admin(x_api_key: Annotated[str | None, Header()] = None) -> None:
        expected = settings.admin_api_key
        if expected is None:
            raise HTTPException(403, "admin routes are disabled: set RECSYS_ADMIN_API_KEY")
        given = (x_api_key or "").encode()
        if not hmac.compare_digest(given, expected.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    def cache() -> Cache:
        return holder["cache"]  # type: ignore[return-value]

    def cache_lookup(key: str) -> tuple[np.ndarray, np.ndarray] | None:
        hit = cache().get(key)
        if hit is None:
            CACHE_EVENTS.labels("miss").inc()
            return None
        CACHE_EVENTS.labels("hit").inc()
        return unpack_results(hit)

    def timed(compute: Search) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        found = compute()
        INDEX_SECONDS.observe(time.perf_counter() - started)
        return found

    def cached_results(key: str, compute: Search) -> tuple[np.ndarray, np.ndarray, bool]:
        """For callers already off the event loop (the thread-pool routes)."""
        hit = cache_lookup(key)
        if hit is not None:
            return *hit, True
        items, scores = timed(compute)
        cache().set(key, pack_results(items, scores), settings.cache_ttl_seconds)
        return items, scores, False

    async def cached_search(
        current: VersionState, key: str, compute: Search
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """The event-loop routes' lookup: a hit is answered on the loop. A miss on a version
        whose searches are slow (settings.offload_search_ms: a raised index budget, exact
        search over a large catalogue) searches in the worker's search threads: Annoy and
        NumPy release the GIL while they search, so the loop keeps answering hits
        meanwhile, and two misses that reach one worker use two cores. Faster searches run
        on the loop: handing the GIL back and forth between the loop and a thread cost
        more than it saved at 2 ms per search."""
        hit = cache_lookup(key)
        if hit is not None:
            return *hit, True
        if current.search_ms >= settings.offload_search_ms:
            loop = asyncio.get_running_loop()
            search_threads = holder["search"]
            items, scores = await loop.run_in_executor(search_threads, timed, compute)  # type: ignore[arg-type]
        else:
            items, scores = timed(compute)
        cache().set(key, pack_results(items, scores), settings.cache_ttl_seconds)
        return items, scores, False

    def user_search(
        current: VersionState, raw_user: ItemId, k: int, exclude_seen: bool
    ) -> tuple[str, Search, bool]:
        """(cache key, search, fallback) for a user ID: an unknown user gets the most
        popular items, flagged as fallback."""
        user = current.user_index(raw_user)
        rec = current.recommender
        if user is None:
            return (
                f"recsys:{current.version}:popular:{k}",
                lambda: rec.popular(np.zeros(0, np.int64), k),
                True,
            )
        exclude = current.seen(user) if exclude_seen else np.zeros(0, np.int64)
        return (
            f"recsys:{current.version}:user:{user}:{k}:{int(exclude_seen)}",
            lambda: rec.for_vector(rec.user_emb[user], exclude, k),
            False,
        )

    def user_answer(
        current: VersionState,
        raw_user: ItemId,
        found: tuple[np.ndarray, np.ndarray, bool],
        fallback: bool,
    ) -> Response:
        items, scores, cached = found
        return _recommendations(
            current.version,
            current.user_key(raw_user),
            _scored(current, items, scores),
            cached,
            fallback=fallback,
        )

    @app.get(
        "/v1/users/{user_id}/recommendations",
        response_model=Recommendations,
        dependencies=client_check,
    )
    async def user_recommendations(
        user_id: str,
        k: Annotated[int, Query(ge=1, le=settings.max_k)] = 10,
        exclude_seen: bool = True,
    ) -> Response:
        """Top-k items for a known user; unknown users get the most popular items (fallback)."""
        current = state()
        key, search, fallback = user_search(current, user_id, k, exclude_seen)
        return user_answer(current, user_id, await cached_search(current, key, search), fallback)

    @app.post(
        "/v1/recommendations",
        response_model=Recommendations,
        dependencies=client_check,
    )
    def recommendations(body: RecommendationRequest) -> Response:
        """For a user, a session history (new or anonymous users), or both."""
        current = state()
        if body.k > settings.max_k:
            raise HTTPException(422, f"k must be at most {settings.max_k}")
        unknown = [i for i in [*body.history, *body.exclude] if current.item_index(i) is None]
        if not body.history and not body.exclude and body.user_id is not None:
            key, search, fallback = user_search(current, body.user_id, body.k, True)
            return user_answer(current, body.user_id, cached_results(key, search), fallback)
        user = None if body.user_id is None else current.user_index(body.user_id)
        history = [h for i in body.history if (h := current.item_index(i)) is not None]
        excluded = [e for i in body.exclude if (e := current.item_index(i)) is not None]
        rec = current.recommender
        banned = np.unique(
            np.concatenate(
                [
                    np.asarray(history + excluded, dtype=np.int64),
                    current.seen(user) if user is not None else np.zeros(0, np.int64),
                ]
            )
        )
        if history:
            query = current.embed_history(user, history)
        elif user is not None:
            query = rec.user_emb[user]
        else:
            items, scores = rec.popular(banned, body.k)
            return _recommendations(
                current.version,
                body.user_id,
                _scored(current, items, scores),
                False,
                fallback=True,
                unknown_items=unknown,
            )
        digest = hashlib.blake2b(query.tobytes() + banned.tobytes(), digest_size=12).hexdigest()
        items, scores, cached = cached_results(
            f"recsys:{current.version}:query:{digest}:{body.k}",
            lambda: rec.for_vector(query, banned, body.k),
        )
        return _recommendations(
            current.version,
            body.user_id,
            _scored(current, items, scores),
            cached,
            unknown_items=unknown,
        )

    @app.get(
        "/v1/items/{item_id}/similar",
        response_model=SimilarItems,
        dependencies=client_check,
    )
    async def similar_items(
        item_id: str, k: Annotated[int, Query(ge=1, le=settings.max_k)] = 10
    ) -> Response:
        """Nearest items to an item in the embedding space (the item itself excluded)."""
        current = state()
        item = current.item_index(item_id)
        if item is None:
            raise HTTPException(404, f"unknown item_id {item_id!r}")
        rec = current.recommender
        items, scores, cached = await cached_search(
            current,
            f"recsys:{current.version}:similar:{item}:{k}",
            lambda: rec.for_vector(rec.item_emb[item], np.array([item]), k),
        )
        return _json(
            {
                "model_version": current.version,
                "item_id": current.item_ids(np.array([item]))[0],
                "items": _scored(current, items, scores),
                "cached": cached,
            }
        )

    @app.post("/admin/reload", dependencies=[Depends(require_admin)])
    async def admin_reload() -> dict[str, object]:
        """Switch to the version `current` points at now (workers also poll it)."""
        before = live.version
        try:
            switched = await live.refresh(force=True)
        except (RecsysError, OSError, ValueError) as exc:
            raise HTTPException(409, f"kept version {before}: {exc}") from exc
        return {"model_version": live.version, "previous_version": before, "switched": switched}

    @app.post("/admin/cache/flush", dependencies=[Depends(require_admin)])
    def admin_cache_flush() -> dict[str, object]:
        """Delete every cached answer and embedding of every version."""
        try:
            deleted = cache().flush("recsys:")
        except redis.RedisError as exc:
            raise HTTPException(503, f"cache unavailable: {exc}") from exc
        return {"deleted": deleted, "backend": cache().backend}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, object]:
        """Model, index and cache state; 503 until a model is loaded."""
        current = live.state
        ready = current is not None
        cache_state = (
            {"backend": cache().backend, "healthy": cache().healthy()}
            if "cache" in holder
            else None
        )
        if not ready:
            response.status_code = 503
            return {"ready": False, "cache": cache_state}
        assert isinstance(current, VersionState)
        return {
            "ready": True,
            "model_version": current.version,
            "items": len(current.recommender.item_ids),
            "users": len(current.recommender.user_ids),
            "index": getattr(current.recommender.retriever, "params", None),
            "cache": cache_state,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics of this worker."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
