"""Weights in and out of safetensors (never pickle), and the unsharded model rebuilt from a
version for embedding, evaluation and serving in one process."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from features.feature_set import FeatureSet
from recsys.core.errors import ArtifactError
from recsys.core.layout import MODEL_SPEC, MODEL_WEIGHTS, VersionLayout
from training.batches import BatchBuilder
from training.config import legacy_keys
from training.model import ModelSpec, TwoTower, model_spec

WEIGHTS = MODEL_WEIGHTS
SPEC = MODEL_SPEC
ROW_STATE = "row_state.safetensors"  # embedding optimizer's per-row state, for warm starts
# The best weights before the refit on every event (present only after a refit): the
# quality gate compares models that have not trained on the validation events.
VALIDATED_WEIGHTS = "validated.safetensors"


def warm_start_weights(model_dir: Path) -> str:
    """The weights a rebuild starts from: the previous version's validated ones where it
    has them. Its refitted weights trained on its validation events, which a grown log
    mostly validates on again: a rebuild begun from them scored validation recall 0.92
    against 0.37, chose no spectral branch on that, and passed the gate by +0.55 while it
    was worse on held-out events."""
    return VALIDATED_WEIGHTS if (model_dir / VALIDATED_WEIGHTS).is_file() else WEIGHTS


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
        state = legacy_keys(load_file(str(weights)))
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


def version_towers(
    version_dir: Path, features: FeatureSet, validated: bool = False
) -> tuple[TwoTower, BatchBuilder]:
    """A built version's towers and a batch builder with the version's known-ID masks.

    `features` may be a grown log (a newer version's data): users, items and categories
    the version never saw are then left out, as the version would have to. `validated`
    takes the weights from before the refit on every event, where the version has them
    (what to measure on validation events)."""
    layout = VersionLayout(version_dir)
    model = load_model(layout.model, validated=validated)
    builder = BatchBuilder(features, model.spec.tower)
    if set(builder.keys.order) != set(model.spec.keys.order):  # the model looks keys up by name
        raise ArtifactError(
            f"{version_dir}: the model reads features {list(model.spec.keys.order)}, "
            f"the data has {list(builder.keys.order)}"
        )
    known = {
        side: pl.read_parquet(layout.side_embeddings(side), columns=["known"])
        for side in ("items", "users")
    }
    builder.known_items = _padded(known["items"]["known"].to_numpy(), features.num_items)
    builder.known_users = _padded(known["users"]["known"].to_numpy(), features.num_users)
    model_rows = model.spec.table_rows()
    if model_rows != model_spec(features, model.spec.tower).table_rows():
        builder.limit_to(model_rows)
    return model, builder


def _padded(known: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([known, np.zeros(max(0, size - len(known)), dtype=bool)])[:size]
