"""`recsys build`: ingest -> train -> embed items and users -> build the index -> seal a new
version -> quality gate -> promote it to current -> prune old versions.

Every step writes into a staging directory, so a failure or a kill anywhere leaves the
current version untouched; a lock keeps two builds of one artifacts directory apart. A
rebuild on a grown log warm-starts from the current version and is promoted only if it
passes the quality gate against it (`recsys.gate`); a rejected candidate stays on disk,
committed but not current, for inspection."""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features.feature_set import FeatureSet
from features.ingest import IngestReport, ingest
from features.sources import DataSource
from features.splits import Split
from recsys import schema as s
from recsys.artifacts import read_manifest
from recsys.build_config import CONFIG_FILE, BuildConfig, Compute, RebuildPolicy
from recsys.errors import ArtifactError
from recsys.gate import GateDecision, last_timestamp, quality_gate, skipped
from recsys.lock import build_lock
from recsys.versions import VersionStore
from serving.index import IndexParams, IndexTargets, build_annoy
from training.batches import BatchBuilder
from training.config import Similarity, TowerConfig, TrainConfig
from training.distributed import train_with_torchrun
from training.embed import TowerScorer, item_embeddings, user_embeddings_now
from training.export import ROW_STATE, SPEC, WEIGHTS, load_model, save_model
from training.model import ModelSpec, TwoTower
from training.parallel import check_sharding
from training.trainer import TrainResult, build_split, model_spec, train
from training.warm_start import load_warm_start, warm_start_problem

log = logging.getLogger(__name__)

DATA_DIR = "data"
MODEL_DIR = "model"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
INDEX_QUERY_SAMPLE = 1000


@dataclass
class BuildReport:
    version: str
    path: Path
    ingest: IngestReport
    train: TrainResult
    index: IndexParams
    seconds: float
    promoted: bool = True
    warm_start_from: str | None = None
    gate: GateDecision | None = None
    pruned: list[str] = field(default_factory=list)


def _embedding_frame(
    ids: pl.Series, index_name: str, known: np.ndarray, emb: np.ndarray
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            index_name: np.arange(len(emb), dtype=np.uint32),
            ids.name: ids,
            "known": known,
            "embedding": emb.astype(np.float32),
        }
    )


