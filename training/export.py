"""Weights in and out of safetensors (never pickle), and the unsharded model rebuilt from a
version for embedding, evaluation and serving in one process."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recsys.errors import ArtifactError
from training.model import ModelSpec, TwoTower

WEIGHTS = "weights.safetensors"
SPEC = "model.json"
ROW_STATE = "row_state.safetensors"  # embedding optimizer's per-row state, for warm starts
# The best weights before the refit on every event (present only after a refit): the
# quality gate compares models that have not trained on the validation events.
VALIDATED_WEIGHTS = "validated.safetensors"


def save_model(
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    directory: Path,
    row_state: dict[str, torch.Tensor] | None = None,
    validated: dict[str, torch.Tensor] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _save(state, directory / WEIGHTS)
    if validated is not None:
        _save(validated, directory / VALIDATED_WEIGHTS)
    if row_state is not None:
        _save(row_state, directory / ROW_STATE)
    (directory / SPEC).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors reports I/O failures (a full disk) as its own error type: turn them into
    the one-line error every command prints."""
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: cannot write ({exc})") from exc


def load_model(directory: Path, validated: bool = False) -> TwoTower:
    """Rebuild the towers from `model.json` and load `weights.safetensors` strictly
    (`validated`: the pre-refit weights instead, where the version has them)."""
    weights = directory / WEIGHTS
    if validated and (directory / VALIDATED_WEIGHTS).is_file():
        weights = directory / VALIDATED_WEIGHTS
    try:
        spec = ModelSpec.from_dict(json.loads((directory / SPEC).read_text()))
        state = load_file(str(weights))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ArtifactError(f"{directory}: cannot load the model ({exc})") from exc
    model = TwoTower(spec, device=torch.device("cpu"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{directory}: weights do not match the model "
            f"(missing {missing}, unexpected {unexpected})"
        )
    model.eval()
    return model
