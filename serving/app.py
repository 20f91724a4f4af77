"""The HTTP service: `create_app(settings)` builds a FastAPI app whose lifespan loads the
current version (manifest first, checksums verified, index mmap'd), opens the cache and
watches for newly promoted versions (serving.live). The pieces: serving.routes (HTTP),
serving.answers (what is answered, and every cache key), serving.schemas (bodies),
serving.metrics (Prometheus), serving.resources (what a worker holds)."""

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.types import Scope
from threadpoolctl import threadpool_limits

from features.event_log import SegmentWriter, events_dir
from features.event_stream import EventLogSettings
from recsys.core.versions import VersionStore
from serving.answers import AnswerError, Answers
from serving.cache import make_cache
from serving.limits import BodyLimit
from serving.live import LiveVersion
from serving.metrics import Measure
from serving.rendered import RenderedAnswers, RenderedHits
from serving.resources import Resources
from serving.routes import admin_router, api_router, probes
from serving.settings import ServiceSettings

log = logging.getLogger(__name__)

MAX_ECHOED_CHARS = 200  # of a refused input's JSON text, per validation error
MAX_ERRORS = 20  # validation errors listed in one 422


def _open(settings: ServiceSettings) -> Resources:
    shared = EventLogSettings().open()  # None: this host's own files
    if shared is not None:
        shared.check_durable()
    live = LiveVersion(VersionStore(settings.artifacts), settings.fresh_events_per_user, shared)
    live.load_now()
    cache = make_cache(
        settings.redis_url,
        settings.redis_timeout_ms,
        settings.redis_retry_seconds,
        settings.lru_entries,
        settings.local_cache_entries,
        settings.local_cache_seconds,
    )
    threads = ThreadPoolExecutor(settings.search_thread_count(), thread_name_prefix="search")
    answers = Answers(
        live,
        shared.events if shared else SegmentWriter(events_dir(settings.artifacts)),
        settings.artifacts,
        cache,
        settings.cache_ttl_seconds,
        threads,
        settings.offload_search_ms,
        settings.max_k,
        settings.max_history,
        settings.max_new_items,
        settings.fresh_half_events,
        RenderedAnswers(settings.local_cache_entries, settings.local_cache_seconds),
    )
    return Resources(settings, live, cache, threads, answers)


def _text(value: str) -> str:
    """Text that UTF-8 can carry: a lone surrogate is shown escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(value)[1:-1]
    return value


def _finite(value: Any) -> Any:
    """A validation error's input, safe to echo as JSON (NaN and Infinity are not JSON,
    a lone surrogate is not UTF-8)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {_finite(k): _finite(v) for k, v in value.items()}
    return value


def _excerpt(value: Any) -> Any:
    """A validation error's input as echoed: itself when short, else the start of its JSON
    text, so that a 20,000-event body refused for its length is not sent back whole."""
    safe = _finite(value)
    text = json.dumps(safe, ensure_ascii=False, default=str)
    if len(text) <= MAX_ECHOED_CHARS:
        return safe
    return f"{text[:MAX_ECHOED_CHARS]}... ({len(text):,} characters)"


def _shown(error: dict[str, Any]) -> dict[str, Any]:
    """One error as answered: no `ctx` (it may hold exceptions), short input and location
    (a location can be a key of the body's own)."""
    shown = {k: _finite(v) for k, v in error.items() if k not in ("ctx", "input", "loc")}
    shown["loc"] = [_excerpt(part) for part in error.get("loc", ())]
    if "input" in error:
        shown["input"] = _excerpt(error["input"])
    return shown


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the first problems, each input shortened; inputs that JSON cannot carry
    (NaN, 1e400) are quoted. A list of 1,000 bad IDs gives 1,000 errors: the answer names
    the first MAX_ERRORS and counts the rest."""
    errors = exc.errors()
    detail = [_shown(e) for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        more = len(errors) - MAX_ERRORS
        detail.append({"type": "too_many_errors", "loc": [], "msg": f"{more} more errors"})
    return JSONResponse({"detail": detail}, status_code=422)


async def _unanswerable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AnswerError)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def _held_version(scope: Scope) -> str | None:
    """The version this worker holds when it answers: `X-Model-Version` on every answer (a
    body's `model_version` names the version that computed it)."""
    held = getattr(scope["app"].state, "resources", None)
    return held.live.version if held is not None else None


def create_app(settings: ServiceSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        blas = threadpool_limits(settings.blas_threads or None, user_api="blas")
        held = _open(settings)
        app.state.resources = held
        log.info("serving version %s", held.live.version)
        tasks = [asyncio.create_task(held.live.follow_events(settings.events_poll_seconds))]
        if settings.reload_poll_seconds > 0:
            tasks.append(asyncio.create_task(held.live.watch(settings.reload_poll_seconds)))
        yield
        for task in tasks:
            task.cancel()
        held.close()
        del app.state.resources
        blas.restore_original_limits()

    # The docs pages load Swagger UI and ReDoc from files in the package, not from a CDN,
    # so /docs works on a machine without internet access.
    app = FastAPIOffline(
        title="recsys",
        version="1",
        description="Recommendations from a two-tower model over an Annoy index, cached in Redis.",
        lifespan=lifespan,
    )
    app.add_middleware(RenderedHits, client_keys=settings.client_keys())
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Measure, version=_held_version)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(AnswerError, _unanswerable)
    app.include_router(api_router(settings))
    app.include_router(admin_router(settings))
    app.include_router(probes)
    return app
