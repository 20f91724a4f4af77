"""Batch answers: `recsys recommend` in one process against `--engine ray` on a local Ray
of 1 and 2 CPUs, wall time of each command as a user runs it (Ray's start included), on
growing shares of a synthetic version's users: where Ray's overhead pays off on 2 cores.
Scale-out is what Ray buys on a cluster; here the figure is its cost."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from bench.build import _data, job
from bench.report import bar_chart, markdown_table, save
from data.synthetic import SyntheticConfig

QUICK = SyntheticConfig(rows=200_000, users=50_000, items=5_000, seed=3)
FULL = SyntheticConfig(rows=1_500_000, users=300_000, items=20_000, seed=3)
SHARES = (0.01, 0.1, 1.0)


def _version(work: Path, cfg: SyntheticConfig) -> Path:
    artifacts = work / f"ray-batch-{cfg.rows}-{cfg.n_users}-{cfg.n_items}"
    if not (artifacts / "current").exists():
        job(_data(work, cfg), artifacts, 1, "--no-refit")
    return artifacts


def _timed(*args: object) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "recsys", "recommend", *map(str, args)]
    subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    cfg = QUICK if quick else FULL
    artifacts = _version(work, cfg)
    users_file = artifacts / "current" / "embeddings" / "users.parquet"
    every = pl.read_parquet(users_file, columns=["user_id"])
    results = []
    for share in SHARES:
        users = every.head(max(1, int(every.height * share)))
        listed = work / f"ray-batch-users-{users.height}.parquet"
        users.write_parquet(listed)
        common = ("--artifacts", artifacts, "--users", listed, "--k", 100)
        row: dict[str, Any] = {"users": users.height}
        row["one process s"] = _timed(*common, "--out", work / "ray-batch-single.parquet")
        for cpus in (1, 2):
            out = work / f"ray-batch-parts-{cpus}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            row[f"ray {cpus} CPU s"] = _timed(
                *common, "--out", out, "--engine", "ray", "--ray-cpus", cpus
            )
        row["ray 2 CPUs / one process"] = row["one process s"] / row["ray 2 CPU s"]
        print(json.dumps(row), flush=True)
        results.append(row)
    headers = [
        "users",
        "one process s",
        "ray 1 CPU s",
        "ray 2 CPUs s",
        "users/s one process",
        "users/s ray 2 CPUs",
        "ray 2 CPUs / one process",
    ]
    rows = [
        [
            f"{r['users']:,}",
            f"{r['one process s']:.1f}",
            f"{r['ray 1 CPU s']:.1f}",
            f"{r['ray 2 CPU s']:.1f}",
            f"{r['users'] / r['one process s']:,.0f}",
            f"{r['users'] / r['ray 2 CPU s']:,.0f}",
            f"{r['ray 2 CPUs / one process']:.2f}",
        ]
        for r in results
    ]
    notes = (
        f"{cfg.n_users:,} users x {cfg.n_items:,} items ({cfg.rows:,} events, one epoch), "
        "k = 100, 2 cores; wall time of each `recsys recommend` command, Ray's local start "
        "and the version's load in every actor included. Target: Ray's users/s >= 0.8x the "
        "one process's."
    )
    save(
        "ray_batch",
        "Batch answers: one process against Ray Data",
        markdown_table(headers, rows),
        notes,
    )
    bar_chart(
        "ray_batch",
        "recsys recommend: users/s by engine",
        {
            f"{r['users']:,} users": {
                "one process": r["users"] / r["one process s"],
                "ray, 1 CPU": r["users"] / r["ray 1 CPU s"],
                "ray, 2 CPUs": r["users"] / r["ray 2 CPU s"],
            }
            for r in results
        },
        "users/s",
        log=True,
    )
    return results
