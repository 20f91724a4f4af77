"""TorchRec's DistributedModelParallel around the two-tower model, in one process or under
torchrun: embedding tables go to fbgemm's fused kernels with a fused row-wise Adagrad
update in the backward pass; dense layers get AdamW."""

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import Tensor, nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys.core.errors import RecsysError
from training.config import TrainConfig
from training.model import ModelSpec, TwoTower

log = logging.getLogger(__name__)


TIMEOUT_VARIABLE = "RECSYS_DIST_TIMEOUT_SECONDS"  # set by a build over several nodes


def ensure_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Outside torchrun, a one-process group on an in-memory store.
    Under a build over several nodes every collective gives up after the cluster's
    timeout (a node that hangs fails the build instead of holding the others forever)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            seconds = float(os.environ.get(TIMEOUT_VARIABLE) or 0)
            timeout = {"timeout": timedelta(seconds=seconds)} if seconds > 0 else {}
            dist.init_process_group(backend, **timeout)  # type: ignore[arg-type]
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class ParallelModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    dense_optimizer: torch.optim.Optimizer

    @property
    def module(self) -> TwoTower:
        unwrapped = get_unwrapped_module(self.model)
        assert isinstance(unwrapped, TwoTower)
        return unwrapped


def build_parallel(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> ParallelModel:
    ensure_process_group(device)
    torch.manual_seed(cfg.seed)
    model = TwoTower(spec, device=torch.device("meta"))
    row_optimizer: dict[str, Any] = {"lr": cfg.embedding_learning_rate}
    if cfg.embedding_weight_decay > 0:
        # Decays only the rows a batch touches, so frequent IDs are held back most (the
        # frequency-scaled L2 of most matrix factorisation code).
        row_optimizer["weight_decay"] = cfg.embedding_weight_decay
        row_optimizer["weight_decay_mode"] = WeightDecayMode.L2
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), row_optimizer)
    plan = _plan(model, device, dist.get_world_size(), cfg.sharding)
    parallel = DistributedModelParallel(model, device=device, plan=plan)
    dense = {name: p for name, p in parallel.named_parameters() if "ebc" not in name}
    dense_optimizer = torch.optim.AdamW(
        list(dense.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    keyed_dense = KeyedOptimizerWrapper(dense, lambda params: dense_optimizer)
    optimizer = CombinedOptimizer([parallel.fused_optimizer, keyed_dense])
    return ParallelModel(parallel, optimizer, dense_optimizer)


_AUTO = (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE)


def cuda_problem(cuda_visible: bool, fbgemm_variant: str) -> str | None:
    """Why `--device cuda` cannot train here, or None. The fused kernels come from fbgemm:
    its CPU build (`fbgemm-gpu-cpu`, what `make setup` installs; variant "cpu") has none
    for GPUs, so TorchRec would fail somewhere inside training instead. Its CUDA and ROCm
    builds, and source builds (variant "INTERNAL"), are let through."""
    if not cuda_visible:
        return "--device cuda: PyTorch sees no CUDA device on this machine"
    if fbgemm_variant == "cpu":
        return (
            f"--device cuda needs the CUDA build of fbgemm (pip package fbgemm-gpu, the "
            f"version that matches torch and its CUDA); the {fbgemm_variant} build is "
            f"installed, which has no GPU kernels"
        )
    return None


def check_device(device_type: str) -> None:
    """A clear error before any work when the device cannot train (see `cuda_problem`)."""
    if device_type == "cuda":
        import fbgemm_gpu

        variant = str(getattr(fbgemm_gpu, "__variant__", "unknown"))
        problem = cuda_problem(torch.cuda.is_available(), variant)
        if problem:
            raise RecsysError(problem)


def check_sharding(sharding: str, device_type: str) -> None:
    """A clear error for a sharding TorchRec does not offer on this device (on CPU there
    is no row-wise sharding: table-wise and column-wise are)."""
    available = EmbeddingBagCollectionSharder().sharding_types(device_type)
    if sharding != "auto" and sharding not in available:
        offered = ", ".join(t for t in available if t != ShardingType.DATA_PARALLEL.value)
        raise RecsysError(
            f"sharding {sharding} is not available on {device_type} (TorchRec offers {offered})"
        )


def _plan(model: TwoTower, device: torch.device, world_size: int, sharding: str) -> ShardingPlan:
    """Let TorchRec's planner place the tables (table-wise or row-wise as it sees fit, or
    as `sharding` demands), always on fused fbgemm kernels: the data-parallel "dense"
    kernel it picks for small tables has no autograd registration in the CPU build of
    fbgemm and would not train."""
    sharder = cast(ModuleSharder[nn.Module], EmbeddingBagCollectionSharder())
    check_sharding(sharding, device.type)
    available = sharder.sharding_types(device.type)
    types = [t.value for t in _AUTO if t.value in available] if sharding == "auto" else [sharding]
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=types,
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
        )
        for table in model.ebc.embedding_bag_configs()
    }
    topology = Topology(world_size=world_size, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)


def _gathered(entries: dict[str, Any]) -> dict[str, Tensor]:
    """Plain tensors of a state dict, sharded entries gathered whole onto rank 0 (the other
    ranks take part in the gather and get only the unsharded entries)."""
    state = {}
    for name, value in entries.items():
        if hasattr(value, "local_shards"):
            full = torch.zeros(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            if full is not None:
                state[name] = full
        elif isinstance(value, Tensor):
            state[name] = value.detach().cpu().clone()
    return state


def full_state(parallel: DistributedModelParallel) -> dict[str, Tensor]:
    """Plain, unsharded tensors of every parameter, for safetensors."""
    state = _gathered(parallel.state_dict())
    return {name.removeprefix("module."): value for name, value in state.items()}


def embedding_optimizer_state(parallel: DistributedModelParallel) -> dict[str, Tensor]:
    """The fused optimizer's per-row state (row-wise Adagrad's accumulators), unsharded and
    keyed by table (`item_table.momentum1`), on rank 0: kept with a version so that a
    warm-started rebuild continues with the step sizes the rows had, not fresh large ones.

    Each rank's fused optimizer lists only the tables it holds, so this gathers plain
    (offset, rows) pieces with one `all_gather_object` rather than per-table collectives."""
    local: dict[str, tuple[list[int], list[tuple[int, Tensor]]]] = {}
    for entries in parallel.fused_optimizer.state_dict()["state"].values():
        for name, value in entries.items():
            if hasattr(value, "local_shards"):
                pieces = [
                    (int(shard.metadata.shard_offsets[0]), shard.tensor.detach().cpu().clone())
                    for shard in value.local_shards()
                ]
                local[name] = (list(value.size()), pieces)
    parts: list[Any] = [local]
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        if dist.get_rank() != 0:
            return {}
    state: dict[str, Tensor] = {}
    for part in parts:
        for name, (size, pieces) in part.items():
            full = state.setdefault(name, torch.zeros(size))
            for offset, rows in pieces:
                full[offset : offset + len(rows)] = rows
    return state


def weights_per_rank(parallel: DistributedModelParallel) -> dict[str, list[int]]:
    """How many weights of each embedding table every rank holds (the sharding, as placed:
    a whole table on one rank, or rows or columns split over several)."""
    local: dict[str, int] = {}
    for name, value in parallel.state_dict().items():
        if hasattr(value, "local_shards"):
            table = name.split(".")[-2]  # ...embedding_bags.<table>.weight
            local[table] = sum(int(shard.tensor.numel()) for shard in value.local_shards())
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    tables = sorted({t for part in gathered if part for t in part})
    return {t: [(part or {}).get(t, 0) for part in gathered] for t in tables}
