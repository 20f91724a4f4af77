"""Regression tests for the faults that probing a running service and the CLI found
(issue 14): empty keys, secrets in errors, NaN in JSON bodies, unbounded metric labels,
damaged or copied versions, and hot-swap failures of every kind."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy, small_version
from pydantic import ValidationError

from data.synthetic import SyntheticConfig
from recsys.core.artifacts import MANIFEST, read_manifest, write_manifest
from recsys.core.errors import ArtifactError
from recsys.core.versions import VersionStore, verify_version
from serving.app import create_app
from serving.settings import ServiceSettings
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only

ADMIN = "probe-admin-key"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("probes"),
        SyntheticConfig(rows=4_000, users=100, items=60, clusters=3, seed=5),
        TrainConfig(max_epochs=1, refit=False),
    )


@pytest.fixture
def own_artifacts(artifacts, tmp_path) -> Path:
    return private_copy(artifacts, tmp_path)


@pytest.fixture
def client(artifacts) -> Iterator[TestClient]:
    settings = ServiceSettings(artifacts=artifacts, admin_api_key=ADMIN, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def recsys_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "env",
    [{"RECSYS_ADMIN_API_KEY": ""}, {"RECSYS_ADMIN_API_KEY": "  "}, {"RECSYS_API_KEYS": " , "}],
)
def test_empty_keys_are_refused_at_start_up(env, artifacts, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        ServiceSettings(artifacts=artifacts)
    done = recsys_cli("serve", "--artifacts", str(artifacts), "--port", "1", env=env)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and next(iter(env)) in done.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_URL": "http://user:hunter2-secret@localhost:6379/0"},
        {"REDIS_URL": "redis://user:hunter2-secret@localhost:port/0"},
        {"REDIS_URL": "redis://:hunter2-secret@localhost/0", "RECSYS_CACHE_TTL_SECONDS": "0"},
    ],
)
def test_bad_settings_fail_in_one_line_without_the_secret(env, artifacts):
    done = recsys_cli("serve", "--artifacts", str(artifacts), "--workers", "2", env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid service settings" in lines[0]
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "body",
    [
        '{"history": [1], "k": NaN}',
        '{"history": [1], "k": Infinity}',
        '{"history": [1], "k": 1e400}',
        '{"history": [NaN]}',
        '{"user_id": -Infinity}',
    ],
)
def test_non_finite_numbers_in_json_get_422(client, body):
    answer = client.post(
        "/v1/recommendations", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"]


def test_metric_labels_stay_bounded_whatever_the_method(client):
    for method in ("FOO", "BREW", "X" * 50, "PROPFIND"):
        client.request(method, "/v1/users/0/recommendations")
    metrics = client.get("/metrics").text
    requests = [line for line in metrics.splitlines() if line.startswith("recsys_http_requests")]
    methods = {line.split('method="')[1].split('"')[0] for line in requests}
    assert "other" in methods and methods <= {"GET", "POST", "other", "HEAD", "PUT"}


def _current(artifacts: Path) -> Path:
    return VersionStore(artifacts).current()


def _reseal(version: Path, name: str | None = None) -> None:
    """Rewrite a version's manifest with fresh checksums (damage that checksums cannot see)."""
    manifest = read_manifest(version, verify=False)
    manifest.pop("checksums")
    write_manifest(version, {**manifest, "version": name or manifest["version"]})


def _damaged(how: str, artifacts: Path) -> Path:
    version = _current(artifacts)
    if how == "flipped bytes":
        target = version / "embeddings" / "items.parquet"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "no checksums key":
        manifest = json.loads((version / MANIFEST).read_text())
        del manifest["checksums"]
        (version / MANIFEST).write_text(json.dumps(manifest))
    elif how == "ingest manifest edited":
        inner = version / "data" / MANIFEST
        inner.write_text(inner.read_text().replace('"kind"', '"kind" ', 1))
    elif how == "path outside the version":
        manifest = json.loads((version / MANIFEST).read_text())
        manifest["checksums"]["../../outside"] = "0" * 64
        (version / MANIFEST).write_text(json.dumps(manifest))
    return version


