"""Index tuning: tie-aware recall against exact search, and the search budget."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serving import index as index_module
from serving.index import (
    AnnoyRetriever,
    ExactRetriever,
    IndexParams,
    IndexTargets,
    build_annoy,
    kth_best_scores,
    load_retriever,
    recall_against_exact,
    recall_at_k,
    serving_backend,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_recall_counts_any_item_tied_with_the_kth_best_as_correct():
    rng = np.random.default_rng(0)
    # 30 copies of one vector: any 10 of them are a correct top-10.
    items = unit(np.vstack([np.tile(rng.normal(size=(1, 8)), (30, 1)), rng.normal(size=(50, 8))]))
    query = items[:1]

    class ReversedTies:
        item_emb = items

        def search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.arange(29, 29 - n, -1)  # other copies than exact search picks
            return ids, items[ids] @ q

    assert recall_at_k(ReversedTies(), query, kth_best_scores(items, query, 10), k=10) == 1.0


def test_exact_search_has_recall_one_and_kth_scores_are_exact():
    rng = np.random.default_rng(1)
    items, queries = unit(rng.normal(size=(500, 16))), unit(rng.normal(size=(20, 16)))
    kth = kth_best_scores(items, queries, 7)
    np.testing.assert_allclose(kth, np.sort(queries @ items.T, axis=1)[:, -7], rtol=1e-6)
    assert recall_against_exact(ExactRetriever(items), ExactRetriever(items), queries, 7) == 1.0


def exact_search_over_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a huge catalogue: exact search slower than any query budget, so Annoy serves
    and is tuned to its target (test catalogues are small enough to scan faster)."""
    monkeypatch.setattr(index_module, "_exact_query_ms", lambda item_emb, queries: 1e6)


def test_tuning_reaches_the_target_and_records_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    exact_search_over_budget(monkeypatch)
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 16))
    items = unit(centres[rng.integers(0, 20, 5000)] + 0.3 * rng.normal(size=(5000, 16)))
    queries = unit(centres[rng.integers(0, 20, 200)] + 0.3 * rng.normal(size=(200, 16)))
    params = build_annoy(items, queries, tmp_path, "angular")
    assert params.recall_at_100 >= 0.95 and params.query_ms > 0 and params.backend == "annoy"
    loaded = AnnoyRetriever.load(tmp_path, items)
    assert recall_against_exact(loaded, ExactRetriever(items), queries) >= 0.9


def test_a_tight_query_budget_stops_widening_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    exact_search_over_budget(monkeypatch)
    rng = np.random.default_rng(3)
    items, queries = unit(rng.normal(size=(3000, 32))), unit(rng.normal(size=(100, 32)))
    tight = build_annoy(items, queries, tmp_path, "angular", IndexTargets(0.999, 1e-6), n_trees=10)
    assert tight.search_k == 100 * 10  # the first setting; nothing wider fits the budget
    assert tight.recall_at_100 < 0.999


def test_exact_search_serves_where_it_fits_the_budget_and_annoy_misses_the_target():
    """A 36,706-item catalogue served Annoy at recall@100 0.78 in 1.6 ms, exact search
    taking 2.2 of the 2.5 ms allowed: exact (recall 1.0) must serve there."""
    targets = IndexTargets(recall_at_100=0.95, max_query_ms=2.5)
    measured = IndexParams("angular", 256, 120, 24000, 0.78, 3.7, query_ms=1.58, exact_query_ms=2.2)
    assert serving_backend(measured, targets) == "exact"
    # Annoy serves where it meets the target faster, or where exact is over budget too.
    assert serving_backend(replace(measured, recall_at_100=0.96), targets) == "annoy"
    assert serving_backend(replace(measured, exact_query_ms=9.0), targets) == "annoy"
    assert serving_backend(replace(measured, exact_query_ms=1.0), targets) == "exact"


def test_a_catalogue_exact_search_scans_within_budget_stops_the_annoy_search_there(
    tmp_path: Path,
):
    rng = np.random.default_rng(5)
    items, queries = unit(rng.normal(size=(3000, 32))), unit(rng.normal(size=(100, 32)))
    params = build_annoy(items, queries, tmp_path, "angular", IndexTargets(0.999, 1000.0))
    # Diffuse vectors: Annoy cannot reach 0.999 faster than a scan of 3,000 rows.
    assert params.backend == "exact" and params.exact_query_ms < 1000.0
    # The search stopped where Annoy got slower than the scan: no wider setting kept.
    assert params.search_k == 100 * params.n_trees or params.query_ms <= params.exact_query_ms
    served = load_retriever(tmp_path, items)
    assert recall_against_exact(served, ExactRetriever(items), queries) == 1.0
