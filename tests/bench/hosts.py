"""Several hosts on object storage: three `recsys serve` hosts (one worker each, separate
cache directories) follow a bucket on a real S3 API (moto's server, its own process). A
copy of the version is uploaded and promoted; the table splits the time until each host
answers with it into waiting for the pointer poll, downloading, verifying, and the
worker's poll, load and warm-up. A fourth host then starts with an empty cache.
Full run: the 1M-user x 1M-item version; quick: MovieLens-100K."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from helpers import environment

from bench.report import markdown_table, save
from bench.swap import _copy_as_new_version
from recsys.core.remote import RemoteVersions
from recsys.core.versions import VersionStore
from recsys.processes import free_port, wait_ready

HOSTS = 3
POLL_SECONDS = "2.0"  # the service's default
DOWNLOADED = re.compile(
    r"version (\S+): ([\d.]+) MB downloaded in ([\d.]+) s, verified in ([\d.]+) s"
)


def _moto(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    binary = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    return process, env


class Host:
    def __init__(self, url: str, cache: Path, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = log
        command = [sys.executable, "-m", "recsys", "serve", "--artifacts", url]
        command += ["--cache-dir", str(cache), "--port", str(self.port)]
        self.handle = log.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env, "RECSYS_RELOAD_POLL_SECONDS": POLL_SECONDS},
            stdout=self.handle,
            stderr=self.handle,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def version(self) -> str | None:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=5).json().get("model_version")
        except (httpx.HTTPError, ValueError):
            return None

    def lines(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.handle.close()


def _follow(hosts: list[Host], name: str, promoted: float) -> list[dict[str, float]]:
    """Per host: seconds from the promotion until it noticed the pointer, until its copy
    was in place, and until /readyz named the version; plus its download and verify."""
    seen: list[dict[str, float]] = [{} for _ in hosts]
    deadline = time.monotonic() + 1800
    while not all("ready" in s for s in seen):
        assert time.monotonic() < deadline, "a host never switched"
        now = time.perf_counter() - promoted
        for host, stamps in zip(hosts, seen, strict=True):
            text = host.lines()
            if "noticed" not in stamps and f"downloading version {name}" in text:
                stamps["noticed"] = now
            if "in place" not in stamps and f"current is now version {name}" in text:
                stamps["in place"] = now
            if "ready" not in stamps and host.version() == name:
                stamps["ready"] = now
        time.sleep(0.02)
    for host, stamps in zip(hosts, seen, strict=True):
        match = [m for m in DOWNLOADED.finditer(host.lines()) if m.group(1) == name][-1]
        stamps.update(mb=float(match.group(2)), download=float(match.group(3)))
        stamps["verify"] = float(match.group(4))
    return seen


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.build import huge_version
    from bench.serving import movielens_version

    artifacts = movielens_version(work) if quick else huge_version(work)
    moto, env = _moto(work)
    hosts: list[Host] = []
    with environment(env):
        try:
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            url = "s3://bench/recsys"
            remote = RemoteVersions(url)
            store = VersionStore(artifacts)
            first = store.current_name()
            assert first is not None
            began = time.perf_counter()
            remote.upload(store.current())
            upload_s = time.perf_counter() - began
            remote.promote(first, remote.pointer())
            caches = work / "hosts"
            shutil.rmtree(caches, ignore_errors=True)
            caches.mkdir(parents=True)
            hosts = [Host(url, caches / f"h{n}", caches / f"h{n}.log", env) for n in range(HOSTS)]
            for host in hosts:
                wait_ready(f"{host.base}/readyz", timeout=1800, process=host.process)
            name = _copy_as_new_version(store)
            remote.upload(store.versions / name)
            promoted = time.perf_counter()
            remote.promote(name, remote.pointer())
            timings = _follow(hosts, name, promoted)
            fresh = Host(url, caches / "fresh", caches / "fresh.log", env)
            hosts.append(fresh)
            wait_ready(f"{fresh.base}/readyz", timeout=1800, process=fresh.process)
            fresh_s = time.perf_counter() - fresh.started
            fresh_match = [m for m in DOWNLOADED.finditer(fresh.lines()) if m.group(1) == name][-1]
        finally:
            for host in hosts:
                host.stop()
            moto.terminate()
            moto.wait()
    shutil.rmtree(store.versions / name, ignore_errors=True)
    rows = []
    for n, t in enumerate(timings):
        rows.append(
            [
                f"host {n + 1}",
                f"{t['noticed']:.1f}",
                f"{t['download']:.1f}",
                f"{t['verify']:.1f}",
                f"{t['ready'] - t['in place']:.1f}",
                f"{t['ready']:.1f}",
            ]
        )
    last = max(t["ready"] for t in timings)
    result = {
        "version_mb": timings[0]["mb"],
        "upload_s": upload_s,
        "last_host_s": last,
        "hosts": timings,
        "fresh_host_s": fresh_s,
        "fresh_download_s": float(fresh_match.group(3)),
        "fresh_verify_s": float(fresh_match.group(4)),
    }
    print(json.dumps(result), flush=True)
    what = "MovieLens-100K" if quick else "1M-user x 1M-item"
    notes = (
        f"The {what} version ({timings[0]['mb']:.0f} MB) on moto's S3 server, {HOSTS} hosts "
        f"of 1 worker each on this machine, pointer and worker polls every {POLL_SECONDS} s "
        f"(the default). Upload by the build: {upload_s:.1f} s. Promotion to the last host "
        f"answering with the new version: **{last:.1f} s**. A fresh host with an empty cache "
        f"directory: ready {fresh_s:.1f} s after its start (download "
        f"{float(fresh_match.group(3)):.1f} s, verify {float(fresh_match.group(4)):.1f} s, the "
        "rest loading and warming)."
    )
    save(
        "hosts",
        "Promotion to several hosts on S3 (`make bench ONLY=hosts`)",
        markdown_table(
            [
                "host",
                "pointer noticed s",
                "download s",
                "verify s",
                "worker poll + load + warm s",
                "answering s",
            ],
            rows,
        ),
        notes,
    )
    return [result]
