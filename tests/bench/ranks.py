"""Training throughput on 1 and 2 ranks of this machine (TorchRec sharded embeddings,
gloo), with the same job `recsys build --nproc N` runs, on the same data."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import environment

from bench.build import synthetic_data
from bench.report import bar_chart, markdown_table, save
from features.ingest import ingest
from features.sources import resolve_source
from recsys.processes import free_port
from training.cluster import Cluster
from training.config import TowerConfig, TrainConfig
from training.distributed import train_with_torchrun
from training.trainer import TrainResult

BATCH = 2048


def _two_nodes(features: Path, out: Path, config: TrainConfig, work: Path) -> TrainResult:
    """Two torchrun launchers of one rank each meeting over loopback, as `recsys build
    --nnodes 2` runs them: node 1 a `recsys build --node-rank 1` process, node 0 here.
    Each "node" gets one of the two cores' threads, as each of 2 ranks on one node does
    (each node would take every core of its machine: here that is twice the cores)."""
    with environment({"OMP_NUM_THREADS": "1"}):
        return _meet(features, out, config, work)


def _meet(features: Path, out: Path, config: TrainConfig, work: Path) -> TrainResult:
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "recsys", "build", "--artifacts", str(work / "ranks-n1")]
    command += ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", endpoint]
    joining = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cluster = Cluster(2, 0, endpoint)
        return train_with_torchrun(features, out, 1, TowerConfig(), config, cluster=cluster)
    finally:
        joining.wait(timeout=600)


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    data = synthetic_data(work, rows=200_000 if quick else 500_000)  # throughput, not scale
    features = work / f"ranks-ingest-{data.name}"
    if not (features / "manifest.json").is_file():
        ingest(resolve_source(data), features)
    results = []
    for nproc, nodes in ((1, 1), (2, 1), (1, 2)):
        out = work / f"ranks-model-{nproc}-{nodes}"
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(max_epochs=1, batch_size=BATCH, refit=False)  # throughput only
        if nodes == 1:
            result = train_with_torchrun(features, out, nproc, TowerConfig(), config)
        else:
            result = _two_nodes(features, out, config, work)
        epoch = result.history[0]
        results.append(
            {
                "ranks": f"{nodes} node(s) x {nproc} rank(s)",
                "examples_per_s": epoch["examples_per_s"],
                "epoch_s": epoch["seconds"],
                "recall@20": epoch["valid_recall@20"],
                "sharding": result.sharding,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["examples_per_s"]
    rows = [
        [
            r["ranks"],
            f"{r['examples_per_s']:,.0f}",
            f"{r['examples_per_s'] / base:.2f}x",
            f"{r['epoch_s']:.0f}",
            f"{r['recall@20']:.4f}",
            ", ".join(f"{t}: {w}" for t, w in r["sharding"].items() if len(w) > 1) or "one rank",
        ]
        for r in results
    ]
    notes = (
        f"One epoch of the `recsys build` defaults at a global batch of {BATCH} (each of N "
        "ranks takes batch/N), synthetic log of "
        f"{data.name.split('-')[1]} events, this 2-core machine: the cores are shared, so "
        "each rank gets 2/N threads (OMP_NUM_THREADS) and the ranks talk over gloo on "
        "loopback; two nodes are two torchrun launchers meeting over loopback (c10d), "
        "as `recsys build --nnodes 2` runs them. Reproduce: `python -m bench --only ranks`."
    )
    headers = ["ranks", "examples/s", "vs 1 rank", "epoch s", "valid recall@20", "weights/rank"]
    save(
        "ranks",
        "Training on 1 and 2 ranks, on one node and two (torchrun, gloo)",
        markdown_table(headers, rows),
        notes,
    )
    bar_chart(
        "ranks",
        "Training throughput by ranks",
        {r["ranks"]: {"examples/s": r["examples_per_s"]} for r in results},
        "examples/s",
    )
    return results
