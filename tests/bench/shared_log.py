"""One event log for several hosts (RECSYS_EVENT_LOG_URL, a Redis stream on a redis-server
with appendfsync always): how many events/s `POST /v1/events` acknowledges through it, and
how long an event posted to host A takes to change that user's answer on host B while
200 other events/s are posted to A; the same figures for one host with its own segment
files beside them. Both modes use the MovieLens-100K version (the log, not the catalogue,
is measured)."""

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from bench.freshness import TRIALS, _ids, _items_of, _post_throughput, _serving_copy
from bench.report import markdown_table, save
from recsys.core.versions import VersionStore
from recsys.processes import free_port, served

BACKGROUND_RATE = 200  # events/s posted to host A while the trials run


def _durable_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    port = free_port()
    directory = work / "shared-log-redis"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    binary = shutil.which("redis-server") or "redis-server"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--dir", str(directory), "--appendonly", "yes", "--appendfsync", "always"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def _background(base: str, users: list[Any], items: list[Any], stop: threading.Event) -> int:
    """Single events posted at BACKGROUND_RATE until `stop`; how many were acknowledged."""
    rng = np.random.default_rng(3)
    accepted = 0

    async def run() -> None:
        nonlocal accepted
        async with aiohttp.ClientSession(base_url=base) as session:
            started = time.perf_counter()
            sent = 0
            pending: set[asyncio.Task[None]] = set()

            async def post() -> None:
                nonlocal accepted
                row = {
                    "user_id": users[int(rng.integers(len(users)))],
                    "item_id": items[int(rng.integers(len(items)))],
                }
                async with session.post("/v1/events", json={"events": [row]}) as response:
                    accepted += response.status == 202

            while not stop.is_set():
                due = started + sent / BACKGROUND_RATE
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                task = asyncio.create_task(post())
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.gather(*pending)

    asyncio.run(run())
    return accepted


def _across(host_a: str, host_b: str, users: list[Any]) -> list[float]:
    """Per trial: a user's top item on B is posted to A as seen; milliseconds from A's
    acknowledgement until B's answer no longer holds it."""
    waits = []
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=host_a) as a, httpx.Client(base_url=host_b, limits=fresh) as b:
        for user in users[:TRIALS]:
            url = f"/v1/users/{user}/recommendations?k=10"
            top = _items_of(b.get(url).json())[0]
            sent = time.perf_counter()
            answer = a.post("/v1/events", json={"events": [{"user_id": user, "item_id": top}]})
            assert answer.status_code == 202, answer.text
            while top in _items_of(b.get(url).json()):
                if time.perf_counter() - sent > 10:
                    break
            waits.append((time.perf_counter() - sent) * 1000)
    return waits


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.serving import movielens_version

    artifacts = movielens_version(work)
    version = VersionStore(artifacts).current()
    users, items = _ids(version, "user_id"), _ids(version, "item_id")
    seconds = 5 if quick else 15
    redis_process, url = _durable_redis(work)
    results: list[dict[str, Any]] = []
    try:
        local = _serving_copy(artifacts, work, "shared-log-local")
        with served(local, workers=2) as base:
            posted = asyncio.run(_post_throughput(base, users, items, seconds))
            results.append({"case": "one host, its own segment files (2 workers)", **posted})
        env = {"RECSYS_EVENT_LOG_URL": url, "RECSYS_EVENT_LOG_STREAM": "bench:events"}
        copies = [_serving_copy(artifacts, work, f"shared-log-host-{n}") for n in range(2)]
        with served(copies[0], env=env) as host_a, served(copies[1], env=env) as host_b:
            posted = asyncio.run(_post_throughput(host_a, users, items, seconds))
            stop = threading.Event()
            counted: list[int] = []
            loader = threading.Thread(
                target=lambda: counted.append(_background(host_a, users, items, stop))
            )
            loader.start()
            began = time.perf_counter()
            waits = _across(host_a, host_b, users[len(users) // 2 :])
            stop.set()
            loader.join()
            background_rate = counted[0] / (time.perf_counter() - began)
            results.append(
                {
                    "case": "host A of two, shared log (1 worker each)",
                    **posted,
                    "across_p50_ms": float(np.percentile(waits, 50)),
                    "across_p99_ms": float(np.percentile(waits, 99)),
                    "across_max_ms": float(np.max(waits)),
                    "background_per_s": background_rate,
                }
            )
    finally:
        redis_process.terminate()
        redis_process.wait()
    rows = [
        [
            r["case"],
            f"{r['events_per_s']:,.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['across_p50_ms']:.0f} / {r['across_p99_ms']:.0f}" if "across_p50_ms" in r else "",
        ]
        for r in results
    ]
    shared = results[-1]
    notes = (
        f"Batches of 100 events from 8 concurrent senders for {seconds} s. The event on A to "
        f"a changed answer on B: {TRIALS} trials (a user's top item on B posted to A as seen, "
        "then B asked on new connections until the item is gone) while "
        f"{shared['background_per_s']:.0f} other events/s were posted to A; max "
        f"{shared['across_max_ms']:.0f} ms. Targets: p99 <= 1,000 ms at 200 events/s, "
        ">= 2,000 events/s acknowledged through the shared log."
    )
    save(
        "shared-log",
        "One event log for several hosts (`make bench ONLY=shared-log`)",
        markdown_table(
            [
                "case",
                "events/s acknowledged",
                "POST p50 ms",
                "POST p99 ms",
                "event on A -> answer on B, p50 / p99 ms",
            ],
            rows,
        ),
        notes,
    )
    return results
