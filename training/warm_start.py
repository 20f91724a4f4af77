"""Warm start: a rebuild on a grown log starts from the current version's weights.

Vocabularies are append-only, so a known user, item or category keeps its row index from
one version to the next: its embedding row is copied over, new rows keep their fresh
initialisation, and the MLPs start where they were. This works whatever the sharding,
because each rank copies the rows of its own shards."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from training.config import legacy_keys
from training.model import ModelSpec
from training.parallel import ParallelModel


def warm_start_problem(previous: ModelSpec, spec: ModelSpec) -> str | None:
    """Why `previous` weights cannot seed a model of `spec`, or None when they can."""
    if previous.tower != spec.tower:
        return "the tower settings changed"
    for side, old, new in (
        ("user", previous.user_categories, spec.user_categories),
        ("item", previous.item_categories, spec.item_categories),
    ):
        if list(old) != list(new):
            return f"the {side} feature columns changed ({list(old)} -> {list(new)})"
    old_rows, new_rows = previous.table_rows(), spec.table_rows()
    shrunk = [key for key, rows in old_rows.items() if rows > new_rows[key]]
    if shrunk:
        return f"vocabularies shrank ({', '.join(shrunk)}): not a grown log of the same data"
    return None


@dataclass
class WarmStart:
    """A previous version's weights and its embedding optimizer's per-row state (empty
    for versions saved without it)."""

    weights: dict[str, Tensor]
    row_state: dict[str, Tensor]


def _copy_rows(value: Any, saved: Tensor) -> None:
    """Copy the leading rows of `saved` into each local shard of a sharded state entry."""
    for shard in value.local_shards():
        row = shard.metadata.shard_offsets[0]
        rows = shard.tensor.shape[0]
        take = max(0, min(rows, saved.shape[0] - row))
        if shard.tensor.dim() == 1:
            shard.tensor[:take].copy_(saved[row : row + take])
        else:
            col, cols = shard.metadata.shard_offsets[1], shard.tensor.shape[1]
            shard.tensor[:take].copy_(saved[row : row + take, col : col + cols])


def apply_warm_start(parallel: ParallelModel, warm: WarmStart) -> int:
    """Copy the previous model's weights (and per-row optimizer state) into a freshly built
    one; returns how many parameter tensors were seeded. Dense optimizer state starts fresh
    (with its learning-rate warm-up)."""
    model_state = parallel.model.state_dict()
    seeded = 0
    for key, value in model_state.items():
        saved = warm.weights.get(key.removeprefix("module."))
        if saved is None:
            continue
        if hasattr(value, "local_shards"):
            _copy_rows(value, saved)
        elif value.shape == saved.shape:
            value.copy_(saved)
        else:
            continue
        seeded += 1
    parallel.model.load_state_dict(model_state)
    fused = parallel.model.fused_optimizer
    fused_state = fused.state_dict()
    for entries in fused_state["state"].values():
        for name, value in entries.items():
            if name in warm.row_state and hasattr(value, "local_shards"):
                _copy_rows(value, warm.row_state[name])
    fused.load_state_dict(fused_state)
    return seeded


def load_warm_start(model_dir: Path, weights: str, row_state: str) -> WarmStart:
    """A saved version's weights and (when saved) its per-row optimizer state."""
    rows = model_dir / row_state
    return WarmStart(
        legacy_keys(load_file(str(model_dir / weights))),
        load_file(str(rows)) if rows.is_file() else {},
    )
