"""Freshness between builds (issue 15), against `recsys serve` with 2 workers and Redis:
how long an event takes to change its user's answer on every worker, how many events/s
`POST /v1/events` acknowledges (fsync included), what a fresh user's cache miss costs
(the user tower at request time) against a plain user's at a fixed rate, cache-hit
throughput for both, and filtered requests on the 1M-item catalogue (quick: MovieLens)."""

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import polars as pl

from bench.load import Request, sent_at_rate
from bench.report import markdown_table, save
from recsys.core.versions import VersionStore
from recsys.processes import served

RATE = 200  # requests/s of the fixed-rate cases
TRIALS = 100  # events timed to a changed answer
CONSECUTIVE = 4  # changed answers in a row (new connections each) = every worker has it


def _serving_copy(artifacts: Path, work: Path, name: str) -> Path:
    """Fresh artifacts (no events, no catalogue changes) serving the same version."""
    live = work / name
    if live.exists():
        shutil.rmtree(live)
    source = VersionStore(artifacts).current()
    store = VersionStore(live)
    store.versions.mkdir(parents=True)
    os.symlink(source, store.versions / source.name)
    store.promote(source.name)
    return live


def _ids(version: Path, column: str) -> list[Any]:
    return pl.read_parquet(version / "data" / "vocab" / f"{column}.parquet")["id"].to_list()


def _items_of(answer: dict[str, Any]) -> list[Any]:
    return [i["item_id"] for i in answer["items"]]


