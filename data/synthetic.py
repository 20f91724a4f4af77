"""Synthetic interaction logs with planted structure, for tests and scale benchmarks.

Items belong to taste clusters and have power-law popularity; each user has a home
cluster and takes most of their items from it, so a model that learns the structure can
predict a user's held-out items far better than popularity can. Generation is vectorised
and chunked by users, so 100M rows never sit in memory at once.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.core.artifacts import write_parquet

GENRES = tuple(f"genre-{i:02d}" for i in range(20))
_DAY = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of a synthetic data set; users and items scale with the row count by default."""

    rows: int = 100_000
    users: int | None = None  # default: rows // 50 (at least 50)
    items: int | None = None  # default: rows // 100 (at least 50)
    clusters: int = 20
    taste: float = 0.8  # share of a user's events drawn from the home cluster
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity
    days: int = 30
    start: int = 1_700_000_000  # first timestamp, seconds
    seed: int = 0
    chunk_rows: int = 2_000_000

    @property
    def n_users(self) -> int:
        return self.users or max(50, self.rows // 50)

    @property
    def n_items(self) -> int:
        return self.items or max(50, self.rows // 100)


@dataclass(frozen=True)
class _Catalogue:
    item_cluster: np.ndarray  # (I,)
    by_cluster: np.ndarray  # item ids sorted by cluster
    cluster_keys: np.ndarray  # cluster + within-cluster CDF, increasing
    global_cdf: np.ndarray  # (I,)


def _catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    item_cluster = rng.integers(0, cfg.clusters, cfg.n_items)
    weight = 1.0 / np.arange(1, cfg.n_items + 1) ** cfg.popularity_exponent
    weight = weight[rng.permutation(cfg.n_items)]  # popularity independent of item id
    by_cluster = np.argsort(item_cluster, kind="stable")
    sorted_clusters = item_cluster[by_cluster]
    sorted_weight = weight[by_cluster]
    cumulative = np.cumsum(sorted_weight)
    starts = np.searchsorted(sorted_clusters, np.arange(cfg.clusters))
    ends = np.searchsorted(sorted_clusters, np.arange(cfg.clusters), side="right")
    before = np.where(starts > 0, cumulative[np.maximum(starts - 1, 0)], 0.0)
    totals = np.where(ends > starts, cumulative[np.maximum(ends - 1, 0)] - before, 1.0)
    within = (cumulative - before[sorted_clusters]) / totals[sorted_clusters]
    global_cdf = np.cumsum(weight) / weight.sum()
    return _Catalogue(item_cluster, by_cluster, sorted_clusters + within, global_cdf)


def _sample_items(cat: _Catalogue, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `clusters`; -1 means "any cluster, by global popularity"."""
    items = np.empty(len(clusters), dtype=np.int64)
    anywhere = clusters < 0
    items[anywhere] = np.searchsorted(cat.global_cdf, rng.random(anywhere.sum()), side="right")
    own = ~anywhere
    keys = clusters[own] + rng.random(own.sum())
    position = np.searchsorted(cat.cluster_keys, keys, side="right")
    items[own] = cat.by_cluster[np.minimum(position, len(cat.by_cluster) - 1)]
    return np.minimum(items, len(cat.item_cluster) - 1)


def generate(out: Path, cfg: SyntheticConfig) -> Path:
    """Write `interactions/part-*.parquet`, `items.parquet` and `users.parquet` under `out`."""
    rng = np.random.default_rng(cfg.seed)
    cat = _catalogue(cfg, rng)
    user_cluster = rng.integers(0, cfg.clusters, cfg.n_users)
    activity = rng.lognormal(0.0, 1.0, cfg.n_users)
    counts = rng.multinomial(cfg.rows, activity / activity.sum())
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    boundaries = np.searchsorted(
        np.cumsum(counts), np.arange(cfg.chunk_rows, cfg.rows, cfg.chunk_rows)
    )
    for part, users in enumerate(np.split(np.arange(cfg.n_users), boundaries + 1)):
        if len(users) == 0:
            continue
        user = np.repeat(users, counts[users])
        home = user_cluster[user]
        clusters = np.where(rng.random(len(user)) < cfg.taste, home, -1)
        chunk = pl.DataFrame(
            {
                "user_id": user,
                "item_id": _sample_items(cat, clusters, rng),
                "timestamp": cfg.start + rng.integers(0, cfg.days * _DAY, len(user)),
            }
        )
        write_parquet(chunk, out / "interactions" / f"part-{part:05d}.parquet")
    extra_genre = rng.integers(0, len(GENRES), cfg.n_items)
    genres = [
        sorted({GENRES[c % len(GENRES)], GENRES[e]})
        for c, e in zip(cat.item_cluster.tolist(), extra_genre.tolist(), strict=True)
    ]
    write_parquet(
        pl.DataFrame({"item_id": np.arange(cfg.n_items), "genres": genres}),
        out / "items.parquet",
    )
    write_parquet(
        pl.DataFrame(
            {
                "user_id": np.arange(cfg.n_users),
                "age_group": rng.integers(0, 6, cfg.n_users).astype(np.int32),
                "region": [f"region-{r}" for r in rng.integers(0, 10, cfg.n_users).tolist()],
            }
        ),
        out / "users.parquet",
    )
    return out


def home_clusters(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(user home cluster, item cluster) of a generated data set: the planted truth."""
    rng = np.random.default_rng(cfg.seed)
    cat = _catalogue(cfg, rng)
    return rng.integers(0, cfg.clusters, cfg.n_users), cat.item_cluster
