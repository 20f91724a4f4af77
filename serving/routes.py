"""The HTTP routes: parse, call `serving.answers`, serialise. `async def` routes run on the
event loop and must not block it (lookups, cache round trips, fast searches); plain `def`
routes run in FastAPI's thread pool (the user tower, admin work)."""

import hmac
import os
from typing import Annotated

import orjson
import redis
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from pydantic import BeforeValidator

from recsys.core.errors import RecsysError
from serving.answers import CACHE_PREFIX, Answer, Answers
from serving.drain import DRAINING
from serving.multiprocess_dir import MULTIPROCESS_DIR
from serving.rendered import render_json
from serving.resources import Resources
from serving.schemas import (
    EventBatch,
    EventsAccepted,
    ItemUpdate,
    ItemUpdated,
    RecommendationRequest,
    Recommendations,
    Reloaded,
    SimilarItems,
    add_filter,
    query_flag,
)
from serving.settings import ServiceSettings

# The filter parameter is read from the query string by hand and only documented here:
# declared as a FastAPI parameter, its validation cost ~5 us on every request, filtered or
# not (a cache hit costs ~10 us of answer logic).
CATEGORY_PARAMETER = {
    "parameters": [
        {
            "name": "category",
            "in": "query",
            "required": False,
            "description": "COLUMN:VALUE, repeatable: items with one of the values in every "
            "named column",
            "schema": {"type": "array", "items": {"type": "string"}},
            "style": "form",
            "explode": True,
        }
    ]
}


def parse_categories(request: Request) -> dict[str, list[str]]:
    """?category=genre:Comedy&category=genre:Drama&category=brand:acme -> {'genre': [...],
    'brand': [...]}."""
    filters: dict[str, list[str]] = {}
    if "category" not in request.query_params:
        return filters
    for text in request.query_params.getlist("category"):
        column, colon, value = text.partition(":")
        if not colon or not column.strip():
            raise HTTPException(422, f"category must be COLUMN:VALUE, got {text[:100]!r}")
        add_filter(filters, column, [value])
    return filters


def resources(request: Request) -> Resources:
    held: Resources = request.app.state.resources
    return held


def answers(request: Request) -> Answers:
    return resources(request).answers


def _json(payload: Answer) -> Response:
    """Answers are plain dicts serialised with orjson: the response models document them,
    but validating up to 1,000 items a second time per request would cost more than
    finding them."""
    return Response(render_json(payload), media_type="application/json")


def api_router(settings: ServiceSettings) -> APIRouter:
    """The /v1 routes. With RECSYS_API_KEYS set they need one of the keys; without, they
    carry no dependency at all (FastAPI resolves each one on every request, a cost
    comparable to the rest of a cache hit)."""
    client_keys = settings.client_keys()

    async def require_client(x_api_key: Annotated[str | None, Header()] = None) -> None:
        """Constant-time check against every key, so timing tells nothing about which
        prefix matched."""
        given = (x_api_key or "").encode()
        if not any([hmac.compare_digest(given, key) for key in client_keys]):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    router = APIRouter(dependencies=[Depends(require_client)] if client_keys else [])
    max_k = settings.max_k

    @router.get(
        "/v1/users/{user_id}/recommendations",
        response_model=Recommendations,
        openapi_extra=CATEGORY_PARAMETER,
    )
    async def user_recommendations(
        request: Request,
        user_id: str,
        k: Annotated[int, Query(ge=1, le=max_k)] = 10,
        exclude_seen: Annotated[bool, BeforeValidator(query_flag)] = True,
    ) -> Response:
        """Top-k items for a known user; unknown users get the most popular items (fallback).
        A user with events posted since the version is answered from their whole history."""
        filters = parse_categories(request)
        asked = (request.scope["path"], request.scope["query_string"])
        body = await answers(request).user_body(asked, user_id, k, exclude_seen, filters)
        return Response(body, media_type="application/json")

    @router.post("/v1/recommendations", response_model=Recommendations)
    def recommendations(request: Request, body: RecommendationRequest) -> Response:
        """For a user, a session history (new or anonymous users), or both."""
        return _json(answers(request).for_request(body))

    @router.post("/v1/events", response_model=EventsAccepted, status_code=202)
    def post_events(request: Request, body: EventBatch) -> Response:
        """Store users' new events (fsync'd before the answer); their next answers include
        them. Bad rows are rejected one by one with a reason; the others are kept."""
        return Response(
            orjson.dumps(answers(request).post_events(body.events)),
            status_code=202,
            media_type="application/json",
        )

    @router.get(
        "/v1/items/{item_id}/similar", response_model=SimilarItems, openapi_extra=CATEGORY_PARAMETER
    )
    async def similar_items(
        request: Request, item_id: str, k: Annotated[int, Query(ge=1, le=max_k)] = 10
    ) -> Response:
        """Nearest items to an item in the embedding space (the item itself excluded)."""
        return _json(await answers(request).similar(item_id, k, parse_categories(request)))

    return router


