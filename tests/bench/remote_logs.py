"""A build from a Parquet log on S3 (moto's server on loopback, read in place by Polars'
cloud reader) against the same hive-partitioned files on local disk, alternating, wall
time of each `recsys build` command. Target: S3 within 1.2x of local disk."""

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from helpers import environment

from bench.hosts import _moto
from bench.report import bar_chart, markdown_table, save
from data.synthetic import SyntheticConfig, generate

DAYS = 10


def _partitioned(work: Path, cfg: SyntheticConfig) -> Path:
    """The synthetic log split into DAYS hive partitions (`date=...`), made once."""
    parts = work / f"remote-logs-{cfg.rows}"
    if (parts / "_done").is_file():
        return parts
    shutil.rmtree(parts, ignore_errors=True)
    generate(work / f"remote-logs-{cfg.rows}-generated", cfg)
    log = pl.read_parquet(work / f"remote-logs-{cfg.rows}-generated" / "interactions" / "*")
    for day in range(DAYS):
        part = parts / f"date=2026-12-{day + 1:02d}"
        part.mkdir(parents=True)
        log.gather_every(DAYS, day).write_parquet(part / "part-0.parquet")
    (parts / "_done").write_text("")
    return parts


def _build_seconds(data: str, artifacts: Path) -> float:
    shutil.rmtree(artifacts, ignore_errors=True)
    command = [sys.executable, "-m", "recsys", "build", "--artifacts", str(artifacts)]
    command += ["--data", data, "--epochs", "1", "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    cfg = SyntheticConfig(rows=200_000 if quick else 1_000_000, seed=7)
    rounds = 2 if quick else 3
    parts = _partitioned(work, cfg)
    moto, env = _moto(work)
    try:
        with environment(env):
            import s3fs

            fs = s3fs.S3FileSystem()
            fs.mkdir("bench-logs")
            for path in sorted(parts.rglob("*.parquet")):
                fs.put_file(str(path), f"bench-logs/logs/{path.relative_to(parts)}")
            timings: dict[str, list[float]] = {"local disk": [], "S3 (moto)": []}
            for _ in range(rounds):
                timings["local disk"].append(_build_seconds(str(parts), work / "rl-local"))
                timings["S3 (moto)"].append(_build_seconds("s3://bench-logs/logs/", work / "rl-s3"))
    finally:
        moto.terminate()
        moto.wait()
    local = statistics.median(timings["local disk"])
    results: list[dict[str, Any]] = [
        {"source": name, "median_s": statistics.median(runs), "runs": runs}
        for name, runs in timings.items()
    ]
    print(json.dumps(results), flush=True)
    rows = [
        [
            r["source"],
            f"{r['median_s']:.1f}",
            " / ".join(f"{t:.1f}" for t in r["runs"]),
            f"{r['median_s'] / local:.2f}x",
        ]
        for r in results
    ]
    save(
        "remote_logs",
        "A build from a Parquet log on S3 against local disk",
        markdown_table(["log on", "median s", "runs", "vs local"], rows),
        f"Synthetic log of {cfg.rows:,} events in {DAYS} hive partitions (date=...), "
        f"`recsys build --epochs 1`, {rounds} alternating rounds, wall time of the command; "
        "S3 is moto's server on loopback, read in place by Polars' cloud reader. Target: "
        "S3 within 1.2x of local disk.",
    )
    bar_chart(
        "remote_logs",
        "recsys build: log on local disk and on S3",
        {r["source"]: {"median s": r["median_s"]} for r in results},
        "seconds",
    )
    return results
