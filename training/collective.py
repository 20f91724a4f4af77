"""Small reductions across training ranks on NumPy values. With one rank they return their
input untouched, so single-process training pays nothing for them."""

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group (0, 1 without one)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _reduce(values: np.ndarray, op: dist.ReduceOp.RedOpType) -> np.ndarray:
    if world()[1] == 1:
        return values
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    dist.all_reduce(tensor, op=op)
    return tensor.numpy()


def all_sum(values: np.ndarray) -> np.ndarray:
    return _reduce(np.asarray(values), dist.ReduceOp.SUM)


def all_min(value: int) -> int:
    return int(_reduce(np.array([value]), dist.ReduceOp.MIN)[0])


def all_max(value: int) -> int:
    return int(_reduce(np.array([value]), dist.ReduceOp.MAX)[0])


def all_mean(metrics: dict[str, float], weight: float) -> dict[str, float]:
    """Metrics averaged over ranks, each rank weighted by `weight` (its query count)."""
    if world()[1] == 1:
        return metrics
    names = sorted(metrics)
    totals = all_sum(np.array([metrics[n] * weight for n in names] + [weight]))
    return {n: float(totals[i] / max(totals[-1], 1e-12)) for i, n in enumerate(names)}
