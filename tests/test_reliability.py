"""Reliability and security: API keys, bounded requests, cache flush, corrupted versions,
a killed worker, a disk that fills up during a rebuild, and no secrets in logs."""

import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.synthetic import SyntheticConfig, generate
from features.sources import resolve_source
from recsys.core.errors import ArtifactError
from recsys.core.versions import VersionStore
from recsys.pipeline import build
from recsys.processes import free_port, served, wait_listening
from serving.app import create_app
from serving.settings import ServiceSettings
from serving.state import VersionState
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    generate(root / "data", SyntheticConfig(rows=6_000, users=150, items=90, clusters=3, seed=2))
    build(resolve_source(root / "data"), root / "artifacts", config=TrainConfig(max_epochs=1))
    return root / "artifacts"


def service(artifacts: Path, **overrides: object) -> ServiceSettings:
    return ServiceSettings(artifacts=artifacts, redis_url=None, reload_poll_seconds=0, **overrides)  # type: ignore[arg-type]


def test_api_keys_guard_the_recommendation_routes_only(artifacts):
    with TestClient(create_app(service(artifacts, api_keys="alpha, beta"))) as client:
        assert client.get("/v1/users/1/recommendations").status_code == 401
        wrong = client.get("/v1/users/1/recommendations", headers={"X-API-Key": "alph"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["detail"]
        ok = client.get("/v1/users/1/recommendations", headers={"X-API-Key": "beta"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_request_bodies_are_bounded_declared_or_chunked(artifacts):
    with TestClient(create_app(service(artifacts, max_body_bytes=10_000))) as client:
        big = {"history": list(range(5_000)), "k": 5}
        assert client.post("/v1/recommendations", json=big).status_code == 413

        def chunks():
            yield b'{"history": ['
            for _ in range(5_000):
                yield b"1, "
            yield b"1]}"

        chunked = client.post(
            "/v1/recommendations", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
        small = client.post("/v1/recommendations", json={"history": [1, 2], "k": 3})
        assert small.status_code == 200


def test_cache_flush_needs_the_admin_key_and_empties_redis(artifacts, redis_url):
    import redis

    config = service(artifacts, admin_api_key="adm1n")
    config = config.model_copy(update={"redis_url": redis_url})
    with TestClient(create_app(config)) as client:
        client.get("/v1/users/2/recommendations")
        assert client.get("/v1/users/2/recommendations").json()["cached"] is True
        assert client.post("/admin/cache/flush").status_code == 401
        flushed = client.post("/admin/cache/flush", headers={"X-API-Key": "adm1n"}).json()
        assert flushed["deleted"] >= 1 and flushed["backend"] == "redis"
        assert not list(redis.Redis.from_url(redis_url).scan_iter(match="recsys:*"))
        assert client.get("/v1/users/2/recommendations").json()["cached"] is False


@pytest.mark.parametrize(
    "damage",
    ["truncate the index", "flip a byte of the weights", "delete the embeddings"],
)
def test_a_damaged_version_is_refused_at_load(artifacts, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy, symlinks=True)
    version = VersionStore(copy).current()
    if damage == "truncate the index":
        index = version / "index" / "items.ann"
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    elif damage == "flip a byte of the weights":
        weights = version / "model" / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (version / "embeddings" / "items.parquet").unlink()
    with pytest.raises(ArtifactError):
        VersionState.load(version)


def test_no_secret_reaches_the_logs(artifacts, caplog):
    config = service(artifacts, admin_api_key="adm1n-s3cret", api_keys="client-s3cret")
    config = config.model_copy(update={"redis_url": "redis://:redis-s3cret@127.0.0.1:1/0"})
    with caplog.at_level(logging.DEBUG), TestClient(create_app(config)) as client:
        client.get("/v1/users/2/recommendations", headers={"X-API-Key": "client-s3cret"})
        client.post("/admin/reload", headers={"X-API-Key": "wrong"})
    assert "redis unavailable" in caplog.text  # the outage is logged...
    for secret in ("adm1n-s3cret", "client-s3cret", "redis-s3cret"):
        assert secret not in caplog.text  # ...but no key or password
    assert "s3cret" not in repr(config)


def test_a_killed_worker_leaves_the_others_answering_and_is_replaced(artifacts):
    with served(artifacts, workers=2) as base:
        port = int(base.rsplit(":", 1)[1])
        parent = next(
            p
            for p in psutil.process_iter(["cmdline"])
            if f"--port {port}" in " ".join(p.info.get("cmdline") or [])
        )
        workers = [
            child
            for child in parent.children()
            if "resource_tracker" not in " ".join(child.cmdline())
        ]
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGKILL)
        # Connections already queued on the dead worker's own socket are reset with it
        # (each worker listens on its own socket); new ones go to the living workers.
        workers[0].wait(timeout=30)
        answers = []
        for user in range(40):
            with httpx.Client(base_url=base, timeout=10) as client:  # a fresh connection
                answers.append(client.get(f"/v1/users/{user}/recommendations").status_code)
        assert answers.count(200) == len(answers)
        wait_listening(port, 2, timeout=120)  # a new worker took the dead one's place
        replaced = {child.pid for child in parent.children()} - {w.pid for w in workers}
        assert replaced


def test_serve_stops_with_a_message_when_its_workers_cannot_load_the_version(artifacts, tmp_path):
    """A worker that cannot start the app is not restarted in a loop: the service stops.
    (Damage that checksums see is refused by `recsys serve` itself, before any worker
    starts: tests/test_probed_faults.py. Here the files are resealed, so only loading
    them fails.)"""
    import shutil

    from recsys.core.artifacts import read_manifest, write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy, symlinks=True)
    version = VersionStore(copy).current()
    (version / "embeddings" / "users.parquet").write_bytes(b"not parquet")
    manifest = read_manifest(version, verify=False)
    manifest.pop("checksums")
    write_manifest(version, manifest)
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(copy)]
    command += ["--port", str(free_port()), "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "could not start the app" in result.stderr


def test_connections_are_spread_over_the_workers(artifacts, tmp_path):
    """Each worker listens on its own socket (serving.workers): a burst of keep-alive
    connections must not all land on whichever worker woke first, and no other service
    may join those sockets on the same port."""
    log = tmp_path / "serve.log"
    with served(artifacts, workers=2, log=log) as base:
        # One line says where it listens, and nothing else is printed at start.
        lines = log.read_text().splitlines()
        assert lines == [
            f"listening on {base}: version {VersionStore(artifacts).current_name()}, "
            "2 workers (ready when /readyz answers 200)"
        ], lines
        port = int(base.rsplit(":", 1)[1])
        clients = [httpx.Client(base_url=base, timeout=10) for _ in range(16)]
        try:
            for client in clients:
                assert client.get("/healthz").status_code == 200
            owners = [
                c.pid
                for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
            ]
        finally:
            for client in clients:
                client.close()
        assert len(owners) == 16
        assert len(set(owners)) == 2
        # /metrics sums both workers: every scrape counts all 16 requests, whichever
        # worker answers it (per-worker counts would alternate and look like resets).
        for _ in range(4):
            with httpx.Client(base_url=base, timeout=10) as scraper:
                text = scraper.get("/metrics").text
            counted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("recsys_http_requests_total{") and 'route="/healthz"' in line
            )
            assert counted == 16, text
        # The workers' shared port is not open to a second service started by mistake.
        command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(artifacts)]
        second = subprocess.run(
            [*command, "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert "cannot bind" in second.stderr


def test_a_full_disk_during_a_rebuild_promotes_nothing(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy, symlinks=True)
    store = VersionStore(copy)
    before = store.current_name()
    data = artifacts.parent / "data"

    def small_disk() -> None:  # writes past 200 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    command = [sys.executable, "-m", "recsys", "build", "--data", str(data)]
    command += ["--artifacts", str(copy), "--epochs", "1", "--no-progress"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        check=False,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "too large" in result.stderr.lower()
    assert store.current_name() == before and store.list() == [before]
    assert not list(store.versions.glob(".staging-*"))
    time.sleep(0.1)
    assert os.path.isdir(store.current())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.sampled_from(["user_id,item_id,timestamp", "user_id,item_id", "user,item", ""]),
    lines=st.lists(
        st.lists(
            st.one_of(
                st.text(max_size=8),
                st.integers(-(2**70), 2**70).map(str),
                st.floats(allow_nan=True).map(str),
                st.just(""),
            ),
            max_size=4,
        ).map(",".join),
        max_size=12,
    ),
)
def test_recsys_ingest_on_garbage_ends_cleanly(tmp_path, header, lines):
    """Any file: a result whose counts add up, or one line of error with status 2."""
    from typer.testing import CliRunner

    from recsys.cli import app

    work = Path(tempfile.mkdtemp(dir=tmp_path))
    log = work / "log.csv"
    log.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8", errors="surrogatepass")
    result = CliRunner().invoke(app, ["ingest", "--data", str(log), "--out", str(work / "out")])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code == 0:
        read, kept = (
            int(re.search(rf"rows {word}\s*│\s*(\d+)", result.output).group(1))  # type: ignore[union-attr]
            for word in ("read", "kept")
        )
        assert kept <= read
