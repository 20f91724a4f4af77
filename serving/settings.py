"""Service settings from the environment (pydantic-settings), validated at start-up."""

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    max_k: int = Field(default=1000, ge=1)
    max_history: int = Field(default=1000, ge=1)  # longest history accepted in a request
    reload_poll_seconds: float = Field(default=2.0, ge=0.0)  # 0: only POST /admin/reload
    admin_api_key: SecretStr | None = None  # unset: the admin routes answer 403
    api_keys: SecretStr | None = None  # comma-separated; set: /v1 routes need X-API-Key
    max_body_bytes: int = Field(default=1_000_000, ge=1_000)  # larger request bodies: 413
    # Cache misses of a version whose build measured a search at this or more search in
    # the worker's search threads; faster ones on the event loop: at 2 ms per search (1M
    # items, 200 misses/s) the loop gave a p99 of 6.5-7.7 ms and the threads 11-17 ms,
    # each finished search waiting for the GIL
    offload_search_ms: float = Field(default=10.0, ge=0.0)
    search_threads: int = Field(default=0, ge=0, le=256)  # 0: one per CPU this process may use

    def search_thread_count(self) -> int:
        return self.search_threads or len(os.sched_getaffinity(0))

    def client_keys(self) -> list[bytes]:
        if self.api_keys is None:
            return []
        return [
            k.strip().encode() for k in self.api_keys.get_secret_value().split(",") if k.strip()
        ]

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return value
