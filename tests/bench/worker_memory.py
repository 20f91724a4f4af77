"""Memory of each `recsys serve` worker after it has answered both kinds of request (a
known user, and a history through the user tower): resident and unique set sizes, by
hand: `PYTHONPATH=tests .venv/bin/python -m bench.worker_memory ARTIFACTS [--workers N]`."""

import argparse
import json
import time
import urllib.request
from pathlib import Path

import psutil

from recsys.processes import served


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for pid, rss, uss in measure(args.artifacts, args.workers):
        print(f"worker {pid}: RSS {rss:.0f} MiB, USS {uss:.0f} MiB")


if __name__ == "__main__":
    main()
