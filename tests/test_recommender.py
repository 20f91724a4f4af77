"""The popularity fallback: the precomputed order gives what a full sort would."""

import numpy as np
import polars as pl

from features.jagged import CsrBags
from serving.index import ExactRetriever
from serving.recommender import Recommender


def recommender(popularity: np.ndarray) -> Recommender:
    items = len(popularity)
    emb = np.eye(items, 4, dtype=np.float32)
    return Recommender(
        version="v",
        user_ids=pl.Series([1]),
        item_ids=pl.Series(range(items)),
        user_emb=emb[:1],
        item_emb=emb,
        seen=CsrBags.from_lists(pl.Series([[0]])),
        histories=CsrBags.from_lists(pl.Series([[0]])),
        history_weights=np.ones(1, dtype=np.float32),
        popularity=popularity.astype(np.float32),
        retriever=ExactRetriever(emb),
    )


def test_popular_items_skip_excluded_ones_and_keep_the_full_sort_order():
    rng = np.random.default_rng(0)
    popularity = rng.integers(0, 5, size=200)  # many ties
    rec = recommender(popularity)
    full_order = np.argsort(-popularity.astype(np.float32), kind="stable")
    for k in (1, 10, 150, 200):
        exclude = rng.choice(200, size=int(rng.integers(0, 60)), replace=False)
        items, counts = rec.popular(exclude, k)
        expected = full_order[~np.isin(full_order, exclude)][:k]
        np.testing.assert_array_equal(items, expected)
        np.testing.assert_array_equal(counts, popularity[expected])
        assert len(items) == min(k, 200 - len(exclude))
