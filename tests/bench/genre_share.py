"""Do posted events move a known user towards what they just did? MovieLens-100K, a
default build, `recsys serve` with 2 workers: for a user, a genre with no item in their
top 20; 10 events of that genre's most popular items posted; then new-connection GETs
until every worker answers with the events (4 changed answers in a row), and the share of
that genre in the top 20 then. With the default mixing (`RECSYS_FRESH_HALF_EVENTS`) and
with it off (the events only appended to the history), on the log with timestamps and on
the same log without them (a set)."""

import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from bench.report import markdown_table, save
from recsys.core.versions import VersionStore
from recsys.processes import served

POSTED = 10
TOP = 20
CONSECUTIVE = 4  # changed answers in a row, new connections: every worker has the events


def default_version(work: Path, name: str, timestamps: bool) -> Path:
    """Artifacts with a default build of MovieLens-100K (built on first use)."""
    from data import movielens
    from features.sources import resolve_source
    from recsys.core.settings import Settings
    from recsys.pipeline import build

    artifacts = work / name
    if VersionStore(artifacts).current_name() is None:
        source = movielens.fetch(Settings().datasets_dir)
        data = work / f"{name}-data"
        data.mkdir(parents=True, exist_ok=True)
        log = pl.read_parquet(source / "interactions.parquet")
        (log if timestamps else log.drop("timestamp")).write_parquet(data / "interactions.parquet")
        for table in ("items", "users"):
            pl.read_parquet(source / f"{table}.parquet").write_parquet(data / f"{table}.parquet")
        build(resolve_source(data), artifacts, progress=False)
    return artifacts


def next_item_version(work: Path) -> tuple[Path, pl.DataFrame]:
    """A default build of MovieLens-100K before its 90% time quantile (built on first
    use), and the events after it."""
    from data import movielens
    from features.sources import resolve_source
    from recsys.core.settings import Settings
    from recsys.pipeline import build

    source = movielens.fetch(Settings().datasets_dir)
    log = pl.read_parquet(source / "interactions.parquet")
    cut = log["timestamp"].quantile(0.9)
    artifacts = work / "genre-share-next-item"
    if VersionStore(artifacts).current_name() is None:
        data = work / "genre-share-next-item-data"
        data.mkdir(parents=True, exist_ok=True)
        log.filter(pl.col("timestamp") <= cut).write_parquet(data / "interactions.parquet")
        for table in ("items", "users"):
            pl.read_parquet(source / f"{table}.parquet").write_parquet(data / f"{table}.parquet")
        build(resolve_source(data), artifacts, progress=False)
    return artifacts, log.filter(pl.col("timestamp") > cut)


def next_item(work: Path) -> list[list[str]]:
    """What the answer with posted events is worth for what the user does next: for users
    with at least 12 events after the build's log, the first 10 are posted (through the
    service's own functions) and the rest are the test, Recall@20 with a 95% bootstrap
    interval, for each way of answering."""
    from serving.answers import _fresh_query, fresh_search
    from serving.fresh import UserEvents
    from serving.state import VersionState

    artifacts, later = next_item_version(work)
    state = VersionState.load(VersionStore(artifacts).current())
    ways = [
        ("the user's vector (events ignored)", None, False),
        ("appended to the history only", 1e9, False),
        ("mixed, h = 5", 5.0, False),
        ("mixed, h = 5, room for the shared genre (default)", 5.0, True),
        ("mixed, h = 2", 2.0, False),
        ("mixed, h = 2, room for the shared genre", 2.0, True),
    ]
    found: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    ordered = later.sort(["user_id", "timestamp", "item_id"])
    for (raw,), events in ordered.group_by(["user_id"], maintain_order=True):
        items = events["item_id"].to_list()
        user = state.user_index(raw)
        if user is None or len(items) < POSTED + 2:
            continue
        posted, test = items[:POSTED], set(items[POSTED:])
        seen = state.seen(user)
        for name, half, focus in ways:
            if half is None:
                ids, _ = state.search(state.recommender.user_emb[user], seen, TOP, {})
            else:
                fresh = UserEvents([str(i) for i in posted], [1.0] * POSTED, POSTED)
                query, new = _fresh_query(state, user, fresh, half)
                exclude = np.unique(np.concatenate([seen, new]))
                ids, _ = (
                    fresh_search(state, query, new, exclude, TOP, {}, half)
                    if focus
                    else state.search(query, exclude, TOP, {})
                )
            top = set(state.item_ids(ids))
            found[name].append(len(test & top) / min(TOP, len(test)))
    rows = []
    for name, values in found.items():
        r = np.array(values)
        rng = np.random.default_rng(0)
        boot = [rng.choice(r, len(r)).mean() for _ in range(1000)]
        low, high = np.percentile(boot, [2.5, 97.5])
        rows.append([name, f"{r.mean():.4f}", f"[{low:.4f}, {high:.4f}]", str(len(r))])
    return rows


