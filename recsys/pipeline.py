"""`recsys build`: ingest -> train -> embed items and users -> build the index -> seal a new
version -> promote it to current. Every step writes into the staging directory, so a
failure anywhere leaves the current version untouched."""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.feature_set import FeatureSet
from features.ingest import IngestReport, ingest
from features.sources import DataSource
from features.splits import leave_last_out
from recsys import schema as s
from recsys.versions import VersionStore
from serving.index import IndexParams, build_annoy
from training.batches import BatchBuilder
from training.config import Similarity, TowerConfig, TrainConfig
from training.embed import TowerScorer, item_embeddings, user_embeddings_now
from training.export import load_model, save_model
from training.model import TwoTower
from training.trainer import TrainResult, train

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
) -> BuildReport:
    started = time.perf_counter()
    tower = tower or TowerConfig()
    store = VersionStore(root)
    previous = store.current() if store.current_name() else None
    name, staging = store.stage()
    try:
        ingest_report = ingest(
            source, staging / DATA_DIR, previous=previous / DATA_DIR if previous else None
        )
        features = FeatureSet.load(staging / DATA_DIR)
        split = leave_last_out(features.interactions, n_test=0, n_valid=1)
        model_dir = staging / MODEL_DIR
        model_dir.mkdir()
        result = train(
            features,
            split,
            tower,
            config,
            metrics_path=model_dir / "metrics.jsonl",
            progress=progress,
        )
        save_model(result.state, result.spec, model_dir)
        (model_dir / "train_config.json").write_text(
            json.dumps(asdict(result.config), default=lambda v: v.value, indent=2) + "\n"
        )
        _save_curve(result.history, model_dir / "training_curve.png", result.config.eval_k)

        model = load_model(model_dir)
        builder = BatchBuilder(features, tower)
        builder.mark_known(split.train["row"].to_numpy())
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
        index = build_annoy(items, sample, staging / INDEX_DIR, metric)
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
                    "valid_metrics": result.best_metrics,
                },
                "previous_version": previous.name if previous else None,
            },
        )
    except BaseException:
        store.discard(staging)
        raise
    store.promote(name)
    return BuildReport(
        name, store.versions / name, ingest_report, result, index, time.perf_counter() - started
    )


def version_towers(version_dir: Path, features: FeatureSet) -> tuple[TwoTower, BatchBuilder]:
    """A built version's towers and a batch builder with the version's known-ID masks."""
    model = load_model(version_dir / MODEL_DIR)
    builder = BatchBuilder(features, model.spec.tower)
    known = {
        side: pl.read_parquet(version_dir / EMBEDDINGS_DIR / f"{side}.parquet", columns=["known"])
        for side in ("items", "users")
    }
    builder.known_items = known["items"]["known"].to_numpy()
    builder.known_users = known["users"]["known"].to_numpy()
    return model, builder


def version_scorer(version_dir: Path, features: FeatureSet) -> TowerScorer:
    """A scorer with a built version's towers and its ID/feature masks."""
    model, builder = version_towers(version_dir, features)
    return TowerScorer(model, builder, features.num_items)


def evaluate_version(version_dir: Path) -> dict[str, float]:
    """Full-ranking metrics of a version on its validation split (each user's last event)."""
    from training.evaluate import eval_task, evaluate

    features = FeatureSet.load(version_dir / DATA_DIR)
    split = leave_last_out(features.interactions, n_test=0, n_valid=1)
    return evaluate(
        version_scorer(version_dir, features), eval_task(split.valid, features.histories)
    )
