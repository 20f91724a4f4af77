"""The service under load on loopback: wrk for throughput and latency of cache hits and
misses next to a bare FastAPI constant endpoint (the framework's ceiling), and a fixed-rate
client for cache-miss latency at 200 requests/s. Also Annoy against exact search."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from recsys.bench.load import timed_get
from recsys.bench.report import markdown_table, save
from recsys.processes import free_port, served, wait_ready
from recsys.versions import VersionStore

WRK_SECONDS = 10
WORKERS = 2  # one per core, for the service and the ceiling alike


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_LUA_MISS = """
math.randomseed(os.time())
request = function()
  local user = math.random(%d, %d)
  local k = math.random(1, 100)
  return wrk.format("GET", "/v1/users/" .. user .. "/recommendations?k=" .. k)
end
"""


def _wrk(url: str, script: str | None, connections: int, seconds: int) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        if script:
            handle.write(script)
            command += ["-s", handle.name]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)

    def latency(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", output)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": rps,
        "p50_ms": latency("50%"),
        "p99_ms": latency("99%"),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


async def _fixed_rate(
    base: str, users: tuple[int, int], rate: int, seconds: int
) -> dict[str, float]:
    """Open-loop load: one request every 1/rate s whatever the answers do; all misses."""
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(
        base_url=base, timeout=5, limits=httpx.Limits(max_connections=64)
    ) as client:

        async def one(user: int, k: int) -> None:
            nonlocal errors
            status, ms = await timed_get(client, f"/v1/users/{user}/recommendations", {"k": k})
            latencies.append(ms)
            errors += status != 200

        tasks = []
        start = time.perf_counter()
        for n in range(rate * seconds):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(
                    one(int(rng.integers(users[0], users[1] + 1)), int(rng.integers(1, 101)))
                )
            )
        await asyncio.gather(*tasks)
    values = np.array(latencies)
    return {
        "rps": rate,
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "errors": float(errors),
    }


def user_range(version: Path) -> tuple[int, int]:
    ids = pl.read_parquet(version / "data" / "vocab" / "user_id.parquet")["id"]
    return int(ids.min()), int(ids.max())  # type: ignore[arg-type]


def _ceiling(seconds: int) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "recsys.bench.ceiling_app:app"]
    options = ["--port", str(port), "--workers", str(WORKERS), "--log-level", "warning"]
    options += ["--http", "serving.protocol:NoDelayH11Protocol"]  # as `recsys serve` runs
    ceiling = _start([*command, *options], dict(os.environ))
    url = f"http://127.0.0.1:{port}/v1/users/1/recommendations"
    try:
        wait_ready(url)
        return {
            "version": "-",
            "case": "bare FastAPI constant (ceiling)",
            **_wrk(url, None, 16, seconds),
        }
    finally:
        ceiling.terminate()
        ceiling.wait()


def _service_rows(label: str, artifacts: Path, seconds: int) -> list[dict[str, Any]]:
    low, high = user_range(VersionStore(artifacts).current())
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    rows = []
    with served(artifacts, env=env, workers=WORKERS) as base:
        hit_url = f"{base}/v1/users/{low}/recommendations?k=10"
        httpx.get(hit_url, timeout=30)
        rows.append({"case": "cache hits (Redis)", **_wrk(hit_url, None, 16, seconds)})
        miss = _LUA_MISS % (low, high)
        _wrk(f"{base}/", miss, 16, 3)  # warm-up, not reported: page in the mmap'd index
        rows.append(
            {
                "case": "cache misses (random user and k), closed loop",
                **_wrk(f"{base}/", miss, 16, seconds),
            }
        )
        rows.append(
            {
                "case": "cache misses at a fixed 200 requests/s",
                **asyncio.run(_fixed_rate(base, (low, high), 200, seconds)),
            }
        )
    return [{"version": label, **row} for row in rows]


def movielens_version(work: Path) -> Path:
    """Artifacts with a MovieLens-100K version (built on first use)."""
    from data import movielens
    from features.sources import resolve_source
    from recsys.pipeline import build
    from recsys.settings import Settings

    artifacts = work / "serving-ml-100k"
    if VersionStore(artifacts).current_name() is None:
        build(resolve_source(movielens.fetch(Settings().datasets_dir)), artifacts, progress=False)
    return artifacts


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is needed for the serving benchmark: apt-get install wrk")
    from recsys.bench.build import huge_version

    movielens_artifacts = movielens_version(work)
    seconds = 5 if quick else WRK_SECONDS
    results = [_ceiling(seconds)]
    results += _service_rows("MovieLens-100K", movielens_artifacts, seconds)
    if not quick:
        results += _service_rows("synthetic, 1M items", huge_version(work), seconds)
    ceiling_rps = float(results[0]["rps"])
    rows = [
        [
            r["version"],
            r["case"],
            f"{r['rps']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{float(r['errors']):.0f}",
            f"{float(r['rps']) / ceiling_rps:.0%}",
        ]
        for r in results
    ]
    notes = (
        f"{WORKERS} uvicorn workers (service and ceiling), Redis on loopback, wrk -t1 -c16 "
        f"for {seconds} s per row "
        "(closed loop), and an asyncio client sending 200 requests/s (open loop) for the "
        "fixed-rate rows; every miss is a random user with a random k in 1-100 (hits: one "
        "user, k = 10). Targets: "
        "cache-hit throughput >= 50% of the ceiling; cache-miss p99 <= 20 ms at 200 requests/s."
    )
    headers = ["version", "case", "requests/s", "p50 ms", "p99 ms", "errors", "of ceiling"]
    save(
        "serving",
        "HTTP service under load (2 cores, loopback)",
        markdown_table(headers, rows),
        notes,
    )
    print(json.dumps(results))
    return results
