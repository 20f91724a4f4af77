"""Training throughput: our TorchRec path (DistributedModelParallel, fused fbgemm kernels,
fused row-wise Adagrad) against a plain-PyTorch loop (nn.EmbeddingBag with sparse gradients,
torch.optim.Adagrad for embeddings, AdamW for the MLPs) training the same model on the same
batches, in one run."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from bench.report import RESULTS_DIR, markdown_table, save
from data.synthetic import SyntheticConfig, generate
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.jagged import CsrBags
from features.sources import resolve_source
from training.batches import BatchBuilder
from training.config import TowerConfig, TrainConfig
from training.dropout import ByteDropout
from training.evaluate import top_k_unseen
from training.losses import InBatchSoftmaxLoss
from training.model import ModelSpec, TwoTower, model_spec
from training.parallel import build_parallel


class PlainTwoTower(nn.Module):
    """The same towers with one torch.nn.EmbeddingBag per table (sparse gradients)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        reference = TwoTower(spec, device=torch.device("meta"))
        self.user_keys, self.item_keys = reference.user_keys, reference.item_keys
        self.table_of: dict[str, str] = {}
        self.bags = nn.ModuleDict()
        for table in reference.ebc.embedding_bag_configs():
            name = table.name.replace(":", "_")
            self.bags[name] = nn.EmbeddingBag(
                table.num_embeddings,
                table.embedding_dim,
                mode="sum" if spec.tower.weighted_bags else "mean",
                sparse=True,
            )
            for feature in table.feature_names:
                self.table_of[feature] = name
        self.user_mlp = TwoTower(spec, device=torch.device("cpu")).user_mlps[0]
        self.item_mlp = TwoTower(spec, device=torch.device("cpu")).item_mlps[0]

    def forward(self, features: KeyedJaggedTensor) -> tuple[Tensor, Tensor]:
        pooled = {}
        for key, jagged in features.to_dict().items():
            offsets = torch.cat([jagged.lengths().new_zeros(1), jagged.lengths().cumsum(0)[:-1]])
            # Weighted bags: sums with weights that add up to 1 per bag (weighted means).
            pooled[key] = self.bags[self.table_of[key]](
                jagged.values(), offsets, per_sample_weights=jagged.weights_or_none()
            )
        user = torch.cat([pooled[k] for k in self.user_keys], dim=1)
        item = torch.cat([pooled[k] for k in self.item_keys], dim=1)
        return F.normalize(self.user_mlp(user), dim=-1), F.normalize(self.item_mlp(item), dim=-1)


def training_batches(
    builder: BatchBuilder, rows: np.ndarray, batch_size: int, count: int
) -> list[Any]:
    rng = np.random.default_rng(0)
    return [
        builder.training_batch(rng.choice(rows, batch_size, replace=False), rng)
        for _ in range(count)
    ]


def _time_steps(step: Any, batches: list[Any], warmup: int = 3) -> float:
    for batch in batches[:warmup]:
        step(batch)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return sum(len(b.item_ids) for b in batches[warmup:]) / (time.perf_counter() - started)


