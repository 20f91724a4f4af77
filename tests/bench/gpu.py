"""`make bench-gpu`: the first figure from a lent GPU in minutes. Checks the environment
(torch built with CUDA, a device, fbgemm-gpu's CUDA kernels, which the CPU wheel
`fbgemm-gpu-cpu` lacks), then trains the speed benchmark's model (bench.speed: TorchRec
DMP, fused row-wise Adagrad, in-batch softmax) on the same batches on CPU and on CUDA and
prints examples/s side by side. Exit 1, with the reason in one line, where there is no
usable GPU: nothing is measured then."""

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, save
from bench.speed import speed_model, training_batches
from training.config import TrainConfig
from training.losses import InBatchSoftmaxLoss
from training.parallel import build_parallel

FBGEMM_CUDA_HINT = (
    "fbgemm-gpu's CUDA kernels are missing (the CPU wheel fbgemm-gpu-cpu is installed?): "
    "pip uninstall -y fbgemm-gpu-cpu && pip install fbgemm-gpu==1.8.0 --index-url "
    "https://download.pytorch.org/whl/cu128 (the build matching torch's CUDA)"
)


def environment() -> tuple[list[str], str | None]:
    """What the machine has, one line each, and the reason it cannot measure (or None)."""
    lines = [f"torch {torch.__version__}, built with CUDA {torch.version.cuda or 'no'}"]
    if torch.version.cuda is None:
        return lines, (
            "torch is the CPU build: install torch==2.13.0 built for CUDA and fbgemm-gpu==1.8.0 "
            "(not fbgemm-gpu-cpu) from https://download.pytorch.org/whl/cu128"
        )
    if not torch.cuda.is_available():
        return lines, "no CUDA device is visible to torch: nothing to measure"
    lines += [
        f"device {n}: {torch.cuda.get_device_name(n)}" for n in range(torch.cuda.device_count())
    ]
    try:
        import fbgemm_gpu  # noqa: F401

        probe = torch.ops.fbgemm.asynchronous_complete_cumsum(
            torch.ones(4, dtype=torch.int64, device="cuda")
        )
        torch.cuda.synchronize()
        lines.append(f"fbgemm-gpu CUDA kernels load ({probe.tolist()})")
    except Exception as exc:
        return lines, f"{FBGEMM_CUDA_HINT} ({type(exc).__name__}: {exc})"
    return lines, None


def examples_per_s(device: torch.device, work: Path, rows: int, batch_size: int) -> float:
    _, spec, builder, train_rows = speed_model(work, rows)
    batches = training_batches(builder, train_rows, batch_size, 13)
    parallel = build_parallel(spec, TrainConfig(batch_size=batch_size), device)
    loss_fn = InBatchSoftmaxLoss(temperature=0.05).to(device)

    def step(batch: Any) -> None:
        user, item = parallel.model(batch.features.to(device))
        loss = loss_fn(user, item, batch.item_ids.to(device))
        parallel.optimizer.zero_grad()
        loss.backward()
        parallel.optimizer.step()

    for batch in batches[:3]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches[3:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(b.item_ids) for b in batches[3:]) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-gpu"))
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    lines, problem = environment()
    print("\n".join(lines), flush=True)
    if problem is not None:
        print(f"bench-gpu: {problem}", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch_size in (1024, 4096, 16384):
        cpu = examples_per_s(torch.device("cpu"), args.work, args.rows, batch_size)
        cuda = examples_per_s(torch.device("cuda", 0), args.work, args.rows, batch_size)
        rows.append([batch_size, f"{cpu:,.0f}", f"{cuda:,.0f}", f"{cuda / cpu:.1f}x"])
        print(f"batch {batch_size}: cpu {cpu:,.0f}, cuda {cuda:,.0f} examples/s", flush=True)
    save(
        "gpu",
        "Training throughput on CPU and CUDA (examples/s)",
        markdown_table(["batch", "cpu", "cuda", "cuda / cpu"], rows),
        f"The speed benchmark's model and batches ({args.rows:,}-event synthetic log, "
        f"embedding size 64, history 50); {'; '.join(lines)}; {torch.get_num_threads()} CPU "
        "threads.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
