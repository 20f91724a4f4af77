"""Training on several processes, one machine or many, with PyTorch distributed and
TorchRec's sharded embeddings:

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] \\
        -m training.distributed --data VERSION/data --model-dir OUT [--tower FILE] \\
        [--config FILE] [--warm-start MODEL_DIR] [--device cpu|cuda]

Every rank reads only its own users' events (`features.feature_set.user_shard`), the
planner shards the embedding tables over the ranks, the MLPs are data-parallel, and the
validation metrics are averaged over ranks. Rank 0 writes the unsharded model
(safetensors), so embedding, indexing and serving never need the cluster.
`recsys build --nproc N` runs this under torchrun as one step of a build.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from features.feature_set import FeatureSet, user_shard
from recsys.core.errors import RecsysError
from training.config import TowerConfig, TrainConfig
from training.export import ROW_STATE, SPEC, VALIDATED_WEIGHTS, WEIGHTS
from training.fit import METRICS, save_result
from training.model import ModelSpec
from training.parallel import ensure_process_group
from training.trainer import TrainResult, build_split, train
from training.warm_start import load_warm_start

RESULT_FILE = "train_result.json"


def _device(name: str) -> torch.device:
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="an ingest output directory")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tower", type=Path, help="TowerConfig as JSON")
    parser.add_argument("--config", type=Path, help="TrainConfig as JSON")
    parser.add_argument("--warm-start", type=Path, help="a previous version's model directory")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = _device(args.device)
    rank, world_size = ensure_process_group(device)
    tower = TowerConfig.from_dict(json.loads(args.tower.read_text())) if args.tower else None
    config = TrainConfig.from_dict(json.loads(args.config.read_text())) if args.config else None
    features = FeatureSet.load(
        args.data, verify=rank == 0, users=user_shard(args.data, rank, world_size)
    )
    split = build_split(features, config or TrainConfig())
    warm = load_warm_start(args.warm_start, WEIGHTS, ROW_STATE) if args.warm_start else None
    args.model_dir.mkdir(parents=True, exist_ok=True)
    result = train(
        features,
        split,
        tower,
        config,
        device=device,
        metrics_path=args.model_dir / METRICS,
        progress=False,
        warm_start=warm,
    )
    if rank == 0:
        save_result(result, args.model_dir)
        summary = {
            "config": result.config.to_dict(),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_metrics": result.best_metrics,
            "seconds": result.seconds,
            "sharding": result.sharding,
            "world_size": world_size,
            "refit_epochs": result.refit_epochs,
            "member_best_epochs": result.member_best_epochs,
        }
        (args.model_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def train_with_torchrun(
    data: Path,
    model_dir: Path,
    nproc: int,
    tower: TowerConfig,
    config: TrainConfig,
    warm_start: Path | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Run `main` on `nproc` local ranks under torchrun; return what rank 0 saved."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tower.json").write_text(json.dumps(tower.to_dict()))
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "training.distributed"]
    command += ["--data", str(data), "--model-dir", str(model_dir), "--device", device]
    command += [
        "--tower",
        str(model_dir / "tower.json"),
        "--config",
        str(model_dir / "config.json"),
    ]
    if warm_start is not None:
        command += ["--warm-start", str(warm_start)]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads}  # the cores shared between the ranks
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for name in ("tower.json", "config.json"):
        (model_dir / name).unlink(missing_ok=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        causes = [line for line in lines if line.startswith("[rank") and "Error" in line]
        raise RecsysError(
            f"distributed training on {nproc} ranks failed: "
            + ("\n".join(causes[-3:]) or "\n".join(lines[-15:]))
        )
    summary = json.loads((model_dir / RESULT_FILE).read_text())
    (model_dir / RESULT_FILE).unlink()
    return TrainResult(
        state=load_file(str(model_dir / WEIGHTS)),
        spec=ModelSpec.from_dict(json.loads((model_dir / SPEC).read_text())),
        config=TrainConfig.from_dict(summary["config"]),
        history=summary["history"],
        best_epoch=summary["best_epoch"],
        best_metrics=summary["best_metrics"],
        seconds=summary["seconds"],
        row_state=load_file(str(model_dir / ROW_STATE)),
        sharding=summary["sharding"],
        refit_epochs=summary.get("refit_epochs", 0),
        member_best_epochs=summary.get("member_best_epochs", []),
        validated_state=load_file(str(model_dir / VALIDATED_WEIGHTS))
        if (model_dir / VALIDATED_WEIGHTS).is_file()
        else None,
    )


if __name__ == "__main__":
    main()
