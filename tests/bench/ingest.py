"""Ingest + feature build on synthetic logs of growing size: seconds and peak memory,
ours (Polars lazy/streaming + CSR histories) against an eager pandas ingest."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import RESULTS_DIR, markdown_table, save
from data.synthetic import SyntheticConfig, generate

TARGET_ROWS = 10_000_000
TARGET_SECONDS = 30.0
TARGET_MB = 3 * 1024


def _dataset(root: Path, rows: int) -> Path:
    path = root / f"synthetic-{rows}"
    if not (path / "users.parquet").is_file():
        started = time.perf_counter()
        generate(path, SyntheticConfig(rows=rows, seed=0))
        print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
    return path


def _job(engine: str, data: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.ingest_job", "--engine", engine]
    result = subprocess.run(
        [*command, "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    sizes = [300_000, 1_000_000] if quick else [1_000_000, 3_000_000, TARGET_ROWS]
    results = []
    for rows in sizes:
        data = _dataset(work, rows)
        for engine in ("ours", "pandas"):
            measured = _job(engine, data, work / f"out-{engine}-{rows}")
            measured.update(engine=engine, size=rows)
            results.append(measured)
            print(json.dumps(measured), flush=True)
    table = markdown_table(
        ["rows", "engine", "ingest s", "features s", "total s", "peak RSS MB", "rows/s"],
        [
            [
                f"{r['size']:,}",
                "recsys (Polars streaming + CSR)" if r["engine"] == "ours" else "pandas (eager)",
                r["ingest_s"],
                "—" if r["features_s"] is None else r["features_s"],
                r["ingest_s"] + (r["features_s"] or 0.0),
                r["peak_rss_mb"],
                f"{r['size'] / (r['ingest_s'] + (r['features_s'] or 0.0)):,.0f}",
            ]
            for r in results
        ],
    )
    notes = (
        "Synthetic logs (`data/synthetic.py`, seed 0; users = rows/50, items = rows/100), "
        "Parquet input. *ingest*: validate, reject, collapse duplicates, map IDs, sort, "
        "write. *features*: load the feature set with checksums, build CSR histories, "
        "leave-last-out split, and cut the previous 50 items of every training event in "
        "batches of 8192. Each job runs in its own process; peak RSS is that process's "
        f"maximum. Target at {TARGET_ROWS:,} rows: <= {TARGET_SECONDS:.0f} s and "
        f"<= {TARGET_MB} MB for ingest + features."
    )
    save("ingest", "Ingest + feature build", table, notes)
    _plot(results)
    return results


def _plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, label in (("ours", "recsys"), ("pandas", "pandas")):
        rows = [r for r in results if r["engine"] == engine]
        sizes = [r["size"] / 1e6 for r in rows]
        left.plot(sizes, [r["ingest_s"] for r in rows], "o-", label=f"{label}: ingest")
        if engine == "ours":
            total = [r["ingest_s"] + r["features_s"] for r in rows]
            left.plot(sizes, total, "o--", label="recsys: ingest + features")
        right.plot(sizes, [r["peak_rss_mb"] for r in rows], "o-", label=label)
    left.set(xlabel="rows (millions)", ylabel="seconds", title="time")
    right.set(xlabel="rows (millions)", ylabel="MB", title="peak RSS")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "ingest.png", dpi=120)
