"""Several serving hosts on one bucket (a real S3 API, moto's server mode; GCS through
fake-gcs-server for the round trip), each with its
own cache directory: builds publish through the `recsys` command, every host follows the
pointer (a promotion and a rollback), answers carry their version, and a host told to stop
drains first."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import S3Server, recsys

from data.synthetic import SyntheticConfig, generate
from recsys.core.remote import RemoteVersions
from recsys.processes import free_port, served, wait_ready

POLL = {"RECSYS_RELOAD_POLL_SECONDS": "0.2"}
BUILD = ("--epochs", "1", "--no-progress")


def build(bucket: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return recsys(
        "build", "--artifacts", bucket, "--cache-dir", tmp_path / "builder", *BUILD, *extra
    )


def wait_for(condition, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.1)


def version_of(base: str) -> str | None:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).json().get("model_version")
    except httpx.HTTPError:
        return None


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    generate(tmp_path / "log", SyntheticConfig(rows=3_000, users=80, items=60, seed=4))
    return tmp_path / "log"


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> str:
    """A fresh bucket on S3 (moto) or GCS (fake-gcs-server)."""
    return str(request.getfixturevalue("gcs_bucket" if request.param == "gs" else "bucket"))


@pytest.mark.slow  # builds models and runs two services
def test_hosts_follow_promotions_and_rollbacks_on_object_storage(
    store: str, logs: Path, tmp_path: Path
) -> None:
    bucket = store
    first = build(bucket, tmp_path, "--data", logs)
    assert first.returncode == 0, first.stderr
    remote = RemoteVersions(bucket)
    v1 = remote.pointer().version
    assert v1 is not None and remote.visible() == [v1]
    # The read-only commands work on a local copy of the current version.
    reader = ("--artifacts", bucket, "--cache-dir", tmp_path / "reader")
    batch = recsys("recommend", *reader, "--out", tmp_path / "recs.parquet", "--k", "5")
    assert batch.returncode == 0, batch.stderr
    assert f"from version {v1}" in batch.stdout
    scored = recsys("evaluate", *reader)
    assert scored.returncode == 0, scored.stderr
    assert "recall@20" in scored.stdout
    with (
        served(bucket, env=POLL, cache_dir=tmp_path / "host-a") as host_a,
        served(bucket, env=POLL, cache_dir=tmp_path / "host-b", workers=2) as host_b,
    ):
        for base in (host_a, host_b):
            answer = httpx.get(f"{base}/v1/users/3/recommendations?k=5", timeout=30)
            assert answer.status_code == 200
            assert answer.headers["x-model-version"] == v1 == answer.json()["model_version"]
            assert version_of(base) == v1
        # A rebuild on the same bucket from another machine's cache: both hosts follow.
        second = build(bucket, tmp_path, "--no-gate")
        assert second.returncode == 0, second.stderr
        v2 = remote.pointer().version
        assert v2 not in (None, v1)
        for base in (host_a, host_b):
            wait_for(lambda b=base: version_of(b) == v2, f"{base} switching to {v2}")
        metrics = httpx.get(f"{host_b}/metrics", timeout=10).text
        assert f'recsys_model_version_info{{version="{v2}"}} 1.0' in metrics
        synced = re.search(r"^recsys_sync_versions_total (\S+)$", metrics, re.M)
        assert synced and float(synced.group(1)) >= 2  # the parent's sync counts there too
        assert (tmp_path / "host-a" / "versions" / v1).is_dir()  # kept for a rollback
        back = recsys("rollback", "--artifacts", bucket)
        assert back.returncode == 0, back.stderr
        assert f"{v2} -> {v1}" in back.stdout
        for base in (host_a, host_b):
            wait_for(lambda b=base: version_of(b) == v1, f"{base} rolling back to {v1}")


@pytest.mark.slow  # builds a model
def test_a_second_build_on_the_bucket_waits_for_the_lock_and_a_lost_race_is_clear(
    s3_server: S3Server, bucket: str, logs: Path, tmp_path: Path
) -> None:
    remote = RemoteVersions(bucket)
    with remote.build_lock():  # another host's build is running
        blocked = build(bucket, tmp_path, "--data", logs)
    assert blocked.returncode != 0
    assert "another build is running" in blocked.stderr
    assert "Traceback" not in blocked.stderr
    # A rollback lands between this build's start and its promotion: it loses, clearly.
    first = build(bucket, tmp_path, "--data", logs)
    assert first.returncode == 0, first.stderr
    v1 = remote.pointer().version
    path = "/" + bucket.removeprefix("s3://") + "/versions/"

    def meanwhile() -> None:  # when the new version's manifest goes up, move current
        s3_server.faults.clear()
        stored = remote.objects.get("current")
        assert stored is not None
        moved = json.dumps({"version": v1, "by": "a rollback"}).encode()
        remote.objects.put("current", moved, expected=stored.etag)

    s3_server.faults[("PUT", path)] = meanwhile
    lost = build(bucket, tmp_path, "--no-gate")
    assert lost.returncode != 0
    assert "is stored but not current" in lost.stderr, lost.stderr
    assert remote.pointer().version == v1
    assert len(remote.visible()) == 2


@pytest.mark.slow  # builds a model and runs the service
def test_sigterm_turns_readyz_to_503_and_answers_through_the_drain(
    s3_server: S3Server, bucket: str, logs: Path, tmp_path: Path
) -> None:
    assert build(bucket, tmp_path, "--data", logs).returncode == 0
    port = free_port()
    env = {**os.environ, **POLL, "RECSYS_DRAIN_SECONDS": "3"}
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", bucket]
    command += ["--cache-dir", str(tmp_path / "host"), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", process=process)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 503, "readyz turning 503")
        answer = httpx.get(f"{base}/v1/users/3/recommendations?k=5", timeout=10)
        assert answer.status_code == 200  # still answering during the drain
        assert process.wait(timeout=60) is not None
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow  # builds a model and runs the service
def test_a_host_started_while_the_bucket_is_unreachable_waits_and_then_serves(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from helpers import small_version

    from recsys.core.versions import VersionStore
    from training.config import TrainConfig

    built = small_version(
        tmp_path / "v",
        SyntheticConfig(rows=3_000, users=80, items=60, seed=4),
        TrainConfig(max_epochs=1),
    )
    remote = RemoteVersions(bucket)
    remote.upload(VersionStore(built).current())
    remote.promote(VersionStore(built).current_name() or "", remote.pointer())
    s3_server.faults[("GET", "/")] = 503  # the store answers nothing but errors
    port = free_port()
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", bucket]
    command += ["--cache-dir", str(tmp_path / "host"), "--port", str(port)]
    log = tmp_path / "host.log"
    process = subprocess.Popen(
        command, env={**os.environ, **POLL}, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: log.read_text().count("sync with") >= 3, "three failed tries")
        assert process.poll() is None  # waiting, not crashing (no restart loop)
        text = log.read_text()
        assert "keeping version none, next try in" in text
        assert "Traceback" not in text
        waits = [float(w) for w in re.findall(r"next try in (\d+) s", text)]
        assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off
        s3_server.faults.clear()
        wait_ready(f"http://127.0.0.1:{port}/readyz", process=process)
        assert version_of(f"http://127.0.0.1:{port}") == remote.pointer().version
    finally:
        process.kill()
        process.wait()