HEAVY_EVENTS = 100_000


def heavy_user(artifacts: Path, work: Path, seconds: int) -> list[list[str]]:
    """Other users' cached answers (fixed rate, from each request's scheduled send time)
    before and after 100,000 events were posted for one user, while that user keeps
    posting an event and asking for an answer (each a cache miss: the key carries the
    user's event count)."""
    import threading

    from bench.freshness import RATE, _fixed_rate, _serving_copy

    live = _serving_copy(artifacts, work, "genre-share-heavy")
    version = VersionStore(artifacts).current()
    users = pl.read_parquet(version / "data" / "vocab" / "user_id.parquet")["id"].to_list()
    items = pl.read_parquet(version / "data" / "vocab" / "item_id.parquet")["id"].to_list()
    others = [u for u in users if u != 1][:300]

    def cached() -> Any:  # every request a hit: the keys were asked once before
        while True:
            for user in others:
                yield f"/v1/users/{user}/recommendations", {"k": 10}

    rows = []
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    with served(live, env=env, workers=2) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            for user in others:
                client.get(f"/v1/users/{user}/recommendations", params={"k": 10})
            before = _fixed_rate(base, cached(), seconds)
            rng = np.random.default_rng(3)
            for _ in range(HEAVY_EVENTS // 1000):
                picks = rng.integers(0, len(items), 1000)
                events = [{"user_id": 1, "item_id": items[int(i)]} for i in picks]
                assert client.post("/v1/events", json={"events": events}).status_code == 202
        stop, misses = threading.Event(), []

        def heavy() -> None:  # each read follows a new event: a new key, a cache miss
            with httpx.Client(base_url=base, timeout=60) as client:
                while not stop.is_set():
                    item = items[int(rng.integers(0, len(items)))]
                    client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": item}]})
                    started = time.perf_counter()
                    client.get("/v1/users/1/recommendations", params={"k": 10})
                    misses.append((time.perf_counter() - started) * 1000)

        worker = threading.Thread(target=heavy, daemon=True)
        worker.start()
        after = _fixed_rate(base, cached(), seconds)
        stop.set()
        worker.join()
    for label, found in (("before", before), (f"after {HEAVY_EVENTS:,} events for user 1", after)):
        rows.append(
            [
                f"other users' cached answers at {RATE}/s, {label}",
                f"p50 {found['p50_ms']:.1f} ms",
                f"p99 {found['p99_ms']:.1f} ms",
                f"{int(found['errors'])} errors",
            ]
        )
    rows.append(
        [
            "user 1's answers meanwhile (each after a new event: a miss; one client in a loop)",
            f"p50 {np.percentile(misses, 50):.1f} ms",
            f"p99 {np.percentile(misses, 99):.1f} ms",
            f"{len(misses)} requests",
        ]
    )
    return rows


def _genres(artifacts: Path) -> tuple[dict[int, set[str]], dict[str, list[int]]]:
    """Each item's genres, and each genre's items from most to least popular."""
    version = VersionStore(artifacts).current()
    items = pl.read_parquet(version / "data" / "items.parquet")
    genres = items["genres"].to_list()
    of_item = {int(i): set(g or []) for i, g in zip(items["item_id"], genres, strict=True)}
    vocab = pl.read_parquet(version / "data" / "vocab" / "item_id.parquet")
    order = (
        pl.read_parquet(version / "data" / "interactions.parquet")
        .group_by("item_idx")
        .len()
        .join(vocab, left_on="item_idx", right_on="index")
        .sort(["len", "id"], descending=[True, False])["id"]
        .to_list()
    )
    by_genre: dict[str, list[int]] = {}
    for item in order:
        for genre in of_item.get(item, ()):
            by_genre.setdefault(genre, []).append(item)
    return of_item, by_genre


def _top(client: httpx.Client, user: int) -> list[int]:
    answer = client.get(f"/v1/users/{user}/recommendations", params={"k": TOP}).json()
    return [int(i["item_id"]) for i in answer["items"]]


def shares(artifacts: Path, users: list[int], half: float | None, work: Path) -> dict[str, float]:
    """Mean and user-1 share of the posted genre in the next top 20, and the time from the
    last 202 until every worker answered with the events (on a copy of the artifacts
    with no posted events, so that runs do not see each other's)."""
    from bench.freshness import _serving_copy

    of_item, by_genre = _genres(artifacts)
    artifacts = _serving_copy(artifacts, work, f"genre-share-{half}")
    env = {} if half is None else {"RECSYS_FRESH_HALF_EVENTS": str(half)}
    found, seconds = {}, []
    with served(artifacts, env=env, workers=2) as base:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=base, limits=limits, timeout=30) as client:
            for user in users:
                before = _top(client, user)
                held = set().union(*(of_item.get(i, set()) for i in before))
                genre = max(
                    (g for g in by_genre if g not in held and len(by_genre[g]) >= POSTED),
                    key=lambda g: len(by_genre[g]),
                    default=None,
                )
                if genre is None:
                    continue
                events = [{"user_id": user, "item_id": i} for i in by_genre[genre][:POSTED]]
                posted = client.post("/v1/events", json={"events": events})
                acknowledged = time.perf_counter()
                assert posted.status_code == 202, posted.text
                streak, after = 0, before
                while streak < CONSECUTIVE and time.perf_counter() - acknowledged < 10:
                    after = _top(client, user)
                    streak = streak + 1 if after != before else 0
                seconds.append(time.perf_counter() - acknowledged)
                found[user] = float(np.mean([genre in of_item.get(i, set()) for i in after]))
    return {
        "user_1": found.get(1, float("nan")),
        "mean": float(np.mean(list(found.values()))),
        "users": float(len(found)),
        "p99_s": float(np.percentile(seconds, 99)),
    }


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    users = [
        1,
        *sorted(int(u) for u in rng.choice(np.arange(2, 944), 9 if quick else 49, replace=False)),
    ]
    rows: list[dict[str, Any]] = []
    for name, timestamps in (("with timestamps", True), ("a set (no timestamps)", False)):
        artifacts = default_version(
            work, f"genre-share-{'time' if timestamps else 'set'}", timestamps
        )
        for label, half in (
            ("default: mixed, room for the shared genre", None),
            ("appended only", 1e6),
        ):
            found = shares(artifacts, users, half, work)
            rows.append({"log": name, "serving": label, **found})
    table = [
        [
            r["log"],
            r["serving"],
            f"{r['user_1']:.2f}",
            f"{r['mean']:.3f} ({int(r['users'])} users)",
            f"{r['p99_s'] * 1000:.0f} ms",
        ]
        for r in rows
    ]
    save(
        "genre_share",
        "Posted events and a known user's answer (`make bench ONLY=genre-share`)",
        markdown_table(
            ["log", "serving", "user 1: share", "mean share", "p99 to every worker"], table
        ),
        f"{POSTED} events of a genre absent from the user's top {TOP}, posted to `recsys "
        "serve --workers 2`; the genre's share of the next top 20 once every worker "
        "answers with them. Default builds of MovieLens-100K. Target: >= 0.2.",
    )
    save(
        "genre_share_heavy_user",
        "One user with 100,000 posted events (`make bench ONLY=genre-share`)",
        markdown_table(
            ["case", "p50", "p99", "note"],
            heavy_user(default_version(work, "genre-share-time", True), work, 10 if quick else 20),
        ),
        "MovieLens-100K default build with timestamps, `recsys serve --workers 2` and Redis.",
    )
    save(
        "genre_share_next_item",
        "What the answer with posted events is worth next (`make bench ONLY=genre-share`)",
        markdown_table(["answer", "Recall@20", "95% interval", "users"], next_item(work)),
        "MovieLens-100K, a default build of the events before the 90% time quantile; users "
        f"with {POSTED + 2}+ later events: the first {POSTED} posted, the rest the test.",
    )
    return rows


if __name__ == "__main__":
    import sys

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_results/work")
    for row in run("--quick" in sys.argv, work):
        print(row, flush=True)
