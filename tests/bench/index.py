"""Annoy against exact search (NumPy brute force over the same embeddings): build time,
size, recall@100 and queries/s, with n_trees and search_k chosen the way `recsys build`
chooses them (by measured recall on sample queries)."""

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import RESULTS_DIR, markdown_table, save
from serving.index import (
    INDEX_FILE,
    AnnoyRetriever,
    ExactRetriever,
    IndexParams,
    IndexTargets,
    build_annoy,
    recall_against_exact,
)

DIM = 64


def clustered_unit_vectors(n: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around `clusters` centres: the shape of trained item embeddings."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(
        np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _qps(search: Any, queries: np.ndarray) -> float:
    started = time.perf_counter()
    for query in queries:
        search(query, 100)
    return len(queries) / (time.perf_counter() - started)


def _trained(version: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item embeddings of a built version, and two samples of its user embeddings."""
    import polars as pl

    def matrix(side: str) -> np.ndarray:
        path = version / "embeddings" / f"{side}.parquet"
        column = pl.read_parquet(path, columns=["embedding"])["embedding"]
        return np.ascontiguousarray(column.to_numpy(), dtype=np.float32)  # (N, D)

    users = matrix("users")
    picked = users[rng.choice(len(users), 1300, replace=False)]
    return matrix("items"), picked[:1000], picked[1000:]


def _batch_qps(item_emb: np.ndarray, queries: np.ndarray) -> float:
    """Users per second of `recsys recommend`'s exact scoring (k = 100, a block of users
    times the item matrix), which it uses up to EXACT_BATCH_ITEMS items."""
    import polars as pl

    from features.jagged import CsrBags
    from serving.recommender import Recommender, user_blocks

    users = len(queries)
    rec = Recommender(
        version="bench",
        user_ids=pl.Series(range(users)),
        item_ids=pl.Series(range(len(item_emb))),
        user_emb=queries,
        item_emb=item_emb,
        seen=CsrBags.empty(users),
        histories=CsrBags.empty(users),
        history_weights=np.zeros(0, dtype=np.float32),
        popularity=np.zeros(len(item_emb), dtype=np.float32),
        retriever=ExactRetriever(item_emb),
    )
    started = time.perf_counter()
    for block in user_blocks(np.arange(users), item_emb):
        rec.exact_top_k(block, 100)
    return users / (time.perf_counter() - started)


def _case(
    label: str,
    item_emb: np.ndarray,
    tuning: np.ndarray,
    held_out: np.ndarray,
    work: Path,
    built: Path | None = None,
) -> dict[str, Any]:
    """Build and tune an index on `tuning` queries, or take the one `recsys build` built
    and tuned in the version directory `built` (minutes at a million items); measure it
    on `held_out`."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        directory = built or Path(tmp)
        if built is None:
            build_annoy(item_emb, tuning, directory, "angular")
        retriever = AnnoyRetriever.load(directory, item_emb)
        params = retriever.params
        exact = ExactRetriever(item_emb)
        result = {
            "case": label,
            "items": len(item_emb),
            "n_trees": params.n_trees,
            "search_k": params.search_k,
            "build_s": params.build_seconds,
            "size_mb": (directory / INDEX_FILE).stat().st_size / 2**20,
            "recall@100": recall_against_exact(retriever, exact, held_out),
            "annoy_qps": _qps(retriever.search, held_out),
            "exact_qps": _qps(exact.search, held_out[:100]),
            "batch_qps": _batch_qps(item_emb, np.concatenate([tuning, held_out])),
            "curve": _curve(retriever, exact, held_out[:100], params),
        }
    print({k: v for k, v in result.items() if k != "curve"}, flush=True)
    return result


def _curve(
    retriever: AnnoyRetriever, exact: ExactRetriever, queries: np.ndarray, params: IndexParams
) -> list[tuple[int, float, float]]:
    """(search_k, recall@100, queries/s) around the chosen setting, on the same trees: the
    trade-off a user moves along with `--index-max-query-ms`."""
    points = []
    for factor in (0.25, 0.5, 1, 2, 4, 8, 16):
        search_k = max(100, int(params.search_k * factor))
        wider = AnnoyRetriever(
            retriever.index, retriever.item_emb, replace(params, search_k=search_k)
        )
        recall = recall_against_exact(wider, exact, queries)
        points.append((search_k, recall, _qps(wider.search, queries)))
    return points


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    results = []
    # One synthetic catalogue; the million-item case is the trained version's (a clustered
    # 1M-vector case measured the same trade-off until 2026-12-03, about 5 minutes).
    item_emb, tuning, held_out = (clustered_unit_vectors(n, 200, rng) for n in (100_000, 1000, 300))
    results.append(_case("clustered unit vectors", item_emb, tuning, held_out, work))
    if not quick:
        from bench.build import huge_version
        from recsys.core.versions import VersionStore

        version = VersionStore(huge_version(work)).current()
        item_emb, tuning, held_out = _trained(version, rng)
        results.append(
            _case("1M x 1M version, 1 epoch", item_emb, tuning, held_out, work, version / "index")
        )
    rows = [
        [
            r["case"],
            f"{r['items']:,}",
            r["n_trees"],
            r["search_k"],
            f"{r['build_s']:.1f}",
            f"{r['size_mb']:.0f}",
            f"{r['recall@100']:.3f}",
            f"{r['annoy_qps']:,.0f}",
            f"{r['exact_qps']:,.0f}",
            f"{r['annoy_qps'] / r['exact_qps']:.1f}x",
            f"{r['batch_qps']:,.0f}",
        ]
        for r in results
    ]
    notes = (
        f"Clustered: {DIM}-dim unit vectors around 200 centres. Trained: the item embeddings "
        "of the build benchmark's 1M-user x 1M-item version and the index that build made, "
        "queried with its user embeddings. Parameters chosen as `recsys build` chooses them "
        "(recall@100 >= 0.95 "
        f"on 1,000 tuning queries, search widened only while a query takes <= "
        f"{IndexTargets().max_query_ms:g} ms), then "
        "measured on 300 other queries, one at a time (k = 100, tie-aware recall). Build "
        "uses Annoy's on-disk build with all cores; exact search is a NumPy matrix product "
        "with argpartition over the same embeddings; exact batch: `recsys recommend`'s "
        "scoring of 1,300 users in blocks (one matrix product each, k = 100). Second "
        "table: the same trees at other search_k values (100 queries each), the "
        "trade-off `--index-max-query-ms` moves along."
    )
    _plot_curves(results)
    curve = markdown_table(
        ["embeddings", "items", "search_k", "recall@100", "Annoy q/s"],
        [
            [r["case"], f"{r['items']:,}", k, f"{recall:.3f}", f"{qps:,.0f}"]
            for r in results
            for k, recall, qps in r["curve"]
        ],
    )
    save(
        "index",
        "Annoy against exact search",
        markdown_table(
            [
                "embeddings",
                "items",
                "n_trees",
                "search_k",
                "build s",
                "size MB",
                "recall@100",
                "Annoy q/s",
                "exact q/s",
                "speed-up",
                "exact batch users/s",
            ],
            rows,
        )
        + "\n\n"
        + curve,
        notes,
    )
    return results


def _plot_curves(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for n, r in enumerate(results):
        colour = f"C{n}"
        label = f"{r['case']}, {r['items']:,}"
        _, recalls, qps = zip(*r["curve"], strict=True)
        axis.plot(recalls, qps, "o-", color=colour, label=f"Annoy, {label}")
        axis.plot([1.0], [r["exact_qps"]], "*", color=colour, markersize=12)
        axis.plot([r["recall@100"]], [r["annoy_qps"]], "s", color=colour, fillstyle="none")
    axis.set(
        xlabel="recall@100 against exact search",
        ylabel="queries/s (one at a time)",
        yscale="log",
        title="Annoy: recall against speed (square: chosen, star: exact search)",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "index.png", dpi=120)
    plt.close(fig)
