"""A build from a Parquet log on S3 (moto's server on loopback, read in place by Polars'
cloud reader) against the same hive-partitioned files on local disk, alternating, wall
time of each `recsys build` command. Target: S3 within 1.2x of local disk.

Then the ingest of a rebuild after one new partition: every file read again, against
only the new one beside the previous ingest's cleaned table (`features/reuse.py`)."""

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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


def _grown_ingest(
    first: str, data: str, work: Path, rounds: int, grow: Callable[[], object] = lambda: None
) -> dict[str, list[float]]:
    """Seconds to ingest `data` after an ingest of `first` (all but its newest partition;
    `grow` adds that partition where `first` and `data` name one directory): reading
    every file, and reading only what `first` did not hold, alternating."""
    from features.ingest import ingest
    from features.sources import resolve_source

    previous = work / "rl-previous"
    shutil.rmtree(previous, ignore_errors=True)
    ingest(resolve_source(first), previous)
    grow()
    timings: dict[str, list[float]] = {"every file": [], "the new partition only": []}
    for _ in range(rounds):
        for case, reuse in (("every file", False), ("the new partition only", True)):
            out = work / "rl-again"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            report = ingest(resolve_source(data), out, previous=previous, reuse=reuse)
            timings[case].append(time.perf_counter() - started)
            assert report.reused_files == (DAYS - 1 if reuse else 0)
    return timings


def _local_growth(parts: Path, work: Path) -> tuple[Path, Callable[[], object]]:
    """A copy of the partitions without the newest day, and what copies that day in."""
    copy = work / "remote-logs-growing"
    shutil.rmtree(copy, ignore_errors=True)
    newest = f"date=2026-12-{DAYS:02d}"
    shutil.copytree(parts, copy, ignore=shutil.ignore_patterns("_done", newest))
    return copy, lambda: shutil.copytree(parts / newest, copy / newest)


def _seconds(runs: list[float]) -> str:
    return " / ".join(f"{t:.2f}" for t in runs)


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
            nine_days = f"s3://bench-logs/logs/date=2026-12-0[1-{DAYS - 1}]/*.parquet"
            growing, grow = _local_growth(parts, work)
            grown = {
                "S3 (moto)": _grown_ingest(nine_days, "s3://bench-logs/logs/", work, rounds),
                "local disk": _grown_ingest(str(growing), str(growing), work, rounds, grow),
            }
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
    rebuilds: list[dict[str, Any]] = [
        {"source": source, "case": case, "median_s": statistics.median(runs), "runs": runs}
        for source, cases in grown.items()
        for case, runs in cases.items()
    ]
    print(json.dumps(rebuilds), flush=True)
    save(
        "remote_logs_rebuild",
        "The ingest of a rebuild after one new partition",
        markdown_table(
            ["log on", "reads", "median s", "runs"],
            [
                [r["source"], r["case"], f"{r['median_s']:.2f}", _seconds(r["runs"])]
                for r in rebuilds
            ],
        ),
        f"The same log: an ingest of its first {DAYS - 1} partitions, then of all {DAYS} "
        "(the newest included) reading every file again or only the new one beside the "
        f"first ingest's cleaned table; {rounds} alternating rounds, in process.",
    )
    results += rebuilds
    bar_chart(
        "remote_logs",
        "recsys build: log on local disk and on S3",
        {r["source"]: {"median s": r["median_s"]} for r in results},
        "seconds",
    )
    return results