def admin_router(settings: ServiceSettings) -> APIRouter:
    """/admin routes: 403 until RECSYS_ADMIN_API_KEY is set, then they need that key."""

    def require_admin(x_api_key: Annotated[str | None, Header()] = None) -> None:
        expected = settings.admin_api_key
        if expected is None:
            raise HTTPException(403, "admin routes are disabled: set RECSYS_ADMIN_API_KEY")
        given = (x_api_key or "").encode()
        if not hmac.compare_digest(given, expected.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @router.post("/reload", response_model=Reloaded)
    async def admin_reload(request: Request) -> Reloaded:
        """Switch to the version `current` points at now (workers also poll it); 409 and
        the old version kept when the new one cannot be loaded."""
        live = resources(request).live
        before = live.version
        try:
            switched = await live.refresh(force=True)
        except RecsysError as exc:
            raise HTTPException(409, f"kept version {before}: {exc}") from exc
        return Reloaded(model_version=live.version, previous_version=before, switched=switched)

    @router.put("/items/{item_id}", response_model=ItemUpdated)
    def admin_item(request: Request, item_id: str, body: ItemUpdate) -> Response:
        """Hide an item from every route (`available: false`), show it again, or add a new
        item from its features; stored durably, on every worker within a poll, kept across
        restarts, version switches and rebuilds."""
        return _json(answers(request).change_item(item_id, body.available, body.features))

    @router.post("/cache/flush")
    def admin_cache_flush(request: Request) -> dict[str, object]:
        """Delete every cached answer and embedding of every version."""
        cache = resources(request).cache
        resources(request).answers.rendered.clear()  # this worker's; the others' expire
        try:
            deleted = cache.flush(CACHE_PREFIX)
        except redis.RedisError as exc:
            raise HTTPException(503, f"cache unavailable: {exc}") from exc
        return {"deleted": deleted, "backend": cache.backend}

    return router


probes = APIRouter()


@probes.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@probes.get("/readyz")
def readyz(request: Request, response: Response) -> dict[str, object]:
    """Model, index and cache state; 503 until a verified version is loaded, and again
    from the first SIGTERM on (the drain period: requests are still answered)."""
    held: Resources | None = getattr(request.app.state, "resources", None)
    current = held.live.state if held is not None else None
    cache_state = {"backend": held.cache.backend, "healthy": held.cache.healthy()} if held else None
    if current is None:
        response.status_code = 503
        return {"ready": False, "cache": cache_state}
    if DRAINING.is_set():
        response.status_code = 503
        return {"ready": False, "draining": True, "model_version": current.version}
    return {
        "ready": True,
        "model_version": current.version,
        "items": len(current.recommender.item_ids),
        "users": len(current.recommender.user_ids),
        "index": getattr(current.recommender.retriever, "params", None),
        "cache": cache_state,
    }


@probes.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of the whole service: with several workers, every worker's
    counters summed (prometheus-client's multiprocess mode, which `recsys serve` turns on),
    so that consecutive scrapes never see one worker's counts and then another's."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
