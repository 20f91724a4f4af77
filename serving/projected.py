"""Exact search's answers at a fraction of its cost, for wide vectors: every item is first
scored in a narrow projection of the vectors, and the best `candidates` of those are
re-scored exactly. A scan is bound by the bytes it reads, so a projection to a quarter
of the width reads a quarter of them.

The projection keeps what matters for the scores users get, not for the items alone: with
C the second moment of the tuning queries, the items are mapped by C^1/2 W and a query by
C^-1/2 W, W the top right singular vectors of items x C^1/2. That minimises the expected
squared score error over such queries for the width (the items' own PCA would spend the
width on directions no user looks along). Why not only trees or a graph: the spectral
branch's vectors (hundreds of coordinates, item lengths that differ by degree) left
Annoy at recall@100 0.62-0.68 and HNSW at 0.39-0.44 within the query budget, while their
scores live in far fewer directions than they have coordinates.

Both matrices are stored beside the index as .npy files and memory-mapped, so worker
processes share one copy of them, as they do Annoy's trees."""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from recsys.core.errors import ArtifactError
from serving.index_params import IndexParams, ProjectedParams
from serving.page_cache import warm_page_cache

PROJECTED_FILE = "items_projected.npy"  # (items, width): the items in the projection
QUERY_MAP_FILE = "query_projection.npy"  # (dim, width): maps a query into it
WIDTHS = (16, 32, 64, 128, 256)  # tried narrowest first, each below half the vectors' width
FIRST_CANDIDATES = 200  # re-scored exactly; grows by half while the recall target is missed
SMALLEST_EIGENVALUE = 1e-6  # of C, relative to its largest: directions no query takes


def fit_projection(
    item_emb: np.ndarray, queries: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(items in the projection (I, width), the query map (D, width)) for these queries."""
    moment = queries.T.astype(np.float64) @ queries / max(1, len(queries))
    values, vectors = np.linalg.eigh(moment)
    values = np.maximum(values, values.max(initial=0.0) * SMALLEST_EIGENVALUE + 1e-30)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    # Right singular vectors from the (D, D) Gram matrix: one pass over the items.
    weighted = item_emb.astype(np.float64) @ root
    gram_values, gram_vectors = np.linalg.eigh(weighted.T @ weighted)
    top = gram_vectors[:, np.argsort(-gram_values)[:width]]
    projected = (weighted @ top).astype(np.float32)
    return np.ascontiguousarray(projected), np.ascontiguousarray(inverse_root @ top, np.float32)


class ProjectedRetriever:
    def __init__(
        self,
        projected: np.ndarray,
        query_map: np.ndarray,
        item_emb: np.ndarray,
        params: IndexParams,
    ) -> None:
        assert params.projected is not None
        self.projected, self.query_map, self.item_emb = projected, query_map, item_emb
        self.params = params
        self.candidates = params.projected.candidates

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        approx = self.projected @ (query @ self.query_map)
        shortlist = min(max(self.candidates, n), len(approx))
        cut = len(approx) - shortlist  # the largest from here on: no negated copy
        ids = np.argpartition(approx, cut)[cut:]
        scores = self.item_emb[ids] @ query  # exact model scores for the shortlist
        n = min(n, shortlist)
        best = np.argpartition(-scores, n - 1)[:n]
        best = best[np.argsort(-scores[best], kind="stable")]
        return ids[best], scores[best]

    def with_candidates(self, candidates: int) -> "ProjectedRetriever":
        """The same projection with another shortlist length (tuning and benchmarks)."""
        assert self.params.projected is not None
        settings = replace(self.params.projected, candidates=candidates)
        params = replace(self.params, projected=settings)
        return ProjectedRetriever(self.projected, self.query_map, self.item_emb, params)

    def save(self, directory: Path) -> None:
        np.save(directory / PROJECTED_FILE, self.projected)
        np.save(directory / QUERY_MAP_FILE, self.query_map)

    @classmethod
    def load(
        cls, directory: Path, item_emb: np.ndarray, params: IndexParams
    ) -> "ProjectedRetriever":
        if params.projected is None:
            raise ArtifactError(f"{directory}: index parameters name projected but hold none")
        arrays = []
        for name in (PROJECTED_FILE, QUERY_MAP_FILE):
            path = directory / name
            warm_page_cache(path)
            try:
                arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError, EOFError) as exc:
                raise ArtifactError(f"{directory}: cannot load {name} ({exc})") from exc
        projected, query_map = arrays
        width = params.projected.width
        if projected.shape != (len(item_emb), width) or query_map.shape != (
            item_emb.shape[1],
            width,
        ):
            raise ArtifactError(
                f"{directory}: {PROJECTED_FILE} holds {projected.shape}, {QUERY_MAP_FILE} "
                f"{query_map.shape}, expected {len(item_emb)} items and {item_emb.shape[1]} "
                f"coordinates in {width}"
            )
        return cls(projected, query_map, item_emb, params)


def build_projection(
    item_emb: np.ndarray, queries: np.ndarray, width: int, params: IndexParams
) -> tuple[ProjectedRetriever, float]:
    """The retriever of one width (fitted on `queries`) and the seconds the fit took."""
    started = time.perf_counter()
    projected, query_map = fit_projection(item_emb, queries, width)
    settings = ProjectedParams(width, FIRST_CANDIDATES, 0.0, 0.0, 0.0)
    retriever = ProjectedRetriever(
        projected, query_map, item_emb, replace(params, projected=settings)
    )
    return retriever, time.perf_counter() - started


def widths_for(dim: int) -> tuple[int, ...]:
    """The widths worth trying: a projection past half the vectors saves too little (half
    of narrow vectors, where one is asked for by name)."""
    return tuple(w for w in WIDTHS if 2 * w <= dim) or (max(1, dim // 2),)
