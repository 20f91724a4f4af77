"""Promotion under load: `recsys serve` (2 workers, Redis) answers a fixed request rate for
the 1M-user x 1M-item version (quick: MovieLens-100K) while a new version is promoted;
latency of the requests sent in the switch window (from the promotion until both workers
answer with the new version, plus a second) against the rest of the run."""

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import recommendation_requests, sent_at_rate
from bench.report import markdown_table, save
from recsys.core.artifacts import read_manifest
from recsys.core.versions import VersionStore
from recsys.processes import served

RATE = 200  # requests/s
SECONDS = 40
PROMOTE_AT = 10.0  # seconds into the run


def _copy_as_new_version(store: VersionStore) -> str:
    """The current version again under a new name (checksums recomputed): a promotion
    that costs the workers a full load, as a nightly one does."""
    source = store.current()
    name, staging = store.stage()
    staging.rmdir()
    shutil.copytree(source, staging)
    manifest = read_manifest(source, verify=False)
    manifest.pop("checksums", None)
    store.commit(name, staging, manifest)
    return name


def _switch_window(base: str, name: str, started: float, out: dict[str, float]) -> None:
    """When every worker answers with `name` (seen 20 times in a row), in run seconds."""
    in_a_row = 0
    with httpx.Client(base_url=base, timeout=5) as client:
        while in_a_row < 20:
            version = client.get("/readyz").json().get("model_version")
            in_a_row = in_a_row + 1 if version == name else 0
            time.sleep(0.02)
    out["switched"] = time.perf_counter() - started


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.build import huge_version
    from bench.serving import movielens_version, user_range

    artifacts = movielens_version(work) if quick else huge_version(work)
    live = work / "swap-artifacts"
    if live.exists():
        shutil.rmtree(live)
    store = VersionStore(artifacts)
    live_store = VersionStore(live)
    live_store.versions.mkdir(parents=True)
    os.symlink(store.current(), live_store.versions / store.current().name)
    live_store.promote(store.current().name)
    users = user_range(store.current())
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    timeline: dict[str, float] = {}
    with served(live, env=env, workers=2) as base:
        name = _copy_as_new_version(live_store)

        def promote() -> None:
            time.sleep(PROMOTE_AT)
            timeline["promoted"] = time.perf_counter() - started
            live_store.promote(name)
            _switch_window(base, name, started, timeline)

        started = time.perf_counter()
        thread = threading.Thread(target=promote)
        thread.start()
        requests = recommendation_requests(users, [10])
        sent = asyncio.run(sent_at_rate(base, requests, RATE, SECONDS))
        thread.join()
    window = (timeline["promoted"], timeline["switched"] + 1.0)
    inside = np.array([ms for due, _, ms in sent if window[0] <= due < window[1]])
    outside = np.array([ms for due, _, ms in sent if not window[0] <= due < window[1]])
    errors = sum(status != 200 for _, status, _ in sent)
    results = [
        {
            "part": part,
            "requests": len(values),
            "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max()),
        }
        for part, values in (("switch window", inside), ("rest of the run", outside))
    ]
    print(json.dumps({"window_s": window, "errors": errors, "results": results}), flush=True)
    rows = [
        [
            r["part"],
            f"{r['requests']:,}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}",
        ]
        for r in results
    ]
    notes = (
        f"{RATE} requests/s for {SECONDS} s (known users at random, k = 10, mostly cache "
        f"misses) against 2 workers serving the 1M-user x 1M-item version; a copy of it "
        f"promoted at {window[0]:.1f} s, both workers on it by {window[1] - 1:.1f} s; "
        f"errors: {errors}. Target: switch-window p99 under 50 ms."
    )
    save(
        "swap",
        "Promotion under load (`make bench ONLY=swap`)",
        markdown_table(["part", "requests", "p50 ms", "p99 ms", "max ms"], rows),
        notes,
    )
    return results