def event_to_answer(base: str, users: list[Any]) -> dict[str, float]:
    """Per trial: a user's top item is posted as seen; then new-connection GETs until the
    item is gone from the answer (first) and gone in CONSECUTIVE answers in a row (all)."""
    first, every = [], []
    with httpx.Client(base_url=base, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for user in users[:TRIALS]:
            url = f"/v1/users/{user}/recommendations?k=10"
            top = _items_of(client.get(url).json())[0]
            client.post("/v1/events", json={"events": [{"user_id": user, "item_id": top}]})
            acknowledged = time.perf_counter()
            row, seen_first = 0, None
            while row < CONSECUTIVE and time.perf_counter() - acknowledged < 5:
                changed = top not in _items_of(client.get(url).json())
                row = row + 1 if changed else 0
                if changed and seen_first is None:
                    seen_first = time.perf_counter() - acknowledged
            first.append((seen_first or 5.0) * 1000)
            every.append((time.perf_counter() - acknowledged) * 1000)
    return {
        "first_p50_ms": float(np.percentile(first, 50)),
        "first_p99_ms": float(np.percentile(first, 99)),
        "all_p50_ms": float(np.percentile(every, 50)),
        "all_p99_ms": float(np.percentile(every, 99)),
    }


async def _post_throughput(
    base: str, users: list[Any], items: list[Any], seconds: float, senders: int = 8
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    accepted = 0
    deadline = time.perf_counter() + seconds

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while time.perf_counter() < deadline:
            batch = [
                {"user_id": users[int(u)], "item_id": items[int(i)]}
                for u, i in zip(
                    rng.integers(0, len(users), 100), rng.integers(0, len(items), 100), strict=True
                )
            ]
            started = time.perf_counter()
            async with session.post("/v1/events", json={"events": batch}) as response:
                body = await response.json()
            latencies.append((time.perf_counter() - started) * 1000)
            accepted += int(body["accepted"])

    started = time.perf_counter()
    async with aiohttp.ClientSession(base_url=base) as session:
        await asyncio.gather(*(sender(session) for _ in range(senders)))
    elapsed = time.perf_counter() - started
    return {
        "events_per_s": accepted / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def _unique_misses(users: list[Any], filters: str = "") -> Iterator[Request]:
    """GETs that never repeat a (user, k) pair: every one a cache miss."""
    for k in range(10, 60):
        for user in users:
            params: dict[str, Any] = {"k": k}
            if filters:
                params["category"] = filters
            yield f"/v1/users/{user}/recommendations", params


def _fixed_rate(base: str, requests: Iterator[Request], seconds: int) -> dict[str, float]:
    sent = asyncio.run(sent_at_rate(base, requests, RATE, seconds))
    latencies = np.array([ms for _, _, ms in sent])
    return {
        "requests": float(len(sent)),
        "errors": float(sum(status != 200 for _, status, _ in sent)),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def _tower_microseconds(version: Path, users: list[int]) -> dict[str, float]:
    """The user tower alone, in this process, on each user's history plus 3 new items."""
    from serving.state import VersionState

    state = VersionState.load(version)
    rng = np.random.default_rng(1)
    times = []
    for user in users:
        index = state.user_index(user)
        if index is None:
            continue
        past, _ = state.history(index)
        history = [*past.tolist(), *rng.integers(0, len(state.items), 3).tolist()]
        started = time.perf_counter()
        state.embed_history(index, history)
        times.append((time.perf_counter() - started) * 1e6)
    return {"p50_us": float(np.percentile(times, 50)), "p99_us": float(np.percentile(times, 99))}


def _five_percent_in_process(version: Path, users: int = 300) -> dict[str, float]:
    """A random 5% of the items allowed (no category structure to lean on), searched in
    this process as a worker does: the service's filter path without HTTP."""
    from serving.state import VersionState

    state = VersionState.load(version)
    rec = state.recommender
    rng = np.random.default_rng(2)
    allowed = np.zeros(len(rec.item_emb), dtype=bool)
    allowed[rng.choice(len(allowed), len(allowed) // 20, replace=False)] = True
    times = []
    for user in rng.integers(0, len(rec.user_ids), users).tolist():
        started = time.perf_counter()
        found, _ = rec.for_vector(rec.user_emb[user], state.seen(user), 10, None, allowed)
        times.append((time.perf_counter() - started) * 1000)
        assert len(found) == 10 and allowed[found].all()
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def _hits(base: str, path: str, seconds: int) -> float:
    from bench.serving import _wrk

    httpx.get(base + path)  # now cached
    return _wrk(base + path, None, 16, seconds)["rps"]


def _filter_share(version: Path, column: str, value: str) -> float:
    items = pl.read_parquet(version / "data" / "items.parquet")
    return float(items[column].list.contains(value).mean())  # type: ignore[arg-type]


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.build import huge_version
    from bench.serving import movielens_version

    seconds = 10 if quick else 20
    movielens = movielens_version(work)
    version = VersionStore(movielens).current()
    users, items = _ids(version, "user_id"), _ids(version, "item_id")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(users))
    fresh_users = [users[i] for i in order[: len(users) // 2]]
    plain_users = [users[i] for i in order[len(users) // 2 :]]
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    results: dict[str, Any] = {}
    live = _serving_copy(movielens, work, "freshness-ml-100k")
    with served(live, env=env, workers=2) as base:
        results["event_to_answer"] = event_to_answer(base, plain_users[::-1])
        for start in range(0, len(fresh_users), 100):  # 3 events each for half the users
            batch = [
                {"user_id": u, "item_id": items[int(i)]}
                for u in fresh_users[start : start + 100]
                for i in rng.integers(0, len(items), 3)
            ]
            httpx.post(f"{base}/v1/events", json={"events": batch})
        time.sleep(1.0)
        results["fresh_misses"] = _fixed_rate(base, _unique_misses(fresh_users), seconds)
        results["plain_misses"] = _fixed_rate(base, _unique_misses(plain_users[:300]), seconds)
        results["fresh_hits_rps"] = _hits(base, f"/v1/users/{fresh_users[0]}/recommendations", 10)
        results["plain_hits_rps"] = _hits(base, f"/v1/users/{plain_users[0]}/recommendations", 10)
        results["post"] = asyncio.run(_post_throughput(base, users, items, seconds))
    results["tower"] = _tower_microseconds(version, fresh_users[:500])
    catalogue = movielens if quick else huge_version(work)
    filtered = VersionStore(catalogue).current()
    column, value = ("genres", "Comedy") if quick else ("genres", "genre-00")
    results["filter_share"] = _filter_share(filtered, column, value)
    results["filter_items"] = len(_ids(filtered, "item_id"))
    results["five_percent"] = _five_percent_in_process(filtered)
    live = _serving_copy(catalogue, work, "freshness-filters")
    filter_users = _ids(filtered, "user_id")[:5000]
    with served(live, env=env, workers=2) as base:
        requests = _unique_misses(filter_users, f"{column}:{value}")
        results["filtered"] = _fixed_rate(base, requests, seconds)
        results["unfiltered"] = _fixed_rate(base, _unique_misses(filter_users[::-1]), seconds)
    _report(results, quick)
    return [results]


def _report(r: dict[str, Any], quick: bool) -> None:
    e, post, fm, pm = r["event_to_answer"], r["post"], r["fresh_misses"], r["plain_misses"]
    hit_ratio = r["fresh_hits_rps"] / r["plain_hits_rps"]
    catalogue = "MovieLens-100K" if quick else "synthetic, 1M items"
    rows = [
        [
            "event to changed answer, first answer",
            f"p50 {e['first_p50_ms']:.0f} ms",
            f"p99 {e['first_p99_ms']:.0f} ms",
            "-",
        ],
        [
            f"event to changed answer, {CONSECUTIVE} in a row (every worker)",
            f"p50 {e['all_p50_ms']:.0f} ms",
            f"p99 **{e['all_p99_ms']:.0f} ms**",
            "p99 ≤ 1,000 ms",
        ],
        [
            "POST /v1/events, batches of 100, 8 senders",
            f"**{post['events_per_s']:,.0f} events/s**",
            f"p99 {post['p99_ms']:.1f} ms per batch",
            "≥ 2,000 events/s",
        ],
        [
            f"fresh users, cache misses at {RATE}/s (tower at request time)",
            f"p50 {fm['p50_ms']:.1f} ms",
            f"p99 **{fm['p99_ms']:.1f} ms**",
            "p99 ≤ 15 ms",
        ],
        [
            f"users without events, cache misses at {RATE}/s",
            f"p50 {pm['p50_ms']:.1f} ms",
            f"p99 {pm['p99_ms']:.1f} ms",
            "-",
        ],
        [
            "cache hits, fresh user / user without events (wrk, 16 connections)",
            f"{r['fresh_hits_rps']:,.0f} / {r['plain_hits_rps']:,.0f} requests/s",
            f"**{hit_ratio:.2f}x**",
            "≥ 0.90x",
        ],
        [
            "user tower alone (in process, history + 3 events)",
            f"p50 {r['tower']['p50_us']:.0f} µs",
            f"p99 {r['tower']['p99_us']:.0f} µs",
            "-",
        ],
        [
            f"filtered misses at {RATE}/s ({catalogue}, "
            f"{r['filter_share']:.1%} of {r['filter_items']:,} items qualify)",
            f"p50 {r['filtered']['p50_ms']:.1f} ms",
            f"p99 **{r['filtered']['p99_ms']:.1f} ms**",
            "p99 ≤ 20 ms",
        ],
        [
            "a random 5% of the items allowed, one search in process (same catalogue)",
            f"p50 {r['five_percent']['p50_ms']:.1f} ms",
            f"p99 {r['five_percent']['p99_ms']:.1f} ms",
            "-",
        ],
        [
            f"the same users unfiltered at {RATE}/s",
            f"p50 {r['unfiltered']['p50_ms']:.1f} ms",
            f"p99 {r['unfiltered']['p99_ms']:.1f} ms",
            "-",
        ],
    ]
    errors = sum(
        int(r[k]["errors"]) for k in ("fresh_misses", "plain_misses", "filtered", "unfiltered")
    )
    notes = (
        "2 workers and Redis on the 2 cores of the bench machine, the load client beside "
        "them; fixed-rate latency from each request's scheduled send time. The freshness "
        "rows serve MovieLens-100K. A fresh user's state lives in each worker's memory, "
        "read from the event files, so a fresh answer costs no extra Redis round trip. "
        f"Errors: {errors}."
    )
    save(
        "freshness",
        "Freshness between builds (`make bench ONLY=freshness`)",
        markdown_table(["case", "measured", "", "target"], rows),
        notes,
    )
