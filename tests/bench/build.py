"""End-to-end `recsys build` (ingest, train, embed, index) on synthetic logs: wall time
and peak memory, for a default build of about 1M interactions and, in the full run, a
1M-user x 1M-item catalogue."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.report import markdown_table, save
from data.synthetic import SyntheticConfig, generate

TARGET_MINUTES = 15


def job(data: Path, artifacts: Path, epochs: int | None, *flags: str) -> dict[str, Any]:
    """One `recsys build` in a fresh process (its own peak RSS); `flags` go to build_job."""
    command = [sys.executable, "-m", "bench.build_job", "--data", str(data)]
    command += ["--artifacts", str(artifacts), *flags]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


HUGE = SyntheticConfig(rows=3_000_000, users=1_000_000, items=1_000_000, seed=2)


def synthetic_data(work: Path, rows: int) -> Path:
    """The default-build synthetic log of `rows` events (generated once, cached)."""
    return _data(work, SyntheticConfig(rows=rows, seed=2))


def _data(work: Path, cfg: SyntheticConfig) -> Path:
    data = work / f"build-{cfg.rows}-{cfg.n_users}-{cfg.n_items}"
    if not (data / "users.parquet").is_file():
        generate(data, cfg)
    return data


def _artifacts(work: Path, cfg: SyntheticConfig) -> Path:
    return work / f"artifacts-{cfg.rows}-{cfg.n_items}"


def huge_version(work: Path) -> Path:
    """The 1M-user x 1M-item version (built here if the build benchmark has not)."""
    artifacts = _artifacts(work, HUGE)
    if not (artifacts / "current").exists():
        job(_data(work, HUGE), artifacts, 1, "--no-refit")
    return artifacts


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    # The 1M x 1M case measures scale (memory, one epoch, the index), so it skips the refit
    # that would repeat its one epoch on the validation events too.
    cases: list[tuple[str, SyntheticConfig, int | None, tuple[str, ...]]] = [
        ("default build", SyntheticConfig(rows=200_000 if quick else 1_000_000, seed=2), None, ())
    ]
    if not quick:
        cases.append(("1M users x 1M items, 1 epoch, no refit", HUGE, 1, ("--no-refit",)))
    results = []
    for label, cfg, epochs, flags in cases:
        measured = job(_data(work, cfg), _artifacts(work, cfg), epochs, *flags)
        measured["case"] = label
        results.append(measured)
        print(json.dumps(measured), flush=True)
    headers = [
        "case",
        "rows",
        "users",
        "items",
        "epochs",
        "train s",
        "total s",
        "peak RSS MB",
        "train ex/s",
        "valid HR@10",
        "index (trees)",
        "index recall@100",
        "index build s",
    ]
    rows = [
        [
            r["case"],
            f"{r['rows']:,}",
            f"{r['users']:,}",
            f"{r['items']:,}",
            r["epochs"],
            f"{r['train_s']:.0f}",
            f"{r['total_s']:.0f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['examples_per_s']:,.0f}",
            f"{r['valid_hit_rate@10']:.3f}",
            f"{r.get('index_backend', 'annoy')} ({r['index_trees']})",
            f"{r['index_recall@100']:.3f}",
            f"{r['index_build_s']:.1f}",
        ]
        for r in results
    ]
    notes = (
        "`recsys build` defaults (epochs and batch size scale with the data; early stopping "
        "on validation recall@20), synthetic logs from `data/synthetic.py`, one process per "
        f"build. Target: a default build of about 1M interactions within {TARGET_MINUTES} "
        "minutes on 2 cores."
    )
    save("build", "End-to-end build time and memory", markdown_table(headers, rows), notes)
    return results
