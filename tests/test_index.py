"""Index tuning: tie-aware recall against exact search, and the search budget."""

from pathlib import Path

import numpy as np

from serving.index import (
    AnnoyRetriever,
    ExactRetriever,
    IndexTargets,
    build_annoy,
    kth_best_scores,
    recall_against_exact,
    recall_at_k,
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


def test_tuning_reaches_the_target_and_records_what_it_measured(tmp_path: Path):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 16))
    items = unit(centres[rng.integers(0, 20, 5000)] + 0.3 * rng.normal(size=(5000, 16)))
    queries = unit(centres[rng.integers(0, 20, 200)] + 0.3 * rng.normal(size=(200, 16)))
    params = build_annoy(items, queries, tmp_path, "angular")
    assert params.recall_at_100 >= 0.95 and params.query_ms > 0
    loaded = AnnoyRetriever.load(tmp_path, items)
    assert recall_against_exact(loaded, ExactRetriever(items), queries) >= 0.9


def test_a_tight_query_budget_stops_widening_the_search(tmp_path: Path):
    rng = np.random.default_rng(3)
    items, queries = unit(rng.normal(size=(3000, 32))), unit(rng.normal(size=(100, 32)))
    tight = build_annoy(items, queries, tmp_path, "angular", IndexTargets(0.999, 1e-6), n_trees=10)
    assert tight.search_k == 100 * 10  # the first setting; nothing wider fits the budget
    assert tight.recall_at_100 < 0.999