def _save_curve(history: list[dict[str, Any]], path: Path, eval_k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    left.set(xlabel="epoch", ylabel="train loss")
    right = left.twinx()
    right.plot(epochs, [h[f"valid_recall@{eval_k}"] for h in history], "s-", color="tab:orange")
    right.set_ylabel(f"validation recall@{eval_k}")
    left.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(
    source: DataSource,
    root: Path,
    tower: TowerConfig | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    policy: RebuildPolicy | None = None,
    index_targets: IndexTargets | None = None,
    compute: Compute | None = None,
) -> BuildReport:
    """One build under the artifacts directory's lock; see the module docstring."""
    with build_lock(root) as died:
        store = VersionStore(root)
        abandoned = store.discard_abandoned_staging()
        if died or abandoned:
            log.warning("cleaned up after a build that died: removed %s", abandoned or "nothing")
        return _build_locked(
            source,
            store,
            tower or TowerConfig(),
            config,
            progress,
            policy or RebuildPolicy(),
            index_targets or IndexTargets(),
            compute or Compute(),
        )


def _warm_start_dir(
    previous: Path | None, features: FeatureSet, tower: TowerConfig, policy: RebuildPolicy
) -> Path | None:
    """The current version's model directory, when the new model can start from it (its
    weights are read only by whoever trains: this process or the torchrun ranks)."""
    if previous is None or policy.from_scratch:
        return None
    old = ModelSpec.from_dict(json.loads((previous / MODEL_DIR / SPEC).read_text()))
    problem = warm_start_problem(old, model_spec(features, tower))
    if problem:
        log.warning("training from scratch: cannot warm-start from %s (%s)", previous.name, problem)
        return None
    return previous / MODEL_DIR


def _full_run_epochs(manifest: dict[str, Any]) -> int:
    """Epochs of the last from-scratch run in a version's lineage."""
    train = manifest.get("train", {})
    return int(train.get("full_run_epochs") or train.get("epochs_run") or 1)


def _warm_budget(config: TrainConfig, full_run_epochs: int) -> TrainConfig:
    """Default warm budget: a third of the epochs the last full run took (early stopping
    included), so that it follows what this data set needs, not the example budget."""
    if config.warm_epochs is not None:
        return config
    return replace(config, warm_epochs=max(1, math.ceil(full_run_epochs / 3)))


def _build_locked(
    source: DataSource,
    store: VersionStore,
    tower: TowerConfig,
    config: TrainConfig | None,
    progress: bool,
    policy: RebuildPolicy,
    index_targets: IndexTargets,
    compute: Compute,
) -> BuildReport:
    started = time.perf_counter()
    previous = store.current() if store.current_name() else None
    name, staging = store.stage()
    try:
        ingest_report = ingest(
            source, staging / DATA_DIR, previous=previous / DATA_DIR if previous else None
        )
        features = FeatureSet.load(staging / DATA_DIR)
        split = build_split(features, config or TrainConfig())
        warm_dir = _warm_start_dir(previous, features, tower, policy)
        full_run_epochs = None
        if warm_dir is not None and previous is not None:
            full_run_epochs = _full_run_epochs(read_manifest(previous, verify=False))
            config = _warm_budget(config or TrainConfig(), full_run_epochs)
        warm_from = previous.name if previous is not None and warm_dir is not None else None
        model_dir = staging / MODEL_DIR
        model_dir.mkdir()
        if compute.nproc > 1:
            check_sharding((config or TrainConfig()).sharding, compute.device)
            result = train_with_torchrun(
                staging / DATA_DIR,
                model_dir,
                compute.nproc,
                tower,
                config or TrainConfig(),
                warm_start=warm_dir,
                device=compute.device,
            )
        else:
            result = train(
                features,
                split,
                tower,
                config,
                device=torch.device(compute.device),
                metrics_path=model_dir / "metrics.jsonl",
                progress=progress,
                warm_start=load_warm_start(warm_dir, WEIGHTS, ROW_STATE) if warm_dir else None,
            )
            save_model(
                result.state, result.spec, model_dir, result.row_state, result.validated_state
            )
        settings = BuildConfig(tower, config or TrainConfig(), index_targets, policy, compute)
        (staging / CONFIG_FILE).write_text(settings.to_toml())
        (model_dir / "train_config.json").write_text(
            json.dumps(result.config.to_dict(), indent=2) + "\n"
        )
        _save_curve(result.history, model_dir / "training_curve.png", result.config.eval_k)

        model = load_model(model_dir)
        builder = BatchBuilder(features, tower)
        builder.mark_known(features.interactions if result.refitted else split.train)
        items = item_embeddings(model, builder, features.num_items)
        users = user_embeddings_now(model, builder, np.arange(features.num_users))
        vocab = {
            p.stem: pl.read_parquet(p)["id"]
            for p in (staging / DATA_DIR / "vocab").glob("*_id.parquet")
        }
        emb_dir = staging / EMBEDDINGS_DIR
        emb_dir.mkdir()
        _embedding_frame(
            vocab[s.ITEM_ID].rename(s.ITEM_ID), s.ITEM_IDX, builder.known_items, items
        ).write_parquet(emb_dir / "items.parquet")
        _embedding_frame(
            vocab[s.USER_ID].rename(s.USER_ID), s.USER_IDX, builder.known_users, users
        ).write_parquet(emb_dir / "users.parquet")
        rng = np.random.default_rng(result.config.seed)
        sample = users[rng.choice(len(users), min(INDEX_QUERY_SAMPLE, len(users)), replace=False)]
        metric = "angular" if tower.similarity is Similarity.COSINE else "dot"
        index = build_annoy(items, sample, staging / INDEX_DIR, metric, index_targets)
        gate = None
        if previous is not None and policy.gate:
            validated = load_model(model_dir, validated=True)
            gate = _gate(previous, validated, features, split, result.config, policy.gate_margin)
            log.warning("quality gate: %s", gate.reason)
        store.commit(
            name,
            staging,
            {
                "kind": "build",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "embedding_dim": tower.embedding_dim,
                "similarity": tower.similarity.value,
                "index": asdict(index),
                "data": asdict(ingest_report),
                "train": {
                    "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history),
                    "seconds": round(result.seconds, 2),
                    "seed": result.config.seed,
                    "ranks": compute.nproc,
                    "device": compute.device,
                    "sharding": result.sharding,
                    "valid_metrics": result.best_metrics,
                    "warm_start_from": warm_from,
                    "full_run_epochs": full_run_epochs or len(result.history),
                    "refit_epochs": result.refit_epochs,
                },
                "gate": asdict(gate) if gate else None,
                "previous_version": previous.name if previous else None,
                "settings": settings.to_dict(),  # as given; train_config.json: as resolved
                "ordering": {
                    "ordering": ingest_report.ordering,
                    "reason": ingest_report.ordering_reason,
                },
            },
        )
    except BaseException:
        store.discard(staging)
        raise
    promoted = gate is None or gate.promoted
    if promoted:
        store.promote(name)
    return BuildReport(
        name,
        store.versions / name,
        ingest_report,
        result,
        index,
        time.perf_counter() - started,
        promoted=promoted,
        warm_start_from=warm_from,
        gate=gate,
        pruned=store.prune(policy.keep_versions),
    )


def _gate(
    previous: Path,
    model: TwoTower,
    features: FeatureSet,
    split: Split,
    config: TrainConfig,
    margin: float,
) -> GateDecision:
    """Both versions see each user's training events and are asked for the held-out ones."""
    seen = features.restricted_to(split.train)
    builder = BatchBuilder(seen, model.spec.tower)
    builder.mark_known(split.train)
    candidate = TowerScorer(model, builder, features.num_items)
    try:
        old_model, old_builder = version_towers(previous, seen, validated=True)
    except ArtifactError as exc:
        return skipped(f"current version {previous.name} not comparable: {exc}")
    current = TowerScorer(
        old_model, old_builder, old_model.spec.num_items, catalogue=features.num_items
    )
    return quality_gate(
        candidate,
        current,
        seen,
        split.valid,
        last_timestamp(previous),
        margin,
        metric=f"recall@{config.eval_k}",
        max_users=config.max_valid_users,
        seed=config.seed,
    )


def version_towers(
    version_dir: Path, features: FeatureSet, validated: bool = False
) -> tuple[TwoTower, BatchBuilder]:
    """A built version's towers and a batch builder with the version's known-ID masks.

    `features` may be a grown log (a newer version's data): users, items and categories
    the version never saw are then left out, as the version would have to. `validated`
    takes the weights from before the refit on every event, where the version has them
    (what to measure on validation events)."""
    model = load_model(version_dir / MODEL_DIR, validated=validated)
    builder = BatchBuilder(features, model.spec.tower)
    if set(builder.keys.order) != set(model.spec.keys.order):  # the model looks keys up by name
        raise ArtifactError(
            f"{version_dir}: the model reads features {list(model.spec.keys.order)}, "
            f"the data has {list(builder.keys.order)}"
        )
    known = {
        side: pl.read_parquet(version_dir / EMBEDDINGS_DIR / f"{side}.parquet", columns=["known"])
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


def version_scorer(version_dir: Path, features: FeatureSet, validated: bool = False) -> TowerScorer:
    """A scorer with a built version's towers and its ID/feature masks."""
    model, builder = version_towers(version_dir, features, validated)
    return TowerScorer(model, builder, features.num_items)


def evaluate_version(version_dir: Path) -> dict[str, float]:
    """Full-ranking metrics of a version on its validation split (each user's last event
    in a sequence, a share of each validation user's items in a set)."""
    from training.evaluate import eval_task, evaluate

    features = FeatureSet.load(version_dir / DATA_DIR)
    config = TrainConfig.from_dict(
        json.loads((version_dir / MODEL_DIR / "train_config.json").read_text())
    )
    split = build_split(features, config)
    seen = features.restricted_to(split.train)
    scorer = version_scorer(version_dir, seen, validated=True)
    return evaluate(scorer, eval_task(split.valid, seen.histories))
