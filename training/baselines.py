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
    """EASE (Steck, WWW 2019): a closed-form item-item model, the strongest peer on every
    log it ran on. Solved in float32 through a Cholesky factorisation in place (LAPACK
    spotrf + spotri): one items x items matrix in memory (6.4 GB at 40,000 items) and a
    seventh of the time of a float64 inverse (6,000 items: 1.1 s against 7.1 s here)."""

    weights: np.ndarray  # (I, I)
    histories: UserHistories

    MEMORY_SHARE = 0.8  # of the memory available now that the matrix may take

    @classmethod
    def needed_bytes(cls, num_items: int) -> int:
        return 4 * num_items * num_items

    @classmethod
    def fits(cls, num_items: int) -> str | None:
        """None if the items x items matrix fits in memory now, else why not."""
        import psutil

        needed = cls.needed_bytes(num_items)
        available = psutil.virtual_memory().available
        if needed <= cls.MEMORY_SHARE * available:
            return None
        return (
            f"{num_items:,} items need a {needed / 1e9:.1f} GB matrix; "
            f"{available / 1e9:.1f} GB of memory is available"
        )

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
        gram = np.asarray((x.T @ x).toarray(), dtype=np.float32)  # (I, I)
        return cls(ease_weights(gram, l2), histories)

    def scores(self, users: np.ndarray) -> np.ndarray:
        x = history_matrix(self.histories, users, len(self.weights))
        return np.asarray(x @ self.weights)


def ease_weights(gram: np.ndarray, l2: float, block: int = 2048) -> np.ndarray:
    """B = I - P diag(1 / diag(P)) with P = (G + l2 I)^-1 and a zero diagonal, computed in
    `gram`'s own memory (it is overwritten and returned; `block` rows at a time)."""
    from scipy.linalg import lapack

    items = len(gram)
    gram[np.diag_indices(items)] += l2
    factor, info = lapack.spotrf(gram, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise ValueError(f"the Gram matrix is not positive definite (spotrf: {info})")
    inverse, info = lapack.spotri(factor, lower=0, overwrite_c=1)  # upper triangle only
    if info != 0:
        raise ValueError(f"the Gram matrix cannot be inverted (spotri: {info})")
    for start in range(0, items, block):  # mirror the upper triangle, a block at a time
        stop = min(items, start + block)
        inverse[start:stop, :start] = inverse[:start, start:stop].T
        rows = inverse[start:stop, start:stop]
        rows[np.tril_indices(stop - start, -1)] = rows.T[np.tril_indices(stop - start, -1)]
    diagonal = np.diag(inverse).copy()
    inverse /= -diagonal[None, :]
    inverse[np.diag_indices(items)] = 0.0
    return inverse


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
