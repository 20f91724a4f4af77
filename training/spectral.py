"""A spectral branch beside the towers, for sparse logs: the ideal low-pass filter of the
normalised user-item graph (GF-CF; LightGCN's propagation taken to its limit), folded into
the vectors the index serves.

With R the user x item matrix (each pair once, at its events' largest weight) and D_u,
D_i its degrees, the top `rank` right singular vectors V of D_u^-e R D_i^-e (e =
NORMALISATION) give a user the row r_u D_i^-e V and an item the row D_i^g V (g, the
output exponent, chosen on validation); their dot product is the filtered score. GF-CF
takes e = g = 1/2; a lighter normalisation keeps more of the popular items' weight in
the decomposition and a lighter output exponent less of it in the answer, which lifted
validation Recall@20 on the sparse check-in logs by 4-5% (docs/quality.md). A user's
part is normalised
(so a long history does not outweigh the towers) and the item rows are scaled by the
branch's weight, so the served score is tower score + weight x filtered score, one dot
product of the joined vectors, searched by the index like any other. A user's part is a
sum over their items, so a history given at request time (fresh events, an anonymous
session) gets it exactly as a build does. A new item added from its features has no
row (zeros): the towers alone place it.

Why: on sparse logs (a few events per item) item-item structure is what the towers learn
least; on the 100k-event check-in log a default build scores test Recall@20 0.2420 with
the branch against 0.2181 without it and EASE's 0.2206 (`bench.quality_sets`). Rank and
weight are chosen on the build's validation split (weight 0 switches the branch off:
MovieLens-100K keeps its towers)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.linalg
import scipy.sparse as sp

from recsys.core import schema as s

RANKS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # steps of 1.5-2x
NORMALISATIONS = (0.4, 0.5)  # e: D_u^-e R D_i^-e, tried in turn; the first that lifts the
# towers on validation is kept (GF-CF's 0.5 where the lighter one does not: a dense log
# of broad tastes)
NORMALISATION = NORMALISATIONS[0]
OUTPUT_EXPONENTS = (0.3, 0.4, 0.5)  # g: item rows D_i^g V, chosen on validation
OUTPUT_EXPONENT = 0.4  # g where nothing is chosen (ties go to it)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)  # x the ratio of the towers' score spread to the filter's
MAX_ITEMS = 200_000  # past this the truncated SVD's time and the rows' size are not worth it
SPREAD_SAMPLE = 256  # users whose scores set the ratio
# (users + items) x rank^2 at most: the decomposition's dense work grows so (a 1M-event
# log of 66,000 users and items took 133 s for the whole choice at rank 1,024).
MAX_WORK = 8e10


def candidate_ranks(users: int, items: int) -> tuple[int, ...]:
    """The ranks a build tries: below half the matrix's smaller side, within MAX_WORK."""
    return tuple(
        r for r in RANKS if r < min(users, items) // 2 and (users + items) * r * r <= MAX_WORK
    )


