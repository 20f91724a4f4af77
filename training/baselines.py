"""Peers measured on the same split by the same evaluation: popularity, EASE, and
implicit's ALS and BPR. Each is a `training.evaluate.Scorer`."""

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.history import UserHistories
from features.jagged import ranges
from recsys.core import schema as s


def interaction_matrix(events: pl.DataFrame, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary users x items matrix of the given events."""
    users = events[s.USER_IDX].to_numpy().astype(np.int64)
    items = events[s.ITEM_IDX].to_numpy().astype(np.int64)
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(num_users, num_items)
    )
    matrix.data[:] = 1.0  # repeated (user, item) pairs count once
    return matrix


def history_matrix(histories: UserHistories, users: np.ndarray, num_items: int) -> sp.csr_matrix:
    """Each query user's items in `histories`, as a binary (Q, items) matrix."""
    starts = histories.offsets[users]
    lengths = histories.offsets[users + 1] - starts
    items = histories.items[ranges(starts, lengths)]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    matrix = sp.csr_matrix(
        (np.ones(len(items), np.float32), items, indptr), shape=(len(users), num_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


@dataclass
class Popularity:
    counts: np.ndarray

    @classmethod
    def fit(cls, events: pl.DataFrame, num_items: int) -> "Popularity":
        counts = np.bincount(events[s.ITEM_IDX].to_numpy(), minlength=num_items).astype(np.float32)
        return cls(counts)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))


@dataclass
class Ease:
    """EASE (Steck, WWW 2019): a closed-form item-item model; strong on small catalogues."""

    weights: np.ndarray  # (I, I)
    histories: UserHistories

    MAX_ITEMS = 30_000  # an (I x I) dense inverse beyond this does not fit a small machine

    @classmethod
    def fit(
        cls,
        events: pl.DataFrame,
        histories: UserHistories,
        num_users: int,
        num_items: int,
        l2: float,
    ) -> "Ease":
        x = interaction_matrix(events, num_users, num_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices(num_items)] += l2
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        weights[np.diag_indices(num_items)] = 0.0
        return cls(weights.astype(np.float32), histories)

    def scores(self, users: np.ndarray) -> np.ndarray:
        x = history_matrix(self.histories, users, len(self.weights))
        return np.asarray(x @ self.weights)


@dataclass
class MatrixFactorization:
    """Scores = user factors . item factors, from implicit's ALS or BPR."""

    user_factors: np.ndarray
    item_factors: np.ndarray

    @classmethod
    def als(
        cls,
        events: pl.DataFrame,
        num_users: int,
        num_items: int,
        factors: int,
        regularization: float,
        iterations: int,
        alpha: float,
        seed: int = 0,
    ) -> "MatrixFactorization":
        from implicit.cpu.als import AlternatingLeastSquares

        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            alpha=alpha,
            random_state=seed,
            calculate_training_loss=False,
        )
        model.fit(interaction_matrix(events, num_users, num_items), show_progress=False)
        return cls(np.asarray(model.user_factors), np.asarray(model.item_factors))

    @classmethod
    def bpr(
        cls,
        events: pl.DataFrame,
        num_users: int,
        num_items: int,
        factors: int,
        learning_rate: float,
        regularization: float,
        iterations: int,
        seed: int = 0,
    ) -> "MatrixFactorization":
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(
            factors=factors,
            learning_rate=learning_rate,
            regularization=regularization,
            iterations=iterations,
            random_state=seed,
        )
        model.fit(interaction_matrix(events, num_users, num_items), show_progress=False)
        return cls(np.asarray(model.user_factors), np.asarray(model.item_factors))

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


@dataclass
class ItemKnn:
    """Item-based k-nearest neighbours (Sarwar et al. 2001; Deshpande & Karypis 2004):
    cosine similarity of items' user sets, each item keeping its `neighbours` most similar
    items; a user's score for an item sums its similarities to the user's items."""

    similarity: sp.csr_matrix  # (I, I), row i: the neighbours of item i
    histories: UserHistories

    @classmethod
    def fit(
        cls,
        events: pl.DataFrame,
        histories: UserHistories,
        num_users: int,
        num_items: int,
        neighbours: int,
        shrink: float = 0.0,
    ) -> "ItemKnn":
        x = interaction_matrix(events, num_users, num_items).tocsc()
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # (I,) binary: sqrt(count)
        rows, cols, vals = [], [], []
        chunk = max(1, (1 << 24) // max(1, num_items))
        for start in range(0, num_items, chunk):
            block = slice(start, min(start + chunk, num_items))
            co = (x[:, block].T @ x).toarray()  # (C, I) co-occurrence counts
            sim = co / (np.outer(norms[block], norms) + shrink + 1e-12)
            sim[np.arange(sim.shape[0]), np.arange(block.start, block.stop)] = 0.0
            k = min(neighbours, num_items - 1) if num_items > 1 else 0
            if k <= 0:
                continue
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            rows.append(np.repeat(np.arange(block.start, block.stop), k))
            cols.append(top.ravel())
            vals.append(np.take_along_axis(sim, top, axis=1).ravel())
        similarity = sp.csr_matrix(
            (
                np.concatenate(vals) if vals else np.zeros(0, np.float32),
                (
                    np.concatenate(rows) if rows else np.zeros(0, np.int64),
                    np.concatenate(cols) if cols else np.zeros(0, np.int64),
                ),
            ),
            shape=(num_items, num_items),
            dtype=np.float32,
        )
        return cls(similarity, histories)

    def scores(self, users: np.ndarray) -> np.ndarray:
        x = history_matrix(self.histories, users, self.similarity.shape[0])
        return np.asarray((x @ self.similarity).toarray())
