"""A graph index (HNSW, through usearch) for catalogues where Annoy's trees cannot reach
the recall target within the query budget: on the 1M-item version Annoy returned
recall@100 0.589 in 2.5 ms.

usearch over Voyager and faiss-cpu's HNSW (all three measured in `make bench ONLY=index`):
its file can be served memory-mapped (`Index.restore(view=True)`), so every worker
process shares one copy in the page cache as with Annoy, while the other two copy the
whole graph into each worker. The file stores its own dimension, metric and scalar type.

usearch is imported on first use, never with this module. Its extension carries its own
C++ runtime: loaded into a process before libtorch, it made torch's C++ exceptions unwind
forever (importing `torch.distributed.optim`, which compiles TorchScript, spun at 100% CPU
and never returned). Processes that train (the build, the tests) load torch first.
"""

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from usearch.index import Index

from recsys.core.errors import ArtifactError
from serving.index_params import IndexParams
from serving.page_cache import warm_page_cache

HNSW_FILE = "items.usearch"
CONNECTIVITY = 16  # edges per node (HNSW's M); see docs/benchmarks.md
EXPANSION_ADD = 128  # candidate list while inserting (efConstruction)


class HnswRetriever:
    def __init__(self, index: "Index", item_emb: np.ndarray, params: IndexParams) -> None:
        assert params.hnsw is not None
        self.index, self.item_emb, self.params = index, item_emb, params
        self.expansion_search = params.hnsw.expansion_search
        self.augmented = params.metric == "dot"  # queries get a 0 for the extra dimension

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.expansion_search = self.expansion_search  # type: ignore[misc]  # tuning shares one graph
        found = self.index.search(np.append(query, 0.0) if self.augmented else query, n)
        ids = found.keys.astype(np.int64)
        scores = self.item_emb[ids] @ query  # exact model scores for the retrieved items
        order = np.argsort(-scores, kind="stable")
        return ids[order], scores[order]

    def with_expansion(self, expansion_search: int) -> "HnswRetriever":
        """The same graph searched with another candidate list (tuning and benchmarks)."""
        assert self.params.hnsw is not None
        graph = replace(self.params.hnsw, expansion_search=expansion_search)
        return HnswRetriever(self.index, self.item_emb, replace(self.params, hnsw=graph))

    @classmethod
    def load(cls, directory: Path, item_emb: np.ndarray, params: IndexParams) -> "HnswRetriever":
        path = directory / HNSW_FILE
        warm_page_cache(path)
        from usearch.index import Index

        try:
            index = Index.restore(str(path), view=True)  # mmap, shared by workers
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{directory}: cannot load {HNSW_FILE} ({exc})") from exc
        if index is None:
            raise ArtifactError(f"{directory}: {HNSW_FILE} is missing or not a usearch index")
        dim = item_emb.shape[1] + (params.metric == "dot")
        if index.ndim != dim or len(index) != len(item_emb):
            raise ArtifactError(
                f"{directory}: {HNSW_FILE} holds {len(index)} items of dim {index.ndim}, "
                f"expected {len(item_emb)} of dim {dim}"
            )
        return cls(index, item_emb, params)


def build_graph(
    item_emb: np.ndarray, metric: str, connectivity: int = CONNECTIVITY
) -> tuple["Index", float]:
    """The graph over every item (keys are item positions) and the seconds it took, on
    every core. Cosine for the angular metric; for dot products the item rows get the
    inner-product-to-cosine augmentation (`augment_for_inner_product`): a graph built on
    raw inner products left items unreachable (recall@100 0.947 at ef 6,400 on 4,000
    items of varied lengths, where the augmented graph reaches it at ef 100)."""
    from usearch.index import Index

    started = time.perf_counter()
    if metric == "dot":
        item_emb = augment_for_inner_product(item_emb)
    index = Index(
        ndim=item_emb.shape[1],
        metric="cos",
        dtype="f32",
        connectivity=connectivity,
        expansion_add=EXPANSION_ADD,
    )
    index.add(
        np.arange(len(item_emb), dtype=np.uint64),
        np.ascontiguousarray(item_emb, dtype=np.float32),
        threads=os.cpu_count() or 1,
    )
    return index, time.perf_counter() - started


def augment_for_inner_product(item_emb: np.ndarray) -> np.ndarray:
    """Item rows with one more coordinate, sqrt(max_norm^2 - |x|^2), so every row has the
    same length: a query padded with 0 then ranks them by cosine exactly as by inner
    product (Bachrach et al. 2014; implicit's `augment_inner_product_matrix`)."""
    norms = np.einsum("ij,ij->i", item_emb, item_emb)  # (I,) squared lengths
    extra = np.sqrt(np.maximum(norms.max(initial=0.0) - norms, 0.0))
    return np.hstack([item_emb, extra[:, None]]).astype(np.float32)
