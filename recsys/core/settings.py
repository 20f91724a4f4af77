"""Process-wide settings read from the environment (pydantic-settings).

Stage configs (features, towers, training, index) are frozen dataclasses next to the code
that owns them; this module holds only what depends on the machine the code runs on.
"""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "recsys"


class Settings(BaseSettings):
    """Environment settings; `RECSYS_CACHE_DIR` moves the data set cache."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True)

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # How long one request to object storage may wait for an answer before it fails (and
    # the caller's back-off takes over): a store that hangs must not hang a host's sync.
    storage_timeout_seconds: float = Field(default=60.0, gt=0.0, le=3600.0)

    @property
    def datasets_dir(self) -> Path:
        return self.cache_dir / "datasets"
