"""User and item embeddings of a trained model, computed in one process with the
unsharded towers, in chunks."""

from collections.abc import Callable

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from features.feature_set import FeatureSet
from training.batches import BatchBuilder
from training.evaluate import Scorer
from training.spectral import Spectral, interaction_matrix

Tower = Callable[[KeyedJaggedTensor], tuple[torch.Tensor, torch.Tensor]]  # TwoTower or its DMP

CHUNK = 8192


def _embed(
    model: Tower,
    make: Callable[[np.ndarray], KeyedJaggedTensor],
    ids: np.ndarray,
    side: int,
    device: torch.device | None = None,
    chunks: int = 0,
) -> np.ndarray:
    """Embeddings in chunks of CHUNK ids. A sharded model needs every rank to run the same
    number of forward passes: `chunks` pads with passes over the first id, discarded."""
    parts = []
    device = device or torch.device("cpu")
    starts = range(0, len(ids), CHUNK)
    with torch.no_grad():
        for start in starts:
            parts.append(model(make(ids[start : start + CHUNK]).to(device))[side].cpu().numpy())
        for _ in range(chunks - len(starts)):
            model(make(ids[:1] if len(ids) else np.zeros(1, np.int64)).to(device))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def item_embeddings(
    model: Tower, builder: BatchBuilder, num_items: int, device: torch.device | None = None
) -> np.ndarray:
    return _embed(model, builder.items, np.arange(num_items), 1, device)  # (I, D)


def user_embeddings_now(
    model: Tower,
    builder: BatchBuilder,
    users: np.ndarray,
    device: torch.device | None = None,
    chunks: int = 0,
) -> np.ndarray:
    """Users as they are in the builder's histories (all their events there)."""
    return _embed(model, builder.users_now, users, 0, device, chunks)  # (U, D)


def chunks_needed(count: int) -> int:
    return -(-count // CHUNK)


class PrecomputedScorer:
    """`training.evaluate.Scorer` over user embeddings computed up front for known users
    (all collective work done before scoring, which then runs locally on each rank)."""

    def __init__(self, users: np.ndarray, user_emb: np.ndarray, item_emb: np.ndarray) -> None:
        self.order = np.argsort(users, kind="stable")
        self.users, self.user_emb, self.item_emb = users[self.order], user_emb, item_emb

    def scores(self, users: np.ndarray) -> np.ndarray:
        where = self.order[np.searchsorted(self.users, users)]
        return self.user_emb[where] @ self.item_emb.T


class TowerScorer:
    """`training.evaluate.Scorer` for a model: users as they are in the builder's
    histories, against all items.

    `catalogue` larger than `num_items` scores an older model on a grown catalogue: the
    items it does not know get -inf, as it could never recommend them."""

    def __init__(
        self, model: Tower, builder: BatchBuilder, num_items: int, catalogue: int | None = None
    ) -> None:
        self.model, self.builder = model, builder
        self.item_emb = item_embeddings(model, builder, num_items)  # (I, D)
        self.missing = max(0, (catalogue or num_items) - num_items)

    def scores(self, users: np.ndarray) -> np.ndarray:
        scores = user_embeddings_now(self.model, self.builder, users) @ self.item_emb.T
        if self.missing:
            scores = np.pad(scores, ((0, 0), (0, self.missing)), constant_values=-np.inf)
        return scores


class BranchedScorer:
    """A tower scorer plus a version's spectral branch (`training.spectral`): the served
    vectors' scores. Users' parts come from their events in `features` (which may be a
    grown log: items the branch does not know add nothing, and keep the towers' -inf)."""

    def __init__(self, towers: Scorer, branch: Spectral, features: FeatureSet) -> None:
        known = len(branch.item_rows)
        matrix = interaction_matrix(features.interactions, features.num_users, features.num_items)
        self.towers, self.branch = towers, branch
        self.matrix = matrix[:, :known]
        self.item_rows = np.pad(branch.item_rows, ((0, max(0, features.num_items - known)), (0, 0)))

    def scores(self, users: np.ndarray) -> np.ndarray:
        parts = self.branch.users(self.matrix[users])
        return self.towers.scores(users) + parts @ self.item_rows.T
