"""User and item embeddings of a trained model, computed in one process with the
unsharded towers, in chunks."""

from collections.abc import Callable

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from training.batches import BatchBuilder

Tower = Callable[[KeyedJaggedTensor], tuple[torch.Tensor, torch.Tensor]]  # TwoTower or its DMP

CHUNK = 8192


def _embed(
    model: Tower, make: Callable[[np.ndarray], KeyedJaggedTensor], ids: np.ndarray, side: int
) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for start in range(0, len(ids), CHUNK):
            parts.append(model(make(ids[start : start + CHUNK]))[side].numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def item_embeddings(model: Tower, builder: BatchBuilder, num_items: int) -> np.ndarray:
    return _embed(model, builder.items, np.arange(num_items), side=1)  # (I, D)


def user_embeddings_now(model: Tower, builder: BatchBuilder, users: np.ndarray) -> np.ndarray:
    return _embed(model, builder.users_now, users, side=0)  # (U, D)


def user_embeddings_before(model: Tower, builder: BatchBuilder, rows: np.ndarray) -> np.ndarray:
    return _embed(model, builder.users_before, rows, side=0)  # (Q, D)


class TowerScorer:
    """`training.evaluate.Scorer` for a model: users as of a row against all items.

    `catalogue` larger than `num_items` scores an older model on a grown catalogue: the
    items it does not know get -inf, as it could never recommend them."""

    def __init__(
        self, model: Tower, builder: BatchBuilder, num_items: int, catalogue: int | None = None
    ) -> None:
        self.model, self.builder = model, builder
        self.item_emb = item_embeddings(model, builder, num_items)  # (I, D)
        self.missing = max(0, (catalogue or num_items) - num_items)

    def scores(self, users: np.ndarray, rows: np.ndarray) -> np.ndarray:
        scores = user_embeddings_before(self.model, self.builder, rows) @ self.item_emb.T
        if self.missing:
            scores = np.pad(scores, ((0, 0), (0, self.missing)), constant_values=-np.inf)
        return scores
