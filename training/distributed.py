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
from training.cluster import Cluster
from training.config import TowerConfig, TrainConfig
from training.export import ROW_STATE, SPEC, VALIDATED_WEIGHTS, WEIGHTS, warm_start_weights
from training.fit import METRICS, save_result
from training.model import ModelSpec
from training.orphans import LAUNCHER_VARIABLE, die_with_parent, stop_when_orphaned
from training.parallel import TIMEOUT_VARIABLE, ensure_process_group
from training.trainer import TrainResult, build_split, train
from training.warm_start import load_warm_start

RESULT_FILE = "train_result.json"


def _device(name: str) -> torch.device:
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _invocation(args: argparse.Namespace) -> argparse.Namespace:
    """Node 0's arguments on every rank: a node that joins a build knows only where to
    meet, and learns the data, model and settings paths from the first rank that has them
    (c10d hands out ranks in the order the nodes arrive, so that need not be rank 0)."""
    held: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(held, args.data is not None)
    if not any(held):
        raise RecsysError("no rank was given --data and --model-dir: node 0 runs the build")
    box = [vars(args)]
    dist.broadcast_object_list(box, src=held.index(True))
    return argparse.Namespace(**box[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="an ingest output directory")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tower", type=Path, help="TowerConfig as JSON")
    parser.add_argument("--config", type=Path, help="TrainConfig as JSON")
    parser.add_argument("--warm-start", type=Path, help="a previous version's model directory")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    stop_when_orphaned(f"training rank {os.environ.get('RANK', '0')}")
    device = _device(args.device)
    rank, world_size = ensure_process_group(device)
    args = _invocation(args)
    tower = TowerConfig.from_dict(json.loads(args.tower.read_text())) if args.tower else None
    config = TrainConfig.from_dict(json.loads(args.config.read_text())) if args.config else None
    features = FeatureSet.load(
        args.data, verify=rank == 0, users=user_shard(args.data, rank, world_size)
    )
    split = build_split(features, config or TrainConfig())
    warm = (
        load_warm_start(args.warm_start, warm_start_weights(args.warm_start), ROW_STATE)
        if args.warm_start
        else None
    )
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
    cluster: Cluster | None = None,
) -> TrainResult:
    """Run `main` on `nproc` local ranks under torchrun (with `cluster`: this machine's
    ranks of a build over several nodes, node 0); return what rank 0 saved."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tower.json").write_text(json.dumps(tower.to_dict()))
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    command = _torchrun(nproc, cluster)
    command += ["--data", str(data), "--model-dir", str(model_dir), "--device", device]
    command += [
        "--tower",
        str(model_dir / "tower.json"),
        "--config",
        str(model_dir / "config.json"),
    ]
    if warm_start is not None:
        command += ["--warm-start", str(warm_start)]
    done = _run_ranks(command, nproc, cluster)
    for name in ("tower.json", "config.json"):
        (model_dir / name).unlink(missing_ok=True)
    _check_ranks(done, nproc, cluster)
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


def join_cluster(cluster: Cluster, nproc: int, device: str) -> None:
    """A node other than 0: train this machine's `nproc` ranks of node 0's build, with
    the data, model and settings rank 0 names; returns when the training ends."""
    command = [*_torchrun(nproc, cluster), "--device", device]
    _check_ranks(_run_ranks(command, nproc, cluster), nproc, cluster)


def _torchrun(nproc: int, cluster: Cluster | None) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += cluster.torchrun_arguments() if cluster else ["--standalone"]
    return [*command, f"--nproc-per-node={nproc}", "-m", "training.distributed"]


def _run_ranks(
    command: list[str], nproc: int, cluster: Cluster | None
) -> subprocess.CompletedProcess[str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads}  # the cores shared between the ranks
    env[LAUNCHER_VARIABLE] = str(os.getpid())  # the ranks stop when this process is gone
    if cluster is not None:  # every collective gives up after this, as the meeting does
        env[TIMEOUT_VARIABLE] = str(cluster.timeout_seconds)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        preexec_fn=die_with_parent,  # torchrun stops with this build, and its ranks with it
    )


def _check_ranks(
    done: subprocess.CompletedProcess[str], nproc: int, cluster: Cluster | None
) -> None:
    """One error naming what failed, where torchrun's output holds it."""
    if done.returncode == 0:
        return
    lines = done.stderr.strip().splitlines()
    causes = [line for line in lines if line.startswith("[rank") and "Error" in line]
    where = (
        f"node {cluster.node_rank} of {cluster.nnodes} ({nproc} rank(s) here)"
        if cluster
        else f"{nproc} ranks"
    )
    raise RecsysError(
        f"distributed training on {where} failed: "
        + ("\n".join(causes[-3:]) or "\n".join(lines[-15:]))
    )


if __name__ == "__main__":
    main()