@dataclass
class Spectral:
    """The branch of one version: `history_rows` sum to a user's part, `item_rows` (already
    scaled by the weight) are the items' part."""

    history_rows: np.ndarray  # (items, rank)
    item_rows: np.ndarray  # (items, rank)

    @property
    def rank(self) -> int:
        return int(self.item_rows.shape[1])

    def users(self, matrix: sp.csr_matrix) -> np.ndarray:
        """(users, rank) parts of every row of an `interaction_matrix`."""
        return _unit(np.asarray(matrix @ self.history_rows, dtype=np.float32))

    def user(
        self, history: np.ndarray | list[int], weights: np.ndarray | list[float] | None = None
    ) -> np.ndarray:
        """(rank,) the part of a user with these items, each counted once at its events'
        largest weight (`weights`: one per history entry; None: all alike), as
        `interaction_matrix` counts them; unknown items and weight 0 count nothing."""
        items = np.asarray(history, dtype=np.int64)
        w = np.ones(len(items), np.float32) if weights is None else np.asarray(weights, np.float32)
        keep = (items >= 0) & (items < len(self.history_rows)) & (w > 0)
        items, w = items[keep], w[keep]
        if not len(items):
            return np.zeros(self.rank, np.float32)
        unique, slot = np.unique(items, return_inverse=True)
        largest = np.zeros(len(unique), np.float32)
        np.maximum.at(largest, slot, w)
        return _unit((largest @ self.history_rows[unique])[None])[0]

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        # safetensors writes an array's buffer as it lies: a transposed view would be stored
        # in the wrong order.
        rows = {"history_rows": self.history_rows, "item_rows": self.item_rows}
        save_file({k: np.ascontiguousarray(v) for k, v in rows.items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> "Spectral | None":
        """The branch stored at `path`, or None for a version without one."""
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        rows = load_file(str(path))
        return cls(rows["history_rows"], rows["item_rows"])


def stored_rank(path: Path) -> int:
    """The rank of the branch stored at `path` (0 for none), without reading its rows."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as stored:
        return int(stored.get_slice("item_rows").get_shape()[1])


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def interaction_matrix(events: pl.DataFrame, num_users: int, num_items: int) -> sp.csr_matrix:
    """The user x item matrix of a table of events: each pair once, at its events' largest
    weight (a purchase after a view counts as the purchase; weight 0 counts nothing), over
    the user's largest weight. Relative to the user, because the degree normalisation
    scales a row multiplied by c by c^(1 - e) only: one posted user with two items at a
    weight 10 times everyone else's became a component of the decomposition of their own,
    and those items every item's neighbours. A user's part is a unit vector, which the
    scale of their row does not change."""
    if s.WEIGHT not in events.columns:
        events = events.with_columns(pl.lit(1.0, pl.Float32).alias(s.WEIGHT))
    pairs = (
        events.group_by(s.USER_IDX, s.ITEM_IDX)
        .agg(pl.col(s.WEIGHT).max())
        .filter(pl.col(s.WEIGHT) > 0)
        .with_columns(pl.col(s.WEIGHT) / pl.col(s.WEIGHT).max().over(s.USER_IDX))
    )
    matrix = sp.csr_matrix(
        (
            pairs[s.WEIGHT].to_numpy().astype(np.float32),
            (pairs[s.USER_IDX].to_numpy().astype(np.int64), pairs[s.ITEM_IDX].to_numpy()),
        ),
        shape=(num_users, num_items),
    )
    matrix.sort_indices()
    return matrix


def fit(
    matrix: sp.csr_matrix, rank: int, seed: int = 0, output: float = OUTPUT_EXPONENT
) -> Spectral:
    """The unweighted branch of `rank` (clipped below the matrix's smaller side)."""
    return decompose(matrix, rank, seed).branch(rank, output)


@dataclass
class Basis:
    """The top right singular vectors of one normalised matrix: the branch of any smaller
    rank and any output exponent, from one decomposition."""

    vectors: np.ndarray  # (items, largest rank), largest singular value first
    item_degree: np.ndarray  # (items,) at least 1
    normalisation: float = NORMALISATION

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[1])

    def branch(self, rank: int, output: float = OUTPUT_EXPONENT) -> Spectral:
        top = self.vectors[:, : max(1, min(rank, self.rank))]
        return Spectral(
            history_rows=np.ascontiguousarray(
                top * self.item_degree[:, None] ** -self.normalisation
            ),
            item_rows=np.ascontiguousarray(top * self.item_degree[:, None] ** output),
        )


def decompose(
    matrix: sp.csr_matrix,
    rank: int,
    seed: int = 0,
    normalisation: float = NORMALISATION,
    start: Basis | None = None,
) -> Basis:
    """The basis of the largest `rank` (clipped below the matrix's smaller side). `start`,
    a basis of a part of the same matrix (the validation fit's), is where the subspace
    iteration begins instead of a random block: one power iteration from it is as accurate
    as a cold start at its rank."""
    rank = max(1, min(rank, _largest_rank(matrix)))
    if start is not None:
        if start.vectors.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"a basis of {start.vectors.shape[0]} items cannot start one of {matrix.shape[1]}"
            )
        rank = min(rank, start.rank)
    matrix, item_degree = normalised(matrix, normalisation)
    block = None if start is None else start.vectors
    return Basis(top_right_singular_vectors(matrix, rank, seed, block), item_degree, normalisation)


def normalised(
    matrix: sp.csr_matrix, normalisation: float = NORMALISATION
) -> tuple[sp.csr_matrix, np.ndarray]:
    """D_u^-e R D_i^-e, and the item degrees D_i (at least 1)."""
    user_degree = np.asarray(matrix.sum(axis=1)).ravel()
    item_degree = np.asarray(matrix.sum(axis=0)).ravel()
    user_degree = np.where(user_degree > 0, user_degree, 1.0)
    item_degree = np.where(item_degree > 0, item_degree, 1.0).astype(np.float32)
    scaled = sp.diags(user_degree**-normalisation) @ matrix @ sp.diags(item_degree**-normalisation)
    return scaled.tocsr(), item_degree


def _largest_rank(matrix: sp.csr_matrix) -> int:
    return max(1, min(matrix.shape) - 1)


POWER_ITERATIONS = 4
WARM_POWER_ITERATIONS = 1  # from a basis of 80% of the same matrix: validation recall
# 0.2187 against 0.2188 cold at that basis's rank, in 28 s against 45 (1M-event check-in
# log, rank 512 of a 1,024 basis; docs/quality.md)
OVERSAMPLE = 32


def top_right_singular_vectors(
    matrix: sp.csr_matrix, rank: int, seed: int = 0, start: np.ndarray | None = None
) -> np.ndarray:
    """(columns, rank) the top right singular vectors, largest first, by randomised
    subspace iteration (Halko, Martinsson and Tropp 2011): a few sparse products with a
    block of rank + OVERSAMPLE vectors instead of ARPACK's one vector at a time, which
    took minutes at rank 256 on a 36,706-item log. In float32: the filter needs the
    subspace, not digits. `start` (columns, width >= rank): the block to begin from, in
    place of a random one and most of the power iterations.

    The trailing vectors of a block are the least accurate, and a branch's validated
    quality is that of the block it was chosen from: on the 1M-event check-in log rank 512
    cut from a basis of 1,024 scored validation Recall@20 0.2188, and a basis of 512 alone
    0.2140."""
    matrix = matrix.astype(np.float32)
    if start is None:
        width = min(rank + OVERSAMPLE, min(matrix.shape))
        rng = np.random.default_rng(seed)
        block = rng.standard_normal((matrix.shape[1], width), np.float32)
        power_iterations = POWER_ITERATIONS
    else:
        block, power_iterations = start.astype(np.float32), WARM_POWER_ITERATIONS
    basis = _orthonormal(matrix @ block)
    for _ in range(power_iterations):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    basis, _ = np.linalg.qr(basis)  # exactly orthonormal before the small SVD
    projected = np.asarray((matrix.T @ basis).T)  # (width, columns)
    _, _, vt = np.linalg.svd(projected, full_matrices=False)
    return np.ascontiguousarray(vt[:rank].T, dtype=np.float32)


def _orthonormal(block: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning `block`'s, by Cholesky QR: one Gram product and one
    triangular solve, half the time of Householder QR on the 1M-event check-in log's
    36,706 x 1,056 blocks (the rank-1,024 decomposition: 47 s against 102 s, the same
    validation recall). Householder where the Gram matrix is not positive definite."""
    gram = block.T.astype(np.float64) @ block.astype(np.float64)
    try:
        lower = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return np.linalg.qr(block)[0].astype(np.float32)
    solved = scipy.linalg.solve_triangular(lower, block.T.astype(np.float64), lower=True)
    return np.ascontiguousarray(solved.T, dtype=np.float32)


def weighted(branch: Spectral, weight: float) -> Spectral:
    return Spectral(branch.history_rows, (branch.item_rows * weight).astype(np.float32))


def score_ratio(tower_scores: np.ndarray, branch_scores: np.ndarray) -> float:
    """How much wider the towers' scores spread than the filter's, on the same users."""
    spread = float(np.std(branch_scores))
    return float(np.std(tower_scores)) / spread if spread > 0 else 0.0
