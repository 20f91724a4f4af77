"""Every index backend on one built version's own embeddings, each tuned as `recsys build`
tunes it (named through `index.backend`), beside the one the build chooses: recall@100
against exact search on held-out users, and one query's time on one BLAS thread, as a
service worker runs it. For versions whose vectors trees and graphs find hard, such as
the spectral branch's wide ones:

    PYTHONPATH=tests .venv/bin/python -m bench.quality_sets --checkins 1000000 --work W
    PYTHONPATH=tests .venv/bin/python -m bench.index_version W/artifacts
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.index import _trained
from bench.report import markdown_table
from recsys.core.versions import VersionStore
from serving.index import (
    IndexBackend,
    IndexTargets,
    as_served,
    build_index,
    kth_best_scores,
    load_retriever,
    recall_at_k,
)


def measure(version: Path, backends: list[IndexBackend], seed: int = 0) -> list[dict[str, str]]:
    """One row per backend: what it served as tuned, and the build's reason."""
    metric = json.loads((version / "index" / "index.json").read_text())["metric"]
    item_emb, tuning, held_out = _trained(version, np.random.default_rng(seed))
    bars = kth_best_scores(item_emb, held_out, 100)  # outside the timed searches
    rows = []
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            params = build_index(item_emb, tuning, Path(tmp), metric, IndexTargets(backend=backend))
            seconds = time.perf_counter() - started
            served = load_retriever(Path(tmp), item_emb)
            with as_served():
                began = time.perf_counter()
                recall = recall_at_k(served, held_out, bars)
                query_ms = (time.perf_counter() - began) * 1000 / len(held_out)
        rows.append(
            {
                "named": backend.value,
                "serves": params.backend,
                "recall@100": f"{recall:.3f}",
                "query ms": f"{query_ms:.2f}",
                "index stage s": f"{seconds:.1f}",
                "reason": params.reason,
            }
        )
        print(rows[-1], flush=True)
    print(f"{version.name}: {len(item_emb):,} items x {item_emb.shape[1]}, {metric}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path, help="an artifacts directory (its current version)")
    parser.add_argument(
        "--backends",
        nargs="+",
        type=IndexBackend,
        default=list(IndexBackend),
        help="index.backend values to measure (default: all)",
    )
    args = parser.parse_args()
    rows = measure(VersionStore(args.artifacts).current(), args.backends)
    columns = ["named", "serves", "recall@100", "query ms", "index stage s"]
    print(markdown_table(columns, [[row[c] for c in columns] for row in rows]))


if __name__ == "__main__":
    main()
