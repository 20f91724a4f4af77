"""Ranking metrics against hand-computed values, and seen-item exclusion."""

import math

import numpy as np
import polars as pl
import pytest

from features.history import UserHistories
from features.jagged import CsrBags
from features.splits import leave_last_out
from training.evaluate import eval_task, evaluate, ranking_metrics, sample_task, top_k_unseen


def bags(lists: list[list[int]]) -> CsrBags:
    return CsrBags.from_lists(pl.Series(lists, dtype=pl.List(pl.Int64)))


def test_metrics_by_hand():
    top = np.array([[5, 1, 2, 3], [9, 8, 7, 6]])
    targets = bags([[1, 3], [4]])
    metrics = ranking_metrics(top, targets, ks=(2, 4))
    assert metrics["hit_rate@2"] == 0.5 and metrics["hit_rate@4"] == 0.5
    assert metrics["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["recall@4"] == pytest.approx((2 / 2 + 0) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert metrics["ndcg@4"] == pytest.approx((dcg / idcg + 0) / 2)


def test_seen_items_are_never_ranked():
    scores = np.array([[9.0, 8.0, 7.0, 6.0]])
    top = top_k_unseen(scores, bags([[0, 2]]), np.array([0]), 2)
    assert top.tolist() == [[1, 3]]


class Oracle:
    """Scores each query's held-out items highest: every metric must be 1."""

    def __init__(self, held_out: pl.DataFrame, num_items: int) -> None:
        self.held_out, self.num_items = held_out, num_items

    def scores(self, users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), self.num_items), dtype=np.float32)
        for q, user in enumerate(users.tolist()):
            out[q, self.held_out.filter(pl.col("user_idx") == user)["item_idx"].to_list()] = 1.0
        return out


def test_full_evaluation_of_a_perfect_scorer_and_repeat_items():
    log = pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 1, 1, 1],
            "item_idx": [1, 2, 3, 4, 5, 4],
            "timestamp": [1, 2, 3, 1, 2, 3],
        },
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32, "timestamp": pl.Int64},
    )
    split = leave_last_out(log)
    known = UserHistories.from_interactions(split.train, 2)
    task = eval_task(split.test, known)
    # User 1's held-out item 4 was already seen: it cannot be recommended, so no query.
    assert task.users.tolist() == [0]
    assert task.seen.values.tolist() == [1, 2]  # the training events, never the held-out one
    metrics = evaluate(Oracle(split.test, 6), task, ks=(1, 2))
    assert metrics["hit_rate@1"] == 1.0 and metrics["ndcg@2"] == 1.0
    assert len(sample_task(task, 1)) == 1


def test_ranking_and_metrics_match_a_plain_per_query_reference():
    """The vectorised top-k (torch.topk) and hit lookup against sorting and Python sets,
    query by query, on random scores with seen items and targets of every size."""
    rng = np.random.default_rng(4)
    queries, items, k = 60, 300, 50
    scores = rng.normal(size=(queries, items)).astype(np.float32)
    seen_lists = [
        rng.choice(items, rng.integers(0, 40), replace=False).tolist() for _ in range(queries)
    ]
    target_lists = [
        rng.choice(items, rng.integers(1, 30), replace=False).tolist() for _ in range(queries)
    ]
    top = top_k_unseen(scores, bags(seen_lists), np.arange(queries), k)
    metrics = ranking_metrics(top, bags(target_lists), ks=(5, 50))
    expected: dict[str, list[float]] = {}
    for q in range(queries):
        ranked = [
            i for i in np.argsort(-scores[q], kind="stable").tolist() if i not in seen_lists[q]
        ]
        assert top[q].tolist() == ranked[:k]
        for cut in (5, 50):
            found = [i in set(target_lists[q]) for i in ranked[:cut]]
            dcg = sum(1 / math.log2(r + 2) for r, hit in enumerate(found) if hit)
            ideal = sum(1 / math.log2(r + 2) for r in range(min(cut, len(target_lists[q]))))
            expected.setdefault(f"recall@{cut}", []).append(sum(found) / len(target_lists[q]))
            expected.setdefault(f"hit_rate@{cut}", []).append(float(any(found)))
            expected.setdefault(f"ndcg@{cut}", []).append(dcg / ideal)
    for name, values in expected.items():
        assert metrics[name] == pytest.approx(float(np.mean(values)), abs=1e-12), name