def speed_model(work: Path, rows: int) -> tuple[FeatureSet, ModelSpec, BatchBuilder, np.ndarray]:
    """The benchmark's log (generated and ingested once), model and batch builder: shared
    with `make bench-gpu` (bench.gpu), so its figures stand beside these."""
    data = work / f"speed-{rows}"
    if not (data / "users.parquet").is_file():
        generate(data, SyntheticConfig(rows=rows, seed=1))
    ingest(resolve_source(data), work / f"speed-{rows}-ingest")
    features = FeatureSet.load(work / f"speed-{rows}-ingest")
    tower = TowerConfig(embedding_dim=64, history_length=50, members=1)  # one step, one tower
    return (
        features,
        model_spec(features, tower),
        BatchBuilder(features, tower),
        np.arange(len(features.histories.items)),
    )


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    rows = 300_000 if quick else 2_000_000
    features, spec, builder, train_rows = speed_model(work, rows)
    loss_fn = InBatchSoftmaxLoss(temperature=0.05)
    torch.set_num_threads(2)
    results = []
    for batch_size in (1024, 4096):
        count = (6 if quick else 15) + 3
        batches = training_batches(builder, train_rows, batch_size, count)

        parallel = build_parallel(spec, TrainConfig(batch_size=batch_size), torch.device("cpu"))

        def ours(batch: Any, parallel: Any = parallel) -> None:
            user, item = parallel.model(batch.features)
            loss = loss_fn(user, item, batch.item_ids)
            parallel.optimizer.zero_grad()
            loss.backward()
            parallel.optimizer.step()

        plain = PlainTwoTower(spec)
        sparse = torch.optim.Adagrad(plain.bags.parameters(), lr=0.05)
        dense = torch.optim.AdamW(
            list(plain.user_mlp.parameters()) + list(plain.item_mlp.parameters()), lr=2e-3
        )

        def baseline(
            batch: Any, plain: PlainTwoTower = plain, sparse: Any = sparse, dense: Any = dense
        ) -> None:
            user, item = plain(batch.features)
            loss = loss_fn(user, item, batch.item_ids)
            sparse.zero_grad()
            dense.zero_grad()
            loss.backward()
            sparse.step()
            dense.step()

        for name, step in (
            ("TorchRec DMP, fused row-wise Adagrad", ours),
            ("plain PyTorch nn.EmbeddingBag + Adagrad", baseline),
        ):
            rate = _time_steps(step, batches)
            results.append({"batch": batch_size, "engine": name, "examples_per_s": rate})
            print(f"batch {batch_size} {name}: {rate:,.0f} examples/s", flush=True)
    table_rows = []
    for batch_size in (1024, 4096):
        pair = [r for r in results if r["batch"] == batch_size]
        for r in pair:
            table_rows.append(
                [
                    batch_size,
                    r["engine"],
                    f"{r['examples_per_s']:,.0f}",
                    f"{float(r['examples_per_s']) / float(pair[1]['examples_per_s']):.2f}x",
                ]
            )
    notes = (
        f"Synthetic log of {rows:,} events ({features.num_users:,} users, {features.num_items:,} "
        "items), history length 50, embedding size 64, in-batch softmax loss, 2 CPU threads. "
        "Batches are built once and shared, so both loops train the same model on the same "
        "batches; the ratio is against the plain loop."
    )
    save(
        "speed",
        "Training throughput (examples/s)",
        markdown_table(["batch", "engine", "examples/s", "vs plain"], table_rows),
        notes,
    )
    _plot(results)
    return results + step_parts(quick) + validation_ranking(quick)


