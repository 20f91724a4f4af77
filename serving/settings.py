"""Service settings from the environment (pydantic-settings), validated at start-up."""

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.cache import CLUSTER_SCHEMES, cluster_nodes


class ServiceSettings(BaseSettings):
    """`RECSYS_*` variables; `REDIS_URL` selects the cache server (unset: in-process LRU)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True)

    artifacts: Path = Path("artifacts")
    redis_url: str | None = Field(  # may hold a password: kept out of repr and logs
        default=None, validation_alias=AliasChoices("REDIS_URL", "RECSYS_REDIS_URL"), repr=False
    )
    cache_ttl_seconds: int = Field(default=600, ge=1)
    redis_timeout_ms: int = Field(default=50, ge=1, le=10_000)
    redis_retry_seconds: float = Field(default=1.0, ge=0.0)  # back-off after a Redis failure
    lru_entries: int = Field(default=100_000, ge=0)
    # Answers each worker keeps in front of Redis, and how long: an admin cache flush
    # reaches every worker within the seconds (0 entries: every hit asks Redis)
    local_cache_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    local_cache_seconds: float = Field(default=1.0, ge=0.0, le=3600.0)
    max_k: int = Field(default=1000, ge=1, le=10_000)  # the largest k of every route
    max_history: int = Field(default=1000, ge=1, le=1000)  # longest history in a request
    max_new_items: int = Field(  # items added through PUT /admin/items between builds
        default=10_000, ge=0, le=1_000_000
    )
    # A user's posted events held per worker (the most recent; the tower reads no more)
    fresh_events_per_user: int = Field(default=1000, ge=1, le=100_000)
    # How many posted events weigh as much as the user's stored vector: the answer mixes
    # the vector of the posted events alone in with weight n / (n + this)
    fresh_half_events: float = Field(default=5.0, gt=0.0, le=1e6)
    reload_poll_seconds: float = Field(default=2.0, ge=0.0)  # 0: only POST /admin/reload
    # After SIGTERM: /readyz answers 503 and requests are still answered this long, so a
    # load balancer that checks /readyz takes the host out first (its interval x fall)
    drain_seconds: float = Field(default=0.0, ge=0.0, le=600.0)
    # How often a worker reads the other workers' posted events (its own: at once)
    events_poll_seconds: float = Field(default=0.1, gt=0.0, le=60.0)
    admin_api_key: SecretStr | None = None  # unset: the admin routes answer 403
    api_keys: SecretStr | None = None  # comma-separated; set: /v1 routes need X-API-Key
    header_timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)  # slow clients
    body_timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)  # whole body after them
    max_body_bytes: int = Field(default=1_000_000, ge=1_000)  # larger request bodies: 413
    # Cache misses of a version whose build measured a search at this or more search in
    # the worker's search threads; faster ones on the event loop: at 2 ms per search (1M
    # items, 200 misses/s) the loop gave a p99 of 6.5-7.7 ms and the threads 11-17 ms,
    # each finished search waiting for the GIL
    offload_search_ms: float = Field(default=10.0, ge=0.0)
    search_threads: int = Field(default=0, ge=0, le=256)  # 0: one per CPU this process may use
    # BLAS threads of each worker (0: the library's default, one per core). One: with a
    # worker per core, a matrix-vector product split over two threads waited for a core
    # the other worker held, and misses of a 1,682-item version took 0.2-1.6 ms instead
    # of 0.03 (closed-loop misses fell from 2,985 to about 300 requests/s)
    blas_threads: int = Field(default=1, ge=0, le=256)

    def search_thread_count(self) -> int:
        return self.search_threads or len(os.sched_getaffinity(0))

    def client_keys(self) -> list[bytes]:
        if self.api_keys is None:
            return []
        return [
            k.strip().encode() for k in self.api_keys.get_secret_value().split(",") if k.strip()
        ]

    @field_validator("admin_api_key")
    @classmethod
    def _admin_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "is set but empty: unset RECSYS_ADMIN_API_KEY to disable the admin routes"
            )
        if value is not None:
            _usable_key(value.get_secret_value())
        return value

    @field_validator("api_keys")
    @classmethod
    def _client_keys_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not [k for k in value.get_secret_value().split(",") if k.strip()]:
            raise ValueError("holds no key: unset RECSYS_API_KEYS to leave /v1 open")
        if value is not None:
            for key in value.get_secret_value().split(","):
                if key.strip():
                    _usable_key(key.strip())
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if value.startswith(CLUSTER_SCHEMES):
            cluster_nodes(value)  # a node without host:port is refused here
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss://, unix:// or (a cluster) "
                "redis+cluster:// or rediss+cluster://"
            )
        try:
            urlsplit(value).port  # noqa: B018 (parsing is the check; the message holds no URL)
        except ValueError as exc:
            raise ValueError("has a port that is not a number") from exc
        return value


def _usable_key(key: str) -> None:
    """A key a client can send in an X-API-Key header: HTTP strips a header value's
    surrounding spaces, so a key with them could never match (every request a 401)."""
    if key != key.strip():
        raise ValueError("has spaces around it, which no X-API-Key header can carry")
    if not key.isprintable() or not key.isascii():
        raise ValueError("holds characters an X-API-Key header cannot carry")


def settings_problem(exc: ValidationError) -> str:
    """One line naming each bad setting and why, never its value (it may be a password)."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        env = name.upper() if name.upper() == "REDIS_URL" else f"RECSYS_{name.upper()}"
        problems.append(f"{env}: {error['msg'].removeprefix('Value error, ')}")
    return "invalid service settings: " + "; ".join(problems)
