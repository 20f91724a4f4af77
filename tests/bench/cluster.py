"""Cache hits through a Redis Cluster against one Redis node, in the same run: the
MovieLens-100K version served by 2 workers, its answers for 500 users cached by a first
pass, then wrk asks for them at random (every request a hit). The cluster is 3 masters
on this machine (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`),
the single node a fresh redis-server; each is measured twice, alternating."""

import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from helpers import cluster_ports, start_redis, start_redis_cluster

from bench.report import markdown_table, save
from bench.serving import WORKERS, _wrk, user_range
from recsys.core.versions import VersionStore
from recsys.processes import free_port, served

USERS = 500
ROUNDS = 3

_LUA_HITS = """
math.randomseed(os.time())
request = function()
  local user = math.random(%d, %d)
  return wrk.format("GET", "/v1/users/" .. user .. "/recommendations?k=10")
end
"""


def _measure(artifacts: Path, url: str, users: tuple[int, int], seconds: int) -> dict[str, float]:
    with served(artifacts, env={"REDIS_URL": url}, workers=WORKERS) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            for user in range(users[0], users[1] + 1):  # the first pass caches every answer
                client.get(f"/v1/users/{user}/recommendations?k=10").raise_for_status()
            again = client.get(f"/v1/users/{users[0]}/recommendations?k=10").json()
            assert again["cached"], "the second ask was not a hit"
        return _wrk(f"{base}/", _LUA_HITS % users, 16, seconds)


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.serving import movielens_version

    artifacts = movielens_version(work)
    low, _ = user_range(VersionStore(artifacts).current())
    users = (low, low + USERS - 1)
    seconds = 5 if quick else 10
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    single_port = free_port()
    single = start_redis(single_port, str(directory))
    ports = cluster_ports(3)
    nodes = start_redis_cluster(ports, str(directory))
    cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    measured: dict[str, list[dict[str, float]]] = {
        "one Redis node": [],
        "Redis Cluster, 3 masters": [],
    }
    try:
        for _ in range(ROUNDS):
            measured["one Redis node"].append(
                _measure(artifacts, f"redis://127.0.0.1:{single_port}/0", users, seconds)
            )
            measured["Redis Cluster, 3 masters"].append(
                _measure(artifacts, cluster_url, users, seconds)
            )
    finally:
        for process in [single, *nodes]:
            process.terminate()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    results: list[dict[str, Any]] = [
        {
            "case": case,
            "rps": float(np.mean([r["rps"] for r in runs])),
            "runs_rps": [r["rps"] for r in runs],
            "p50_ms": float(np.mean([r["p50_ms"] for r in runs])),
            "p99_ms": float(np.mean([r["p99_ms"] for r in runs])),
            "errors": float(sum(r["errors"] for r in runs)),
        }
        for case, runs in measured.items()
    ]
    ratio = results[1]["rps"] / results[0]["rps"]
    rows = [
        [
            r["case"],
            f"{r['rps']:,.0f}",
            " / ".join(f"{x:,.0f}" for x in r["runs_rps"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['errors']:.0f}",
        ]
        for r in results
    ]
    notes = (
        f"wrk, 16 connections, {seconds} s a run, {ROUNDS} runs each, alternating. The "
        f"cluster's hit throughput is {ratio:.1%} of one node's (target: within 10%)."
    )
    save(
        "cluster",
        "Cache hits through a Redis Cluster (`make bench ONLY=cluster`)",
        markdown_table(["cache", "hits/s (mean)", "runs", "p50 ms", "p99 ms", "non-2xx"], rows),
        notes,
    )
    print({"cluster_over_single": ratio}, flush=True)
    return results
