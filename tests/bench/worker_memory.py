"""Memory of each `recsys serve` worker after it has answered both kinds of request (a
known user, and a history through the user tower): resident and unique set sizes.
`make bench ONLY=worker-memory` measures the MovieLens-100K version and (full run) the
1M-user x 1M-item one; by hand for any artifacts:
`PYTHONPATH=tests .venv/bin/python -m bench.worker_memory ARTIFACTS [--workers N]`."""

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.report import markdown_table, save
from recsys.processes import served

TARGET_MB = 300  # per worker on a small catalogue (issue 16)


def measure(artifacts: Path, workers: int = 2) -> list[tuple[int, float, float]]:
    """(pid, RSS MiB, USS MiB) of each worker."""
    with served(artifacts, workers=workers, env={"REDIS_URL": ""}) as base:
        body = json.dumps({"history": [0, 1, 2], "k": 10}).encode()
        for _ in range(10 * workers):  # connections spread over the workers
            urllib.request.urlopen(f"{base}/v1/users/0/recommendations").read()
            request = urllib.request.Request(
                f"{base}/v1/recommendations",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request).read()
        time.sleep(1)
        rows = []
        for child in psutil.Process().children(recursive=True):
            if "spawn_main" not in " ".join(child.cmdline()):
                continue  # the server's parent and multiprocessing's resource tracker
            info = child.memory_full_info()
            rows.append((child.pid, info.rss / 2**20, info.uss / 2**20))
        return rows


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.build import huge_version
    from bench.serving import movielens_version

    versions = [("MovieLens-100K", movielens_version(work))]
    if not quick:
        versions.append(("synthetic, 1M users x 1M items", huge_version(work)))
    results = []
    for label, artifacts in versions:
        rows = measure(artifacts)
        results.append(
            {
                "version": label,
                "rss": max(r for _, r, _ in rows),
                "uss": max(u for _, _, u in rows),
                "workers": len(rows),
            }
        )
    table = markdown_table(
        ["version", "workers", "RSS MiB (largest worker)", "USS MiB (largest worker)"],
        [[r["version"], r["workers"], f"{r['rss']:.0f}", f"{r['uss']:.0f}"] for r in results],
    )
    notes = (
        "`recsys serve --workers 2` without Redis, after each worker answered a known user "
        "and a history request (the user tower). RSS counts pages shared with the other "
        "worker (the mmap'd index and weights, libraries); USS only the worker's own. "
        f"Target: at most {TARGET_MB} MiB per worker on a small catalogue."
    )
    save("worker_memory", "Worker memory (`make bench ONLY=worker-memory`)", table, notes)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for pid, rss, uss in measure(args.artifacts, args.workers):
        print(f"worker {pid}: RSS {rss:.0f} MiB, USS {uss:.0f} MiB")


if __name__ == "__main__":
    main()
