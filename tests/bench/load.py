"""The open-loop load client of the serving and soak benchmarks: requests leave at a fixed
rate whatever the answers do (a closed-loop client slows down with the server and hides its
queueing), and each is counted in the window in which it was sent."""

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import numpy as np

Request = tuple[str, dict[str, int | str]]  # path, query parameters


async def timed_get(
    session: aiohttp.ClientSession,
    path: str,
    params: dict[str, int | str],
    scheduled: float | None = None,
) -> tuple[int, float]:
    """(status, milliseconds); status 0 when the request failed at the transport level.

    With `scheduled` (a `time.perf_counter()` instant), the time counts from when the
    request was due, not from when it was sent: a client that falls behind its schedule
    (a busy event loop, a GC pause) cannot hide the server's queueing that way (no
    coordinated omission).

    A pooled keep-alive connection that the server closed as it went idle fails the next
    request on it before anything was sent to the application: such a request is retried
    once on a fresh connection (as browsers and HTTP clients do for idempotent requests);
    a second failure counts."""
    started = time.perf_counter() if scheduled is None else scheduled
    for attempt in range(2):
        try:
            async with session.get(path, params=params) as response:
                await response.read()
                return response.status, (time.perf_counter() - started) * 1000
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == 1:
                break
        except (aiohttp.ClientError, TimeoutError):
            break
    return 0, (time.perf_counter() - started) * 1000


def recommendation_requests(
    users: tuple[int, int], ks: list[int], seed: int = 0
) -> Iterator[Request]:
    """Endless GETs for a random known user (IDs `users[0]`..`users[1]`) and a random k."""
    rng = np.random.default_rng(seed)
    while True:
        user = int(rng.integers(users[0], users[1] + 1))
        yield f"/v1/users/{user}/recommendations", {"k": int(rng.choice(ks))}


async def open_loop(
    base: str,
    requests: Iterator[Request],
    rate: int,
    seconds: int,
    window_seconds: int,
    sample: Callable[[], dict[str, Any]] | None = None,
    warmup_seconds: int = 0,
) -> list[dict[str, Any]]:
    """One row per window: requests, errors (non-200 or failed), p50/p99 ms, and whatever
    `sample()` returns when the window's last request has been sent. Requests of the
    first `warmup_seconds` (the client opening its connections) are sent but not counted."""
    # A full garbage collection of a process that has imported torch takes ~180 ms, during
    # which this client sends nothing and reads nothing: it would be counted as the
    # server's latency. Freezing what is alive now keeps the collections short.
    gc.collect()
    gc.freeze()
    try:
        return await _run(base, requests, rate, seconds, window_seconds, sample, warmup_seconds)
    finally:
        gc.unfreeze()


async def sent_at_rate(
    base: str, requests: Iterator[Request], rate: int, seconds: int
) -> list[tuple[float, int, float]]:
    """Every request of an open-loop run: (second it was due, status, ms)."""
    sent: list[tuple[float, int, float]] = []
    gc.collect()
    gc.freeze()
    try:
        await _send(base, requests, rate, seconds, 0, sent, [], None, 1)
    finally:
        gc.unfreeze()
    return sent


async def _run(
    base: str,
    requests: Iterator[Request],
    rate: int,
    seconds: int,
    window_seconds: int,
    sample: Callable[[], dict[str, Any]] | None,
    warmup_seconds: int,
) -> list[dict[str, Any]]:
    sent: list[tuple[float, int, float]] = []  # (second it was due, status, ms)
    samples: list[dict[str, Any]] = []
    await _send(
        base, requests, rate, seconds, warmup_seconds, sent, samples, sample, window_seconds
    )
    return _windows(sent, samples, seconds, window_seconds)


async def _send(
    base: str,
    requests: Iterator[Request],
    rate: int,
    seconds: int,
    warmup_seconds: int,
    sent: list[tuple[float, int, float]],
    samples: list[dict[str, Any]],
    sample: Callable[[], dict[str, Any]] | None,
    window_seconds: int,
) -> None:
    # aiohttp, not httpx: at 200 requests/s httpx took a third of a core here, on the same
    # two cores as the service it measures; aiohttp needs a fraction of that.
    async with aiohttp.ClientSession(
        base_url=base,
        timeout=aiohttp.ClientTimeout(total=10),
        connector=aiohttp.TCPConnector(limit=64),
    ) as session:

        async def one(due: float, path: str, params: dict[str, int | str]) -> None:
            status, ms = await timed_get(session, path, params, scheduled=start + due)
            sent.append((due, status, ms))

        tasks = []
        per_window = rate * window_seconds
        start = time.perf_counter() + warmup_seconds
        for n in range(-rate * warmup_seconds, rate * seconds):
            due = n / rate
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            path, params = next(requests)
            tasks.append(asyncio.create_task(one(due, path, params)))
            if sample is not None and n >= 0 and (n + 1) % per_window == 0:
                samples.append(sample())
        await asyncio.gather(*tasks)


def _windows(
    sent: list[tuple[float, int, float]],
    samples: list[dict[str, Any]],
    seconds: int,
    window_seconds: int,
) -> list[dict[str, Any]]:
    windows = []
    for w in range(-(-seconds // window_seconds)):
        rows = [
            (status, ms) for due, status, ms in sent if due >= 0 and int(due // window_seconds) == w
        ]
        latencies = np.array([ms for _, ms in rows])
        windows.append(
            {
                "t_s": min((w + 1) * window_seconds, seconds),
                "requests": len(rows),
                "errors": sum(status != 200 for status, _ in rows),
                "p50_ms": float(np.percentile(latencies, 50)) if len(rows) else 0.0,
                "p99_ms": float(np.percentile(latencies, 99)) if len(rows) else 0.0,
                **(samples[w] if w < len(samples) else {}),
            }
        )
    return windows
