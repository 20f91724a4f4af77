"""Three HNSW libraries side by side on the same vectors (usearch, which serves, and its
peers Voyager and faiss-cpu), at the same graph settings: build time on every core, file
size, load time, memory each extra worker process pays, and recall@100 against query
time along the search list (ef). Run as a module, it is that extra worker: it loads one
file, searches, and prints the memory the load cost the process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.hnsw import CONNECTIVITY, EXPANSION_ADD
from serving.index import kth_best_scores

LIBRARIES = ("usearch", "voyager", "faiss")
EFS = (100, 200, 400, 800, 1600)


def _build(library: str, item_emb: np.ndarray, path: Path) -> None:
    n, dim = item_emb.shape
    index: Any
    threads = os.cpu_count() or 1
    if library == "usearch":
        from usearch.index import Index

        index = Index(
            ndim=dim, metric="cos", connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD
        )
        index.add(np.arange(n, dtype=np.uint64), item_emb, threads=threads)
        index.save(str(path))
    elif library == "voyager":
        from voyager import Index as VoyagerIndex
        from voyager import Space

        index = VoyagerIndex(Space.Cosine, dim, M=CONNECTIVITY, ef_construction=EXPANSION_ADD)
        index.add_items(item_emb, num_threads=threads)
        index.save(str(path))
    else:
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexHNSWFlat(dim, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EXPANSION_ADD
        index.add(item_emb)  # unit vectors: inner product is cosine
        faiss.write_index(index, str(path))


def _load(library: str, path: Path) -> Any:
    """Each library's leanest way to open a saved index for serving."""
    if library == "usearch":
        from usearch.index import Index

        return Index.restore(str(path), view=True)  # memory-mapped
    if library == "voyager":
        from voyager import Index as VoyagerIndex

        return VoyagerIndex.load(str(path))  # read into memory (no mapped mode)
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)  # maps flat codes where it can


def _searcher(library: str, index: Any, ef: int) -> Any:
    """One query at a time, k = 100, as a cache miss searches."""
    if library == "usearch":
        index.expansion_search = ef
        return lambda query: index.search(query, 100).keys.astype(np.int64)
    if library == "voyager":
        return lambda query: np.asarray(index.query(query, 100, query_ef=ef)[0], dtype=np.int64)
    import faiss

    faiss.omp_set_num_threads(1)
    index.hnsw.efSearch = ef
    return lambda query: index.search(query[None], 100)[1][0]


def _curve(
    library: str, index: Any, item_emb: np.ndarray, queries: np.ndarray
) -> list[tuple[int, float, float]]:
    """(ef, tie-aware recall@100, ms per query) for each search list length."""
    kth = kth_best_scores(item_emb, queries, 100)
    points = []
    for ef in EFS:
        search, found = _searcher(library, index, ef), 0
        started = time.perf_counter()
        for query, bar in zip(queries, kth, strict=True):
            ids = search(query)
            found += int(np.count_nonzero(item_emb[ids] @ query >= bar - 1e-5))
        ms = (time.perf_counter() - started) * 1000 / len(queries)
        points.append((ef, found / (100 * len(queries)), ms))
    return points


def _anonymous_mb() -> float:
    """Memory of this process that no other process can share (heap, copies), in MB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_cost(library: str, path: Path, dim: int) -> dict[str, float]:
    """In a fresh process: seconds to open the index, and the unshareable memory it and
    1,000 queries added (a mapped file's pages are shared through the page cache)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.index_peers", library, str(path), str(dim)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def compare(item_emb: np.ndarray, queries: np.ndarray, work: Path) -> list[dict[str, Any]]:
    """Every library on the same unit vectors and held-out queries."""
    results = []
    for library in LIBRARIES:
        path = work / f"peer.{library}"
        started = time.perf_counter()
        _build(library, item_emb, path)
        build_s = time.perf_counter() - started
        loaded = _load(library, path)
        results.append(
            {
                "library": library,
                "build_s": build_s,
                "size_mb": path.stat().st_size / 2**20,
                **worker_cost(library, path, item_emb.shape[1]),
                "curve": _curve(library, loaded, item_emb, queries),
            }
        )
        del loaded
        path.unlink()
        print(results[-1], flush=True)
    return results


def best_within(
    curve: list[tuple[int, float, float]], budget_ms: float
) -> tuple[int, float, float]:
    """The point of highest recall whose query time fits the budget (else the fastest)."""
    fitting = [point for point in curve if point[2] <= budget_ms]
    return max(fitting, key=lambda p: p[1]) if fitting else min(curve, key=lambda p: p[2])


def _main() -> None:
    library, path, dim = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    import faiss  # noqa: F401  (imported before measuring, as a serving worker has them)
    import usearch.index  # noqa: F401
    import voyager  # noqa: F401

    before = _anonymous_mb()
    started = time.perf_counter()
    index = _load(library, path)
    load_s = time.perf_counter() - started
    search = _searcher(library, index, 200)
    rng = np.random.default_rng(0)
    for query in rng.standard_normal((1000, dim)).astype(np.float32):
        search(query / np.linalg.norm(query))
    print(json.dumps({"load_s": load_s, "worker_mb": _anonymous_mb() - before}))


if __name__ == "__main__":
    _main()
