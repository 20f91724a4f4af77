"""A product-quantised scan re-scored exactly (faiss's `IndexPQFastScan`), for vectors
trees and graphs find hard: every item is held as 4-bit codes of pairs of coordinates
(half a byte per two floats, a sixteenth of the matrix), the codes of every item are
scanned with SIMD lookup tables, and the best `candidates` are re-scored with the exact
embeddings. A scan is bound by the bytes it reads; the codes are small enough to stay in
the cache.

Why: the spectral branch's wide vectors (36,706 items x 768, lengths that differ by
degree) left Annoy at recall@100 0.68 and HNSW at 0.52 within the 2.5 ms budget, and
exact search took 8 ms; the scan reaches 0.95 in under half a millisecond there
(docs/benchmarks.md). On diffuse or tightly clustered million-item catalogues it needs
thousands of candidates, which the build measures.

faiss is imported on first use, never with this module, as usearch is (`serving.hnsw`):
processes that train load torch first. The index is read into each worker (faiss maps
no fast-scan index), which costs its codes: 16 bytes an item at 64 coordinates.
"""

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core.errors import ArtifactError
from serving.index_params import IndexParams, PqParams
from serving.page_cache import warm_page_cache

PQ_FILE = "items.faiss"
BITS = 4  # the fast-scan kernels' code size
TRAIN_ITEMS = 100_000  # the codebooks are learnt on at most this many items
FIRST_CANDIDATES = 200  # re-scored exactly; grows by half while the recall target is missed


def subspace_counts(dim: int) -> tuple[int, ...]:
    """Sub-quantisers tried, coarse first: 4 coordinates each, then 2 (the finer codes
    cost twice the scan and recover more of each score). Both are even and divide the
    padded width."""
    padded = padded_dim(dim)
    return tuple(sorted({max(2, padded // 4), padded // 2}))


def padded_dim(dim: int) -> int:
    """Vectors get zero coordinates up to a multiple of 8: pairs of 4-bit codes per byte,
    of 4 coordinates each at the coarser setting (a multiple of 4 alone left widths such
    as 28 or 60 with an odd count of 4-coordinate codes, which no even count divides)."""
    return -(-dim // 8) * 8


def _padded(rows: np.ndarray, width: int) -> np.ndarray:
    extra = width - rows.shape[-1]
    if extra:
        rows = np.concatenate([rows, np.zeros((*rows.shape[:-1], extra), rows.dtype)], axis=-1)
    return np.ascontiguousarray(rows, dtype=np.float32)


class PqRetriever:
    def __init__(self, index: Any, item_emb: np.ndarray, params: IndexParams) -> None:
        assert params.pq is not None
        self.index, self.item_emb, self.params = index, item_emb, params
        self.candidates = params.pq.candidates
        import faiss

        self._one_thread = faiss.omp_set_num_threads

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        shortlist = min(max(self.candidates, n), len(self.item_emb))
        # OpenMP's thread count belongs to the calling thread, and a worker searches from
        # its request and search threads, which start at every core: a query split over
        # two threads waits for the core the other worker holds.
        self._one_thread(1)
        _, found = self.index.search(_padded(query[None], self.index.d), shortlist)
        ids = found[0][found[0] >= 0]
        scores = self.item_emb[ids] @ query  # exact model scores for the shortlist
        n = min(n, len(ids))
        best = np.argpartition(-scores, n - 1)[:n] if n else np.zeros(0, np.int64)
        best = best[np.argsort(-scores[best], kind="stable")]
        return ids[best], scores[best]

    def with_candidates(self, candidates: int) -> "PqRetriever":
        """The same codes with another shortlist length (tuning and benchmarks)."""
        assert self.params.pq is not None
        params = replace(self.params, pq=replace(self.params.pq, candidates=candidates))
        return PqRetriever(self.index, self.item_emb, params)

    def save(self, directory: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(directory / PQ_FILE))

    @classmethod
    def load(cls, directory: Path, item_emb: np.ndarray, params: IndexParams) -> "PqRetriever":
        if params.pq is None:
            raise ArtifactError(f"{directory}: index parameters name pq but hold none")
        path = directory / PQ_FILE
        if not path.is_file():
            raise ArtifactError(f"{directory}: {PQ_FILE} is missing")
        warm_page_cache(path)
        import faiss

        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or ["unreadable"])[0][:200]
            raise ArtifactError(f"{directory}: cannot load {PQ_FILE} ({reason})") from exc
        dim = padded_dim(item_emb.shape[1])
        # 0.22.0 and earlier padded to a multiple of 4: queries are padded to the codes' width
        dims = {dim, -(-item_emb.shape[1] // 4) * 4}
        if index.d not in dims or index.ntotal != len(item_emb):
            raise ArtifactError(
                f"{directory}: {PQ_FILE} holds {index.ntotal} items of dim {index.d}, "
                f"expected {len(item_emb)} of dim {dim}"
            )
        return cls(index, item_emb, params)


def build_codes(
    item_emb: np.ndarray, subspaces: int, params: IndexParams, seed: int = 0
) -> tuple[PqRetriever, float]:
    """The retriever over every item with `subspaces` 4-bit sub-quantisers (codebooks
    learnt on a sample of at most TRAIN_ITEMS), and the seconds it took. Inner product
    for every metric: angular versions store unit vectors, where it ranks as cosine."""
    import faiss

    started = time.perf_counter()
    rows = _padded(item_emb, padded_dim(item_emb.shape[1]))
    index = faiss.IndexPQFastScan(rows.shape[1], subspaces, BITS, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = rows if len(rows) <= TRAIN_ITEMS else rows[rng.choice(len(rows), TRAIN_ITEMS)]
    index.train(sample)
    index.add(rows)
    settings = PqParams(subspaces, FIRST_CANDIDATES, 0.0, 0.0, 0.0)
    retriever = PqRetriever(index, item_emb, replace(params, pq=settings))
    return retriever, time.perf_counter() - started
