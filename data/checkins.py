"""Sparse synthetic logs shaped like location check-ins, for quality on sparse data.

`data.synthetic` plants twenty broad taste clusters in a dense log. Public sparse
benchmarks look different: about 30 distinct items per user and per item (0.1% of the
matrix filled), many small local neighbourhoods rather than a few broad tastes, and
heavy-tailed popularity and activity. This generator plants that structure: items are
places in cities of Zipf-distributed size, each user lives at a point in a home city
and picks places near it (weighted by the place's popularity), with a share of their
events in one or two other cities they visit. A model that learns who goes where beats
popularity by far; the neighbourhoods are small enough that item-item methods are strong
peers, as they are on such data.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.core.artifacts import write_parquet


@dataclass(frozen=True)
class CheckinConfig:
    """Shape of a check-in log; users, items and cities scale with the row count."""

    rows: int = 300_000
    events_per_user: float = 34.0  # mean distinct items per user (at least `min_events`)
    events_per_item: float = 25.0  # mean distinct users per item
    items_per_city: float = 80.0
    min_events: int = 10  # the usual 10-core floor of the published splits
    home_share: float = 0.6  # share of a user's events in their home city
    reach: float = 1.0  # how far a user travels within a city (city radius 1)
    wander: float = 0.45  # share of events anywhere, by popularity alone (unpredictable taste)
    popularity_spread: float = 1.5  # sigma of the places' log-normal popularity: higher,
    # a few places draw more of the events (popularity alone scores higher)
    seed: int = 0

    @property
    def n_users(self) -> int:
        return max(20, round(self.rows / self.events_per_user))

    @property
    def n_items(self) -> int:
        return max(50, round(self.rows / self.events_per_item))

    @property
    def n_cities(self) -> int:
        return max(2, round(self.n_items / self.items_per_city))


def _zipf_shares(n: int, rng: np.random.Generator) -> np.ndarray:
    shares = 1.0 / np.arange(1, n + 1)
    return rng.permutation(shares / shares.sum())


def _activity(cfg: CheckinConfig, rng: np.random.Generator) -> np.ndarray:
    """Distinct items per user: `min_events` plus a heavy (log-normal) tail, mean as asked."""
    tail = rng.lognormal(0.0, 1.0, cfg.n_users)
    extra = max(cfg.events_per_user - cfg.min_events, 0.0)
    return cfg.min_events + np.round(tail / tail.mean() * extra).astype(np.int64)


def _pick(
    weights: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows' distinct picks: row r takes counts[r] columns without replacement, each in
    proportion to weights[r] (Gumbel top-k). Returns (row, column) pairs."""
    counts = np.minimum(counts, weights.shape[1])
    keys = np.log(np.maximum(weights, 1e-30)) + rng.gumbel(size=weights.shape)
    order = np.argsort(-keys, axis=1)
    take = np.arange(weights.shape[1])[None, :] < counts[:, None]
    rows = np.broadcast_to(np.arange(len(counts))[:, None], order.shape)[take]
    return rows, order[take]


def generate(out: Path, cfg: CheckinConfig) -> Path:
    """Write `interactions.parquet` (user_id, item_id; no timestamp) and `items.parquet`
    (item_id, city) under `out`."""
    rng = np.random.default_rng(cfg.seed)
    item_city = rng.choice(cfg.n_cities, cfg.n_items, p=_zipf_shares(cfg.n_cities, rng))
    item_place = rng.normal(0.0, 1.0, (cfg.n_items, 2))
    item_popularity = rng.lognormal(0.0, cfg.popularity_spread, cfg.n_items)
    city_share = np.bincount(item_city, minlength=cfg.n_cities) / cfg.n_items
    user_city = rng.choice(cfg.n_cities, cfg.n_users, p=city_share)  # residents ~ places
    user_place = rng.normal(0.0, 1.0, (cfg.n_users, 2))
    activity = _activity(cfg, rng)
    trips = rng.integers(0, cfg.n_cities, (cfg.n_users, 2))  # visited cities, by number
    anywhere = rng.binomial(activity, cfg.wander)
    cdf = np.cumsum(item_popularity) / item_popularity.sum()
    users = [np.repeat(np.arange(cfg.n_users), anywhere)]
    items = [np.minimum(np.searchsorted(cdf, rng.random(anywhere.sum())), cfg.n_items - 1)]
    activity = activity - anywhere
    away = rng.binomial(activity, 1.0 - cfg.home_share)
    for city in range(cfg.n_cities):
        places = np.flatnonzero(item_city == city)
        if len(places) == 0:
            continue
        # Home events: near the user's point, weighted by popularity.
        residents = np.flatnonzero(user_city == city)
        if len(residents):
            distance = ((user_place[residents, None, :] - item_place[None, places, :]) ** 2).sum(-1)
            weights = item_popularity[places][None, :] * np.exp(-distance / (2 * cfg.reach**2))
            rows, cols = _pick(weights, activity[residents] - away[residents], rng)
            users.append(residents[rows])
            items.append(places[cols])
        # Trips: visitors split their away events over their two cities; popular places.
        for slot in (0, 1):
            visitors = np.flatnonzero((trips[:, slot] == city) & (user_city != city))
            if len(visitors) == 0:
                continue
            share = (away[visitors] + (1 - slot)) // 2
            weights = np.broadcast_to(item_popularity[places], (len(visitors), len(places)))
            rows, cols = _pick(weights, share, rng)
            users.append(visitors[rows])
            items.append(places[cols])
    out.mkdir(parents=True, exist_ok=True)
    log = pl.DataFrame({"user_id": np.concatenate(users), "item_id": np.concatenate(items)})
    write_parquet(log.unique().sort("user_id", "item_id"), out / "interactions.parquet")
    write_parquet(
        pl.DataFrame({"item_id": np.arange(cfg.n_items), "city": item_city.astype(np.int64)}),
        out / "items.parquet",
    )
    return out
