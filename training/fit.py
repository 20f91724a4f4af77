"""One training entry point for a build: in this process, or on N ranks under torchrun.
Either way the model directory ends up with the same files (weights, validated weights,
embedding row state, model.json, train_config.json, metrics.jsonl) and the caller gets the
same `TrainResult`."""

import json
from pathlib import Path

import torch

from features.feature_set import FeatureSet
from features.splits import Split
from training.cluster import Cluster
from training.config import TowerConfig, TrainConfig
from training.export import ROW_STATE, save_model, warm_start_weights
from training.trainer import TrainResult, train
from training.warm_start import load_warm_start

TRAIN_CONFIG = "train_config.json"  # the settings as resolved against the data
METRICS = "metrics.jsonl"  # one line per epoch


def save_result(result: TrainResult, model_dir: Path) -> None:
    """The trained model and the settings it resolved to, as every reader expects them."""
    save_model(result.state, result.spec, model_dir, result.row_state, result.validated_state)
    (model_dir / TRAIN_CONFIG).write_text(json.dumps(result.config.to_dict(), indent=2) + "\n")


def fit_model(
    data_dir: Path,
    features: FeatureSet,
    split: Split,
    model_dir: Path,
    tower: TowerConfig,
    config: TrainConfig,
    *,
    nproc: int = 1,
    device: str = "cpu",
    warm_start: Path | None = None,
    progress: bool = True,
    cluster: Cluster | None = None,
) -> TrainResult:
    """Train on `split` (in-process) or on `data_dir` (one shard of users per rank, the
    same split rule; with `cluster`, the ranks of several machines), save into
    `model_dir`, and return the result."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if nproc > 1 or cluster is not None:
        from training.distributed import train_with_torchrun
        from training.parallel import check_sharding

        check_sharding(config.sharding, device)
        return train_with_torchrun(
            data_dir,
            model_dir,
            nproc,
            tower,
            config,
            warm_start=warm_start,
            device=device,
            cluster=cluster,
        )
    result = train(
        features,
        split,
        tower,
        config,
        device=torch.device(device),
        metrics_path=model_dir / METRICS,
        progress=progress,
        warm_start=load_warm_start(warm_start, warm_start_weights(warm_start), ROW_STATE)
        if warm_start
        else None,
    )
    save_result(result, model_dir)
    return result
