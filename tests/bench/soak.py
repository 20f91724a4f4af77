"""Soak: a fixed request rate for minutes against `recsys serve` (2 workers, Redis), with
latency percentiles, errors and the service's resident memory sampled over time. Errors
must stay at 0 and memory flat."""

import asyncio
import os
from pathlib import Path
from typing import Any

import psutil

from bench.load import open_loop, recommendation_requests
from bench.report import RESULTS_DIR, markdown_table, save
from recsys.core.versions import VersionStore
from recsys.processes import served

RATE = 100  # requests/s
WINDOW = 10  # seconds per row


def _service_rss_mb(port: int) -> float:
    """Resident memory of every process listening on, or serving, `port` (the uvicorn
    parent and its workers)."""
    total = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if "recsys" in cmdline and f"--port {port}" in cmdline:
            try:
                family = [process, *process.children(recursive=True)]
                total += sum(p.memory_info().rss for p in family)
            except psutil.Error:
                continue
    return total / 2**20


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from bench.serving import movielens_version, user_range

    artifacts = movielens_version(work)
    users = user_range(VersionStore(artifacts).current())
    seconds = 60 if quick else 180
    port = int(os.environ.get("RECSYS_SOAK_PORT", "0")) or None
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    with served(artifacts, env=env, workers=2, port=port) as base:
        service_port = int(base.rsplit(":", 1)[1])
        windows = asyncio.run(
            open_loop(
                base,
                recommendation_requests(users, [10, 20, 50]),
                RATE,
                seconds,
                WINDOW,
                sample=lambda: {"rss_mb": _service_rss_mb(service_port)},
            )
        )
    rows = [
        [
            w["t_s"],
            w["requests"],
            w["errors"],
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            f"{w['rss_mb']:,.0f}",
        ]
        for w in windows
    ]
    total_errors = sum(w["errors"] for w in windows)
    growth = windows[-1]["rss_mb"] - windows[0]["rss_mb"] if windows else 0.0
    notes = (
        f"MovieLens-100K version, `recsys serve --workers 2`, Redis on loopback; an open-loop "
        f"client sends {RATE} requests/s for {seconds} s (random known user, k in 10/20/50, "
        f"so hits and misses mix); one row per {WINDOW} s window. Errors (non-200 or failed "
        f"requests) over the run: {total_errors}. Service RSS (parent + workers) from the "
        f"first to the last window: {growth:+.0f} MB."
    )
    save(
        "soak",
        "Soak: fixed rate against recsys serve",
        markdown_table(["t s", "requests", "errors", "p50 ms", "p99 ms", "RSS MB"], rows),
        notes,
    )
    _plot(windows)
    return windows


def _plot(windows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [w["t_s"] for w in windows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(t, [w["p50_ms"] for w in windows], "o-", label="p50 ms")
    left.plot(t, [w["p99_ms"] for w in windows], "s-", label="p99 ms")
    left.set(xlabel="time, s", ylabel="latency, ms", title=f"soak at {RATE} requests/s")
    right = left.twinx()
    right.plot(t, [w["rss_mb"] for w in windows], "^-", color="tab:green", label="RSS MB")
    right.set_ylabel("service RSS, MB")
    right.set_ylim(bottom=0)
    left.legend(loc="upper left", fontsize=8)
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "soak.png", dpi=120)
    plt.close(fig)
