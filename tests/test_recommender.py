"""Batch answers and the popularity fallback give what a full sort would."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.jagged import CsrBags
from serving import recommender as recommender_module
from serving.index import AnnoyRetriever, ExactRetriever, IndexTargets, build_annoy
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


def _brute_force(rec: Recommender, k: int) -> dict[int, list[int]]:
    """Each user's best k unseen, unhidden items by a full sort (ties: lower index)."""
    scores = rec.user_emb @ rec.item_emb.T
    answers = {}
    for u in range(len(rec.user_emb)):
        seen = rec.seen.values[rec.seen.offsets[u] : rec.seen.offsets[u + 1]]
        allowed = np.ones(len(rec.item_emb), dtype=bool)
        allowed[seen] = False
        if rec.hidden is not None:
            allowed &= ~rec.hidden
        ids = np.flatnonzero(allowed)
        answers[u] = ids[np.lexsort((ids, -scores[u, ids]))][:k].tolist()
    return answers


def test_batch_answers_are_exact_even_where_the_index_misses(tmp_path: Path, monkeypatch):
    """`recsys recommend` scores a catalogue of this size exactly, a block of users at a
    time: before, each user went through the version's index, and an index that misses
    true top items (one tree, narrow search) returned worse lists than the model's own."""
    rng = np.random.default_rng(3)
    users, items, dim = 40, 3_000, 16
    item_emb = rng.normal(size=(items, dim)).astype(np.float32)
    user_emb = rng.normal(size=(users, dim)).astype(np.float32)
    build_annoy(item_emb, user_emb, tmp_path, "dot", IndexTargets(recall_at_100=0.0), n_trees=1)
    retriever = AnnoyRetriever.load(tmp_path, item_emb)
    seen = [
        rng.choice(items, size=int(rng.integers(0, 50)), replace=False).tolist()
        for _ in range(users)
    ]
    seen[0] = [i for i in range(items) if i not in (5, 14, 2_999)]  # 14 is hidden
    rec = Recommender(
        version="v",
        user_ids=pl.Series(range(users)),
        item_ids=pl.Series(range(items)),
        user_emb=user_emb,
        item_emb=item_emb,
        seen=CsrBags.from_lists(pl.Series(seen)),
        histories=CsrBags.from_lists(pl.Series(seen)),
        history_weights=np.ones(sum(map(len, seen)), dtype=np.float32),
        popularity=np.ones(items, dtype=np.float32),
        retriever=retriever,
    )
    rec.hide([str(i) for i in range(0, items, 7)])
    monkeypatch.setattr(
        recommender_module, "BLOCK_SCORES", 7 * items, raising=False
    )  # blocks of 7 users
    k = 20
    table = rec.for_users(np.arange(users), k)
    expected = _brute_force(rec, k)
    got = table.group_by("user_idx", maintain_order=True).agg("item_idx", "rank")
    assert got.height == users
    for u, ids, ranks in got.iter_rows():
        assert ids == expected[u]
        assert ranks == list(range(1, len(ids) + 1))
    assert sorted(expected[0]) == [5, 2_999]  # fewer than k left to this user
    # The service's path (one user through the index) finds them too: the index, asked
    # for every item, returned too few, and the user got an empty list.
    ids, _ = rec.for_vector(user_emb[0], np.array(seen[0]), k, rec.hidden)
    assert ids.tolist() == expected[0]
    scores = table.filter(pl.col("user_idx") == 1)["score"].to_numpy()
    np.testing.assert_allclose(
        scores, np.sort(user_emb[1] @ item_emb[expected[1]].T)[::-1], rtol=1e-5
    )


@pytest.mark.parametrize("k", [1, 5])
def test_batch_answers_of_a_user_with_nothing_left_are_empty(k: int):
    rec = recommender(np.ones(4))
    rec.seen = CsrBags.from_lists(pl.Series([[0, 1, 2, 3]]))
    assert rec.for_users(np.array([0]), k).height == 0
