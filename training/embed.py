"""User and item embeddings of a trained model, computed in one process with the
unsharded towers, in chunks."""

from collections.abc import Callable

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from training.batches import BatchBuilder
from training.model import TwoTower

CHUNK = 8192


def _embed(
    model: TwoTower, make: Callable[[np.ndarray], KeyedJaggedTensor], ids: np.ndarray, side: int
) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for start in range(0, len(ids), CHUNK):
            parts.append(model(make(ids[start : start + CHUNK]))[side].numpy())
    dim = model.spec.tower.embedding_dim
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def item_embeddings(model: TwoTower, builder: BatchBuilder, num_items: int) -> np.ndarray:
    return _embed(model, builder.items, np.arange(num_items), side=1)  # (I, D)


def user_embeddings_now(model: TwoTower, builder: BatchBuilder, users: np.ndarray) -> np.ndarray:
    return _embed(model, builder.users_now, users, side=0)  # (U, D)


def user_embeddings_before(model: TwoTower, builder: BatchBuilder, rows: np.ndarray) -> np.ndarray:
    return _embed(model, builder.users_before, rows, side=0)  # (Q, D)
