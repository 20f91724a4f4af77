"""Training checkpoints in safetensors (no pickle): each rank saves the tensors it holds
(local shards of sharded tables, dense weights, optimizer state) and the trainer's
counters go to JSON. Resuming copies them back into a model built with the same plan."""

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from recsys.core.artifacts import atomic_path
from recsys.core.errors import ArtifactError
from training.parallel import ParallelModel

TRAINER_STATE = "trainer.json"


def _local(value: Any) -> Tensor | None:
    """The tensor this rank holds for a state entry (a shard for sharded tables)."""
    if hasattr(value, "local_shards"):
        shards = value.local_shards()
        return shards[0].tensor if shards else None
    return value if isinstance(value, Tensor) else None


def _flatten(parallel: ParallelModel) -> dict[str, Tensor]:
    model_state = parallel.model.state_dict()
    flat = {f"model/{k}": t for k, v in model_state.items() if (t := _local(v)) is not None}
    for param, entries in parallel.model.fused_optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if (tensor := _local(value)) is not None:
                flat[f"fused/{param}/{name}"] = tensor
    for index, entries in parallel.dense_optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            flat[f"dense/{index}/{name}"] = torch.as_tensor(value)
    return {k: v.detach().cpu().contiguous().clone() for k, v in flat.items()}


def _state_file(directory: Path) -> Path:
    """Trainer counters and RNG state, one file per rank (each rank has its own RNG)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return directory / (TRAINER_STATE if rank == 0 else f"trainer-rank{rank}.json")


def _rank_file(directory: Path) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return directory / f"rank{rank}.safetensors"


def save_checkpoint(
    directory: Path, parallel: ParallelModel, trainer_state: dict[str, Any]
) -> None:
    """Overwrite the checkpoint in `directory` (each file replaced atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _flatten(parallel)
    groups = parallel.dense_optimizer.state_dict()["param_groups"]
    trainer_state = {**trainer_state, "dense_param_groups": groups}
    with atomic_path(_rank_file(directory)) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(_state_file(directory)) as tmp:
        tmp.write_text(json.dumps(trainer_state))


def _copy_into(value: Any, saved: Tensor, key: str) -> None:
    target = _local(value)
    if target is None:
        return
    if target.shape != saved.shape:
        raise ArtifactError(
            f"checkpoint entry {key} has shape {tuple(saved.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(saved)


def load_checkpoint(directory: Path, parallel: ParallelModel) -> dict[str, Any]:
    """Restore weights and optimizer state in place; return the trainer's counters."""
    path = _rank_file(directory)
    if not path.is_file() or not _state_file(directory).is_file():
        raise ArtifactError(f"{directory}: no complete checkpoint to resume from")
    saved = load_file(str(path))
    model_state = parallel.model.state_dict()
    for key, value in model_state.items():
        if f"model/{key}" in saved:
            _copy_into(value, saved[f"model/{key}"], key)
    parallel.model.load_state_dict(model_state)
    fused = parallel.model.fused_optimizer
    fused_state = fused.state_dict()
    for param, entries in fused_state["state"].items():
        for name, value in entries.items():
            if f"fused/{param}/{name}" in saved:
                _copy_into(value, saved[f"fused/{param}/{name}"], name)
    fused.load_state_dict(fused_state)
    trainer_state = dict(json.loads(_state_file(directory).read_text()))
    dense_state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in saved.items():
        if key.startswith("dense/"):
            _, index, name = key.split("/", 2)
            dense_state.setdefault(int(index), {})[name] = tensor
    parallel.dense_optimizer.load_state_dict(
        {"state": dense_state, "param_groups": trainer_state.pop("dense_param_groups")}
    )
    return trainer_state
