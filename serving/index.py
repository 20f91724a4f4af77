"""Nearest-item retrieval behind one interface, with two backends: exact search (a matrix
product, the oracle) and an Annoy index (mmap'd, shared by worker processes).

The index metric follows the training similarity: angular for L2-normalised towers, Annoy's
inner-product metric for dot products. Scores returned are always the model's own score,
`user_emb @ item_emb`, recomputed exactly for the retrieved items.
"""

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil
from annoy import AnnoyIndex

from recsys.core.errors import ArtifactError
from recsys.core.typed_settings import number, settings_section

INDEX_FILE = "items.ann"
PARAMS_FILE = "index.json"


class Retriever(Protocol):
    item_emb: np.ndarray  # (I, D), the exact embeddings results are scored with

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) of the `n` best items for one query vector, best first."""
        ...


@dataclass
class ExactRetriever:
    item_emb: np.ndarray  # (I, D)
    params: "IndexParams | None" = None  # the build's measurements, when serving a version

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.item_emb @ query  # (I,)
        n = min(n, len(scores))
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]


@dataclass(frozen=True)
class IndexParams:
    metric: str  # "angular" or "dot"
    dim: int
    n_trees: int
    search_k: int
    recall_at_100: float  # measured against exact search at build time
    build_seconds: float
    query_ms: float = 0.0  # mean time of one k = 100 query at these settings, at build time
    exact_query_ms: float = 0.0  # the same for exact search over the same embeddings
    backend: str = "annoy"  # what serves (`serving_backend`); "exact" has recall 1.0


@settings_section
class IndexTargets:
    """What the index tuning aims for (see `build_annoy`).

    The query budget is CPU a service spends on every cache miss: at 2.5 ms, 200 misses/s
    take a quarter of two cores for the search alone. At 5 ms they took half, and with the
    HTTP work on top the queueing tails of a 2-core service reached the 20 ms p99 target
    (measured on 1M items, where recall@100 was 0.51 at 3.6 ms and 0.47 at 2.0 ms)."""

    recall_at_100: float = number(
        0.95, 0.0, 1.0, "recall@100 against exact search the tuning aims for (0: fewest trees)"
    )
    max_query_ms: float = number(
        2.5, 0.0, 60_000.0, "CPU time one k = 100 query may take", gt=0.0, le=60_000.0
    )


class AnnoyRetriever:
    def __init__(self, index: AnnoyIndex, item_emb: np.ndarray, params: IndexParams) -> None:
        self.index, self.item_emb, self.params = index, item_emb, params

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(
            self.index.get_nns_by_vector(query.tolist(), n, search_k=self.params.search_k),
            dtype=np.int64,
        )
        scores = self.item_emb[ids] @ query  # exact model scores for the retrieved items
        order = np.argsort(-scores, kind="stable")
        return ids[order], scores[order]

    @classmethod
    def load(cls, directory: Path, item_emb: np.ndarray) -> "AnnoyRetriever":
        try:
            params = IndexParams(**json.loads((directory / PARAMS_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{directory}: cannot read index parameters ({exc})") from exc
        if params.dim != item_emb.shape[1]:
            raise ArtifactError(
                f"{directory}: index has dim {params.dim}, embeddings {item_emb.shape[1]}"
            )
        index = AnnoyIndex(params.dim, params.metric)  # type: ignore[arg-type]
        path = directory / INDEX_FILE
        _warm_page_cache(path)
        if not index.load(str(path), prefault=False):  # mmap, shared
            raise ArtifactError(f"{directory}: cannot load {INDEX_FILE}")
        if index.get_n_items() != len(item_emb):
            raise ArtifactError(
                f"{directory}: index holds {index.get_n_items()} items, expected {len(item_emb)}"
            )
        return cls(index, item_emb, params)


def _warm_page_cache(path: Path, chunk_bytes: int = 1 << 24) -> None:
    """Read the whole index into the page cache before mapping it, when it fits in half the
    available memory: otherwise the first queries after a start or a version switch fault
    their pages in from disk one by one, which on a network disk costs each of them far
    more than the search itself. Plain reads, not Annoy's `prefault` (MAP_POPULATE): Annoy
    holds the GIL while it maps, so prefaulting a 1M-item index stalled every request of
    the worker for 0.3-1.3 s; a read releases the GIL. An index larger than that is left
    to page in on demand, as Annoy's on-disk design intends."""
    try:
        if path.stat().st_size >= psutil.virtual_memory().available / 2:
            return
        buffer = bytearray(chunk_bytes)
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    except OSError:
        return


def kth_best_scores(item_emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Each query's k-th best exact score (brute force in chunks): the bar for recall."""
    k = min(k, len(item_emb))
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64] @ item_emb.T  # (q, I)
        out[start : start + 64] = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    return out


def recall_at_k(retriever: Retriever, queries: np.ndarray, kth: np.ndarray, k: int = 100) -> float:
    """Share of the k returned items that score at least the k-th best exact score.

    This is ann-benchmarks' tie-aware recall: where many items share the k-th score (cold
    items embedded from the same features), any of them is a correct answer, while a
    set-overlap recall would count an arbitrary tie-break as a miss."""
    k = min(k, len(retriever.item_emb))
    found = 0
    for query, bar in zip(queries, kth, strict=True):
        _, scores = retriever.search(query, k)
        found += min(k, int(np.count_nonzero(scores >= bar - 1e-5 * max(1.0, abs(bar)))))
    return found / (len(queries) * k)


