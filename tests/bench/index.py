"""The index backends on the same embeddings: Annoy tuned as `recsys build` tunes it, the
backend `recsys build` chooses (Annoy, HNSW, the PQ scan or exact search, by
measured recall on sample queries), exact search (NumPy brute force), and three HNSW
libraries side by side (`bench.index_peers`)."""

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import index_peers
from bench.report import RESULTS_DIR, markdown_table, save
from serving.hnsw import HNSW_FILE
from serving.index import (
    INDEX_FILE,
    AnnoyRetriever,
    ExactRetriever,
    IndexParams,
    IndexTargets,
    build_annoy,
    build_index,
    load_retriever,
    recall_against_exact,
)
from serving.pq import PQ_FILE

DIM = 64


def clustered_unit_vectors(
    sizes: tuple[int, ...], clusters: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sets of unit vectors around the same `clusters` centres: items, and queries near
    them, the shape of a trained model's item and user embeddings."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    sets = []
    for n in sizes:
        noise = 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
        vectors = centres[rng.integers(0, clusters, n)] + noise
        sets.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return sets


def random_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit queries unrelated to any item cluster: the hardest case for any index (until
    2026-12-07 the clustered benchmark drew its queries this way, around other centres)."""
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
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
    label: str, item_emb: np.ndarray, tuning: np.ndarray, held_out: np.ndarray, work: Path
) -> dict[str, Any]:
    """Build and tune an Annoy index on `tuning` queries as `recsys build` did before it
    chose between backends; measure it on `held_out`."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        directory = Path(tmp)
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


def _chosen(
    label: str,
    item_emb: np.ndarray,
    tuning: np.ndarray,
    held_out: np.ndarray,
    work: Path,
    unrelated: np.ndarray | None = None,
) -> dict[str, Any]:
    """What `recsys build` chooses and serves (`build_index` on `tuning` queries, as the
    build runs it), measured on `held_out` (and on `unrelated` queries, if given, with
    the index as tuned for the others)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        build_index(item_emb, tuning, directory, "angular")
        choice_s = time.perf_counter() - started
        served = load_retriever(directory, item_emb)
        params = IndexParams.read(directory)
        names = (INDEX_FILE, HNSW_FILE, PQ_FILE)
        files = [directory / name for name in names]
        result = {
            "case": label,
            "items": len(item_emb),
            "backend": params.backend,
            "settings": _settings(params),
            "build_s": params.build_seconds_total,
            "choice_s": choice_s,
            "size_mb": sum(f.stat().st_size for f in files if f.exists()) / 2**20,
            "recall@100": recall_against_exact(served, ExactRetriever(item_emb), held_out),
            "qps": _qps(served.search, held_out),
            "reason": params.reason,
            "unrelated_recall": (
                None
                if unrelated is None
                else recall_against_exact(served, ExactRetriever(item_emb), unrelated)
            ),
        }
    print(result, flush=True)
    return result


def _settings(params: IndexParams) -> str:
    if params.backend == "hnsw" and params.hnsw is not None:
        return f"M {params.hnsw.connectivity}, ef {params.hnsw.expansion_search}"
    if params.backend == "annoy":
        return f"{params.n_trees} trees, search_k {params.search_k}"
    if params.backend == "pq" and params.pq is not None:
        return f"{params.pq.subspaces} codes, {params.pq.candidates} re-scored"
    return "-"


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
    size = 100_000 if quick else 1_000_000
    item_emb, tuning, held_out = clustered_unit_vectors((size, 1000, 300), 200, rng)
    label = "clustered unit vectors"
    results = [_case(label, item_emb, tuning, held_out, work)]
    chosen = [
        _chosen(label, item_emb, tuning, held_out, work, unrelated=random_directions(300, rng))
    ]
    peers = index_peers.compare(item_emb, held_out, work)
    if not quick:
        from bench.build import huge_version
        from recsys.core.versions import VersionStore

        version = VersionStore(huge_version(work)).current()
        item_emb, tuning, held_out = _trained(version, rng)
        label = "1M x 1M version, 1 epoch"
        results.append(_case(label, item_emb, tuning, held_out, work))
        chosen.append(_chosen(label, item_emb, tuning, held_out, work))
    _plot_curves(results, peers)
    save("index", "Index backends", _tables(results, chosen, peers, size), _notes())
    return results + chosen + peers


def _tables(
    results: list[dict[str, Any]],
    chosen: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    size: int,
) -> str:
    budget = IndexTargets().max_query_ms
    served = markdown_table(
        [
            "embeddings",
            "items",
            "serves",
            "settings",
            "build s",
            "index stage s",
            "size MB",
            "recall@100",
            "q/s",
            "recall@100, random-direction queries",
            "Annoy as tuned: recall@100",
            "Annoy q/s",
            "Annoy build s",
            "exact q/s",
        ],
        [
            [
                c["case"],
                f"{c['items']:,}",
                c["backend"],
                c["settings"],
                f"{c['build_s']:.1f}",
                f"{c['choice_s']:.0f}",
                f"{c['size_mb']:.0f}",
                f"{c['recall@100']:.3f}",
                f"{c['qps']:,.0f}",
                "-" if c["unrelated_recall"] is None else f"{c['unrelated_recall']:.3f}",
                f"{a['recall@100']:.3f}",
                f"{a['annoy_qps']:,.0f}",
                f"{a['build_s']:.1f}",
                f"{a['exact_qps']:,.0f}",
            ]
            for c, a in zip(chosen, results, strict=True)
        ],
    )
    side_by_side = markdown_table(
        [
            "library",
            "build s",
            "size MB",
            "load s",
            "MB per extra worker",
            f"best recall@100 within {budget:g} ms",
            "at ef",
            "ms/query",
        ],
        [
            [
                p["library"],
                f"{p['build_s']:.1f}",
                f"{p['size_mb']:.0f}",
                f"{p['load_s']:.3f}",
                f"{p['worker_mb']:.0f}",
                *_best(p["curve"], budget),
            ]
            for p in peers
        ],
    )
    curves = markdown_table(
        ["library", "ef", "recall@100", "ms/query"],
        [
            [p["library"], ef, f"{recall:.3f}", f"{ms:.2f}"]
            for p in peers
            for ef, recall, ms in p["curve"]
        ],
    )
    annoy = markdown_table(
        ["embeddings", "items", "search_k", "recall@100", "Annoy q/s"],
        [
            [r["case"], f"{r['items']:,}", k, f"{recall:.3f}", f"{qps:,.0f}"]
            for r in results
            for k, recall, qps in r["curve"]
        ],
    )
    return (
        f"{served}\n\nHNSW libraries on the {size:,} clustered vectors\n\n{side_by_side}"
        f"\n\n{curves}\n\nAnnoy's trade-off on its own trees\n\n{annoy}"
    )


def _best(curve: list[tuple[int, float, float]], budget: float) -> list[str]:
    ef, recall, ms = index_peers.best_within(curve, budget)
    return [f"{recall:.3f}", str(ef), f"{ms:.2f}"]


def _notes() -> str:
    return (
        f"Clustered: {DIM}-dim unit vectors around 200 centres, queries around the same "
        "centres (random-direction queries: unit vectors unrelated to the clusters, the "
        "index as tuned for the others). Trained: the item embeddings "
        "of the build benchmark's 1M-user x 1M-item version, queried with its user "
        "embeddings. `serves`: what `build_index` (the build's index stage) chose. Tuning as "
        f"`recsys build` does it (recall@100 >= {IndexTargets().recall_at_100:g} on 1,000 "
        f"tuning queries within {IndexTargets().max_query_ms:g} ms a query), then measured "
        "on 300 other queries one at a time (k = 100, tie-aware recall). `index stage s`: "
        "the whole choice (samples, builds, tuning); `Annoy as tuned`: "
        "the Annoy index `recsys build` served before it chose between backends. Libraries: "
        f"M {index_peers.CONNECTIVITY}, construction list {index_peers.EXPANSION_ADD}, all "
        "cores, cosine; `MB per extra worker`: memory a fresh process could not share "
        "after loading the file and answering 1,000 queries (usearch maps the file; "
        "Voyager and faiss read the graph into each process)."
    )


def _plot_curves(results: list[dict[str, Any]], peers: list[dict[str, Any]]) -> None:
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
    for n, p in enumerate(peers, start=len(results)):
        _, recalls, ms = zip(*p["curve"], strict=True)
        axis.plot(
            recalls,
            [1000 / m for m in ms],
            "^--",
            color=f"C{n}",
            label=f"{p['library']} HNSW, clustered",
        )
    axis.set(
        xlabel="recall@100 against exact search",
        ylabel="queries/s (one at a time)",
        yscale="log",
        title="Recall against speed (square: Annoy as tuned, star: exact search)",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "index.png", dpi=120)
    plt.close(fig)
