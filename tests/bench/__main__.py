"""`python -m bench [--quick]`: run every benchmark and write bench_results/."""

import argparse
import logging
import time
import warnings
from pathlib import Path

from bench import (
    ablations,
    build,
    cluster,
    freshness,
    genre_share,
    hosts,
    index,
    ingest,
    nightly,
    quality,
    quality_sets,
    ranks,
    ray_batch,
    remote_logs,
    serving,
    shared_log,
    soak,
    speed,
    swap,
    tuning,
    worker_memory,
)
from recsys.core.settings import Settings

OPT_IN = {"ablations", "genre-share"}  # sections run only when --only names them
# Sections a full run leaves out unless named (they would take it past the hour: hosts
# alone moves 3 GB versions through moto for about 12 minutes, index builds three HNSW
# libraries' graphs of a million vectors, ray-batch and remote-logs build versions of
# their own); quick runs include them.
FULL_OPT_IN = {"hosts", "shared-log", "cluster", "index", "ray-batch", "remote-logs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data, for everyday use")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where generated data and outputs go (default: <cache>/bench)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        help="ingest, quality, quality-sets, tuning, speed, ranks, build, index, serving, "
        "nightly, soak, swap, hosts, shared-log, cluster, freshness, worker-memory, "
        "ray-batch, remote-logs; and, run only when named, ablations, genre-share",
    )
    args = parser.parse_args()
    work = args.work or Settings().cache_dir / "bench"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    benches = (
        ("ingest", ingest),
        ("quality", quality),
        ("quality-sets", quality_sets),
        ("tuning", tuning),
        ("speed", speed),
        ("ranks", ranks),
        ("build", build),  # before serving, which reuses its 1M-item version
        ("index", index),
        ("serving", serving),
        ("nightly", nightly),
        ("soak", soak),
        ("swap", swap),
        ("hosts", hosts),
        ("shared-log", shared_log),
        ("cluster", cluster),
        ("freshness", freshness),
        ("worker-memory", worker_memory),
        ("ray-batch", ray_batch),
        ("remote-logs", remote_logs),
        ("ablations", ablations),  # opt-in: outside the full run's hour
        ("genre-share", genre_share),  # opt-in: two default builds, about 15 minutes
    )
    for name, bench in benches:
        left_out = OPT_IN | (set() if args.quick else FULL_OPT_IN)
        if (args.only and name not in args.only) or (not args.only and name in left_out):
            continue
        section_started = time.perf_counter()
        bench.run(args.quick, work)
        print(f"\n[{name}: {time.perf_counter() - section_started:.0f}s]", flush=True)
    print(f"\nbenchmarks done in {time.perf_counter() - started:.0f}s; see bench_results/")


if __name__ == "__main__":
    main()