def recall_against_exact(
    retriever: Retriever, exact: ExactRetriever, queries: np.ndarray, k: int = 100
) -> float:
    return recall_at_k(retriever, queries, kth_best_scores(exact.item_emb, queries, k), k)


def _measure(
    index: AnnoyIndex,
    item_emb: np.ndarray,
    queries: np.ndarray,
    kth: np.ndarray,
    params: IndexParams,
) -> IndexParams:
    started = time.perf_counter()
    recall = recall_at_k(AnnoyRetriever(index, item_emb, params), queries, kth)
    query_ms = (time.perf_counter() - started) * 1000 / max(1, len(queries))
    return replace(params, recall_at_100=round(recall, 4), query_ms=round(query_ms, 3))


def _exact_query_ms(item_emb: np.ndarray, queries: np.ndarray) -> float:
    exact = ExactRetriever(item_emb)
    started = time.perf_counter()
    for query in queries:
        exact.search(query, 100)
    return (time.perf_counter() - started) * 1000 / max(1, len(queries))


def load_retriever(directory: Path, item_emb: np.ndarray) -> Retriever:
    """The retriever a version serves with: its Annoy index (always loaded, so a damaged
    index is refused either way), or exact search where the build measured it to be at
    least as fast (small catalogues: a matrix product beats tree walks and is exact)."""
    annoy = AnnoyRetriever.load(directory, item_emb)
    if annoy.params.backend == "exact":
        return ExactRetriever(item_emb, annoy.params)
    return annoy


def build_annoy(
    item_emb: np.ndarray,
    queries: np.ndarray,
    directory: Path,
    metric: str,
    targets: IndexTargets | None = None,
    n_trees: int | None = None,
    seed: int = 0,
) -> IndexParams:
    """Build the index, then choose `search_k` (and more trees if needed) by measuring
    recall@100 against exact search on real user queries, and record which of the two
    serves (`backend`, see `serving_backend`).

    Exact search is timed first, on the same queries: where it fits the query budget, no
    Annoy setting slower than it could serve, so the search stops there. Otherwise
    `search_k` doubles until the recall target is met or a query (k = 100, re-scoring
    included) would take longer than `max_query_ms`; trees double up to 4x the starting
    count while the target is missed. Embeddings where random-projection trees cannot
    reach the target within that budget (diffuse, weakly trained ones) get the best
    recall the budget allows, measured and recorded, rather than an unbounded search."""
    targets = targets or IndexTargets()
    directory.mkdir(parents=True, exist_ok=True)
    items, dim = item_emb.shape
    kth = kth_best_scores(item_emb, queries, 100)  # ground truth computed once
    exact_ms = _exact_query_ms(item_emb, queries[:200])
    budget_ms = min(targets.max_query_ms, exact_ms)
    trees = n_trees or int(min(100, max(10, 2 * np.log2(max(items, 2)))))
    max_trees = 4 * trees
    while True:
        started = time.perf_counter()
        index = AnnoyIndex(dim, metric)  # type: ignore[arg-type]
        index.set_seed(seed)
        index.on_disk_build(str(directory / INDEX_FILE))
        for i, vector in enumerate(item_emb):
            index.add_item(i, vector.tolist())
        index.build(trees, n_jobs=-1)
        built = IndexParams(metric, dim, trees, 100 * trees, 0.0, time.perf_counter() - started)
        best = _measure(index, item_emb, queries, kth, built)
        while best.recall_at_100 < targets.recall_at_100 and best.search_k < 64 * 100 * trees:
            wider = _measure(
                index, item_emb, queries, kth, replace(best, search_k=2 * best.search_k)
            )
            if wider.query_ms > budget_ms:
                break
            best = wider
        done = best.recall_at_100 >= targets.recall_at_100 or n_trees is not None
        # More trees start with a wider (slower) search: none can serve past the budget.
        if done or trees >= max_trees or best.query_ms > budget_ms:
            break
        index.unload()
        trees *= 2
    params = replace(
        best,
        build_seconds=round(best.build_seconds, 3),
        exact_query_ms=round(exact_ms, 3),
    )
    params = replace(params, backend=serving_backend(params, targets))
    (directory / PARAMS_FILE).write_text(json.dumps(asdict(params), indent=2) + "\n")
    index.unload()
    return params


def serving_backend(params: IndexParams, targets: IndexTargets) -> str:
    """Exact search (recall 1.0) wherever it is at least as fast as Annoy's setting, or
    fits the query budget while Annoy misses the recall target: a 36,706-item catalogue
    served Annoy at recall@100 0.78 in 1.6 ms when exact search took 2.2 of the 2.5 ms
    allowed. Annoy serves where it is faster and meets the target, or where exact
    search is over budget too (huge catalogues: the best recall the budget allows)."""
    exact_fits = params.exact_query_ms <= targets.max_query_ms
    annoy_misses = params.recall_at_100 < targets.recall_at_100
    if params.exact_query_ms <= params.query_ms or (exact_fits and annoy_misses):
        return "exact"
    return "annoy"