DAMAGE = ["flipped bytes", "no checksums key", "ingest manifest edited", "path outside the version"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_version_is_refused_by_serve_and_evaluate_in_one_line(how, own_artifacts):
    version = _damaged(how, own_artifacts)
    with pytest.raises(ArtifactError):
        verify_version(version)
    for workers in ("1", "2"):
        done = recsys_cli("serve", "--artifacts", str(own_artifacts), "--workers", workers)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and version.name in lines[0], done.stderr
    done = recsys_cli("evaluate", "--artifacts", str(own_artifacts))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_copied_version_directory_is_refused_once_not_reloaded_forever(own_artifacts):
    store = VersionStore(own_artifacts)
    original = store.current()
    copy = store.versions / "copied-by-hand"
    shutil.copytree(original, copy)
    with pytest.raises(ArtifactError, match="must keep the name"):
        verify_version(copy)
    settings = ServiceSettings(artifacts=own_artifacts, admin_api_key=ADMIN, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        link = own_artifacts / "current"
        link.unlink()
        link.symlink_to(Path("versions") / copy.name)
        reload = client.post("/admin/reload", headers={"X-API-Key": ADMIN})
        assert reload.status_code == 409 and "must keep the name" in reload.json()["detail"]
        served = client.get("/v1/users/0/recommendations").json()
        assert served["model_version"] == original.name
        live = client.app.state.resources.live  # type: ignore[attr-defined]
        assert live.failed == copy.name


def test_hot_swap_failures_of_any_kind_keep_the_version_and_answer_409(own_artifacts):
    """A version whose checksums are right but whose files do not load (a Polars error, a
    KeyError) is skipped like a checksum failure: counted, 409 on reload, not retried."""
    store = VersionStore(own_artifacts)
    original = store.current()
    broken = store.versions / "20990101T000000Z-broken"
    shutil.copytree(original, broken)
    (broken / "embeddings" / "users.parquet").write_bytes(b"not parquet at all")
    _reseal(broken, broken.name)
    settings = ServiceSettings(artifacts=own_artifacts, admin_api_key=ADMIN, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        before = _failed_reloads(client)
        store.promote(broken.name)
        reload = client.post("/admin/reload", headers={"X-API-Key": ADMIN})
        assert reload.status_code == 409, reload.text
        assert client.get("/v1/users/0/recommendations").json()["model_version"] == original.name
        assert _failed_reloads(client) == before + 1
        live = client.app.state.resources.live  # type: ignore[attr-defined]
        import asyncio

        assert asyncio.run(live.refresh()) is False  # a poll does not retry it
        assert _failed_reloads(client) == before + 1


def _failed_reloads(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('recsys_model_reloads_total{outcome="failed"}'):
            return float(line.split()[-1])
    return 0.0


def test_interactions_of_a_version_are_still_readable_after_the_probes(artifacts):
    """The shared fixture stays intact (every damaging test works on its own copy)."""
    verify_version(_current(artifacts))
    assert pl.read_parquet(_current(artifacts) / "data" / "interactions.parquet").height > 0


def test_a_history_over_the_configured_limit_is_a_422(artifacts):
    """RECSYS_MAX_HISTORY is read (it was ignored): the limit holds, the message says it."""
    settings = ServiceSettings(artifacts=artifacts, max_history=5, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        items = client.get("/v1/users/0/recommendations", params={"k": 6}).json()["items"]
        history = [item["item_id"] for item in items]
        assert client.post("/v1/recommendations", json={"history": history[:5]}).status_code == 200
        over = client.post("/v1/recommendations", json={"history": history})
        assert over.status_code == 422 and "at most 5" in over.json()["detail"]


def test_settings_that_would_be_ignored_are_refused_in_one_line(tmp_path):
    """--extra-negatives fed only the softmax loss and was dropped silently otherwise; the
    message keeps its [section] (it was eaten as console markup)."""
    done = recsys_cli(
        "build", "--data", str(tmp_path), "--artifacts", str(tmp_path / "a"),
        "--loss", "npair", "--extra-negatives", "10",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: [train] extra_negatives feed the softmax loss only: add the softmax loss or "
        "drop them"
    ]


def test_unknown_users_get_the_same_fallback_in_batch_and_over_http(client, artifacts):
    """One owner of the unknown-user rule (Recommender.for_unknown), so the two agree."""
    from serving.recommender import Recommender

    http = client.get("/v1/users/nobody-at-all/recommendations", params={"k": 7}).json()
    assert http["fallback"] is True
    table, known = Recommender.load(_current(artifacts)).for_raw_users(
        pl.Series(["nobody-at-all"]), 7
    )
    assert known == 0
    assert table["item_id"].to_list() == [item["item_id"] for item in http["items"]]
    assert table["rank"].to_list() == list(range(1, 8))


def test_slow_or_silent_clients_are_disconnected(artifacts):
    """Connections that send no request, or never finish its headers, were held forever;
    they are closed after RECSYS_HEADER_TIMEOUT_SECONDS, and normal requests still work."""
    import socket
    import time

    import httpx

    from recsys.processes import served

    with served(artifacts, env={"RECSYS_HEADER_TIMEOUT_SECONDS": "1"}) as base:
        port = int(base.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: incomplete
        time.sleep(2.5)
        for sock in (silent, slow):
            sock.settimeout(5)
            assert sock.recv(1024) == b""  # closed by the server
            sock.close()
        with httpx.Client(base_url=base) as client:
            assert client.get("/healthz").status_code == 200
            time.sleep(1.5)  # a kept-alive connection idles under uvicorn's own timeout
            assert client.get("/healthz").status_code == 200


def _embedding_column(version: Path, side: str) -> np.ndarray:
    column = pl.read_parquet(version / "embeddings" / f"{side}.parquet")["embedding"]
    return np.stack(column.to_list()).astype(np.float32)


def test_workers_map_the_embedding_matrices_and_share_their_pages(artifacts):
    """Each worker read both embedding tables into its own memory: at 1M users x 1M items
    that was most of its 839 MiB; a mapped matrix's pages are the page cache's, shared."""
    from serving.recommender import Recommender

    version = _current(artifacts)
    rec = Recommender.load(version)
    for side, emb in (("users", rec.user_emb), ("items", rec.item_emb)):
        assert isinstance(emb, np.memmap) and not emb.flags.writeable, side
        np.testing.assert_array_equal(emb, _embedding_column(version, side))


def test_a_version_built_before_the_matrices_loads_its_parquet_embeddings(own_artifacts):
    from serving.recommender import Recommender

    version = _current(own_artifacts)
    for side in ("users", "items"):
        (version / "embeddings" / f"{side}.npy").unlink()
    _reseal(version)
    rec = Recommender.load(version)
    assert not isinstance(rec.item_emb, np.memmap)
    np.testing.assert_array_equal(rec.item_emb, _embedding_column(version, "items"))


@pytest.mark.parametrize("damage", ["rows missing", "not a matrix file"])
def test_a_matrix_that_does_not_fit_its_ids_is_refused_in_one_line(own_artifacts, damage):
    from serving.recommender import Recommender

    version = _current(own_artifacts)
    matrix = version / "embeddings" / "items.npy"
    if damage == "rows missing":
        np.save(matrix, np.load(matrix)[:-1])
    else:
        matrix.write_bytes(b"not a matrix")
    _reseal(version)
    with pytest.raises(ArtifactError, match=r"items\.npy") as info:
        Recommender.load(version)
    assert "\n" not in str(info.value)
