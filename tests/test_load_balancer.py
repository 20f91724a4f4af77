"""Two `recsys serve` hosts on one S3 bucket behind a real HAProxy that checks /readyz
(docs/deploy/haproxy.cfg): a version built and promoted under load, then one host stopped
under load, cost no failed request."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from helpers import S3Server, recsys

from data.synthetic import SyntheticConfig, generate
from recsys.core.remote import RemoteVersions
from recsys.processes import free_port, wait_ready

CONFIG = Path(__file__).parent.parent / "docs" / "deploy" / "haproxy.cfg"
HOST_ENV = {"RECSYS_RELOAD_POLL_SECONDS": "0.2", "RECSYS_DRAIN_SECONDS": "3"}


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.access(found, os.X_OK), "haproxy is not installed (make haproxy)"
    return found


def start_host(bucket: str, cache: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", bucket]
    command += ["--cache-dir", str(cache), "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, **HOST_ENV}, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz", process=process)
    return process, port


class Load:
    """Requests through the balancer from a thread until stopped; counts statuses."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: Counter[int | str] = Counter()
        self.versions: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            user = 0
            while not self.stop.is_set():
                user = (user + 1) % 80
                try:
                    answer = client.get(f"/v1/users/{user}/recommendations?k=5")
                    self.statuses[answer.status_code] += 1
                    self.versions[answer.headers.get("x-model-version", "?")] += 1
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
                time.sleep(0.01)


@pytest.mark.slow  # builds two models and runs two services and HAProxy
def test_promotion_and_a_stopped_host_under_load_lose_no_request(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    generate(tmp_path / "log", SyntheticConfig(rows=3_000, users=80, items=60, seed=4))
    builder = ("--cache-dir", tmp_path / "builder", "--epochs", "1", "--no-progress")
    first = recsys("build", "--artifacts", bucket, "--data", tmp_path / "log", *builder)
    assert first.returncode == 0, first.stderr
    hosts = [start_host(bucket, tmp_path / f"host-{n}") for n in range(2)]
    front = free_port()
    servers = "\n".join(
        f"    server h{n} 127.0.0.1:{port} check" for n, (_, port) in enumerate(hosts)
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.read_text().format(bind=f"127.0.0.1:{front}", servers=servers))
    balancer = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)])
    base = f"http://127.0.0.1:{front}"
    try:
        wait_ready(f"{base}/readyz", process=balancer)
        load = Load(base)
        load.thread.start()
        second = recsys("build", "--artifacts", bucket, "--no-gate", *builder)
        assert second.returncode == 0, second.stderr
        v2 = RemoteVersions(bucket).pointer().version
        assert v2 is not None
        for _, port in hosts:
            deadline = time.monotonic() + 120
            while httpx.get(f"http://127.0.0.1:{port}/readyz").json()["model_version"] != v2:
                assert time.monotonic() < deadline, f"host on {port} never switched to {v2}"
                time.sleep(0.1)
        served_before = sum(load.statuses.values())
        hosts[0][0].send_signal(signal.SIGTERM)  # drains, then exits
        hosts[0][0].wait(timeout=60)
        after_exit = sum(load.statuses.values())
        while sum(load.statuses.values()) < after_exit + 20:  # requests to the host left
            time.sleep(0.05)
        load.stop.set()
        load.thread.join()
        assert set(load.statuses) == {200}, load.statuses
        assert sum(load.statuses.values()) > served_before > 0
        assert load.versions[v2] > 0
    finally:
        balancer.terminate()
        balancer.wait()
        for process, _ in hosts:
            process.kill()
            process.wait()