def _mean_ms(call: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Mean milliseconds of `call` over `repeats` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1000


def step_parts(quick: bool, batch: int = 2048, width: int = 256) -> list[dict[str, Any]]:
    """Milliseconds a step spends in the loss (forward and backward) and in the input
    dropout, the parts of a 256-d step that are neither matrix products of the towers nor
    embedding lookups, on unit vectors as the cosine towers make them: the symmetric loss
    against the one-way one, and computed from one shared exponential of the score matrix
    (the default) against masked log-sum-exps (what scores of unbounded range use, and
    every step before 2026-12-03's 0.12.0); the byte-mask dropout against
    nn.Dropout."""
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(0, 30_000, (batch,), generator=generator)
    log_prob = torch.log(torch.full((30_000,), 1 / 30_000))
    inputs = torch.randn(batch, 4 * width, generator=generator)

    def unit() -> Tensor:
        vectors = torch.randn(batch, width, generator=generator)
        return F.normalize(vectors, dim=1).requires_grad_()

    def loss_step(symmetric: bool, shared_exp: bool = True) -> Any:
        loss_fn = InBatchSoftmaxLoss(0.1, log_prob, symmetric=symmetric, shared_exp=shared_exp)
        query, item = unit(), unit()
        return lambda: loss_fn(query, item, items).backward()

    def dropout_step(layer: nn.Module) -> Any:
        leaf = inputs.clone().requires_grad_()
        return lambda: layer(leaf).sum().backward()

    parts = {
        "in-batch softmax, one way": loss_step(False),
        "in-batch softmax, symmetric (default)": loss_step(True),
        "in-batch softmax, symmetric, masked log-sum-exps": loss_step(True, shared_exp=False),
        "input dropout, nn.Dropout": dropout_step(nn.Dropout(0.2)),
        "input dropout, byte mask (default)": dropout_step(ByteDropout(0.2)),
    }
    repeats = 5 if quick else 20
    results = []
    for name, step in parts.items():
        ms = _mean_ms(step, repeats, warmup=3)
        results.append({"part": name, "ms": ms})
        print(f"{name}: {ms:.1f} ms", flush=True)
    save(
        "speed-step-parts",
        "Parts of a training step (ms, forward + backward)",
        markdown_table(["part", "ms a step"], [[r["part"], f"{r['ms']:.1f}"] for r in results]),
        f"Batch {batch}, {width}-d unit vectors, the user tower's pooled inputs "
        f"({4 * width} wide) for dropout, 2 CPU threads, mean of {repeats} steps.",
    )
    return results


def validation_ranking(
    quick: bool, queries: int = 1024, items: int = 36_706
) -> list[dict[str, Any]]:
    """Milliseconds to rank one chunk of a validation pass (every item scored, seen items
    excluded, best 100 kept in order): `top_k_unseen` (torch.topk, the default since release
    0.13.0) against NumPy's argpartition and a sort of its 100, what validation
    ran before, on the catalogue size of the 1M-event check-in log."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(queries, items)).astype(np.float32)
    seen_items = np.concatenate([rng.choice(items, 34, replace=False) for _ in range(queries)])
    seen = CsrBags(np.arange(0, 34 * queries + 1, 34, dtype=np.int64), seen_items)
    index = np.arange(queries)

    def numpy_top() -> np.ndarray:
        masked = scores.copy()
        values, lengths = seen.gather(index)
        masked[np.repeat(index, lengths), values] = -np.inf
        part = np.argpartition(-masked, 99, axis=1)[:, :100]
        order = np.argsort(-np.take_along_axis(masked, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1)

    ways = {
        "NumPy argpartition + sort of the 100": numpy_top,
        "torch.topk (default)": lambda: top_k_unseen(scores, seen, index, 100),
    }
    ranked = [np.take_along_axis(scores, rank(), axis=1) for rank in ways.values()]
    assert (ranked[0] == ranked[1]).all()  # the same scores in the same order (ties aside)
    repeats = 3 if quick else 10
    results = []
    for name, rank in ways.items():
        ms = _mean_ms(rank, repeats, warmup=1)
        results.append({"ranking": name, "ms": ms})
        print(f"{name}: {ms:.0f} ms", flush=True)
    save(
        "speed-validation-ranking",
        "Ranking one validation chunk (ms)",
        markdown_table(["way", "ms a chunk"], [[r["ranking"], f"{r['ms']:.0f}"] for r in results]),
        f"{queries:,} queries x {items:,} items (the 1M-event check-in log's catalogue), 34 "
        f"seen items each, best 100 in order; a validation pass of 10,000 users is 10 chunks "
        f"(plus the score products); 2 CPU threads, mean of {repeats}.",
    )
    return results


def _plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    engines = sorted({r["engine"] for r in results})
    for offset, engine in enumerate(engines):
        rows = [r for r in results if r["engine"] == engine]
        axis.bar(
            [i + offset * 0.4 for i in range(len(rows))],
            [r["examples_per_s"] for r in rows],
            width=0.4,
            label=engine,
        )
    axis.set_xticks([0.2, 1.2], ["batch 1024", "batch 4096"])
    axis.set(ylabel="examples/s", title="training throughput, 2 CPU cores")
    axis.legend(fontsize=8)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "speed.png", dpi=120)
