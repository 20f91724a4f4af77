"""Everything training needs from one ingest output, loaded once: the cleaned
interactions, users' histories, item/user feature bags and the vocabulary sizes."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from features.events import WEIGHT_CEILING, weight_cap
from features.history import UserHistories
from features.ingest import INTERACTIONS_FILE, load_vocabularies
from features.ordering import Ordering
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from recsys.core.errors import ArtifactError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    interactions: pl.DataFrame  # recsys.core.schema.CLEAN_SCHEMA, sorted by (user, time)
    histories: UserHistories
    num_users: int
    num_items: int
    item_bags: pl.DataFrame | None  # item_idx + List[UInt32] per feature, one row per item
    user_bags: pl.DataFrame | None
    category_counts: dict[str, dict[str, int]]  # side -> feature -> number of categories
    ordering: Ordering = Ordering.SEQUENCE

    def restricted_to(self, events: pl.DataFrame) -> "FeatureSet":
        """The same features with only these events (e.g. a split's training rows, still
        sorted by user): what the model may see of each user while it is validated."""
        interactions = events.select(self.interactions.columns)
        return replace(
            self,
            interactions=interactions,
            histories=UserHistories.from_interactions(interactions, self.num_users, self.ordering),
        )

    @classmethod
    def load(
        cls, directory: Path, verify: bool = True, users: tuple[int, int] | None = None
    ) -> "FeatureSet":
        """Load an ingest output directory after checking its manifest and checksums.

        `users = (first, end)` reads only the events of users first..end-1 (a training
        rank's shard: Parquet row groups outside the range are skipped, as the table is
        sorted by user); vocabularies and side tables are always whole."""
        manifest = read_manifest(directory, verify=verify)
        if manifest.get("kind") != "ingest":
            raise ArtifactError(f"{directory}: not an ingest output (kind={manifest.get('kind')})")
        vocabs = load_vocabularies(directory)
        num_users, num_items = len(vocabs[s.USER_ID]), len(vocabs[s.ITEM_ID])
        scan = pl.scan_parquet(directory / INTERACTIONS_FILE)
        if users is not None:
            scan = scan.filter(pl.col(s.USER_IDX).is_between(users[0], users[1], closed="left"))
        interactions = _capped(scan.collect(), directory, manifest)
        bags = {
            side: pl.read_parquet(directory / f"{side[:-1]}_features.parquet")
            if (directory / f"{side[:-1]}_features.parquet").is_file()
            else None
            for side in ("items", "users")
        }
        counts = {
            side: dict(summary["features"])
            for side, summary in manifest["summary"]["side_tables"].items()
        }
        ordering = Ordering(manifest["summary"].get("ordering", Ordering.SEQUENCE.value))
        return cls(
            interactions=interactions,
            histories=UserHistories.from_interactions(interactions, num_users, ordering),
            num_users=num_users,
            num_items=num_items,
            item_bags=bags["items"],
            user_bags=bags["users"],
            category_counts=counts,
            ordering=ordering,
        )


def _capped(interactions: pl.DataFrame, directory: Path, manifest: dict) -> pl.DataFrame:
    """`interactions` with no weight above `events.weight_cap`, set by every event of the
    table (a rank's shard is capped as the whole log is)."""
    median = (
        pl.scan_parquet(directory / INTERACTIONS_FILE)
        .filter(pl.col(s.WEIGHT) > 0)
        .select(pl.col(s.WEIGHT).median())
        .collect()
        .item()
    )
    cap = weight_cap(median)
    if cap is None:
        return interactions
    configured = list(manifest.get("feature_config", {}).get("event_weights", {}) or {})
    heavy = (pl.col(s.WEIGHT) > cap) & ~pl.col(s.EVENT).is_in(configured).fill_null(False)
    above = interactions.select(heavy.sum()).item()
    if above:
        log.warning(
            "%d events weigh more than %g x the log's median weight (%g): counted at %g",
            above,
            WEIGHT_CEILING,
            median,
            cap,
        )
    return interactions.with_columns(
        pl.when(heavy).then(pl.lit(cap, pl.Float32)).otherwise(pl.col(s.WEIGHT)).alias(s.WEIGHT)
    )


def user_shard(directory: Path, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous range of users whose events rank `rank` of `world_size` trains on,
    cut so that every rank gets about the same number of events."""
    counts = (
        pl.scan_parquet(directory / INTERACTIONS_FILE)
        .group_by(s.USER_IDX)
        .len()
        .sort(s.USER_IDX)
        .collect()
    )
    users = counts[s.USER_IDX].to_numpy().astype(np.int64)
    cumulative = np.cumsum(counts["len"].to_numpy())
    total = int(cumulative[-1]) if len(cumulative) else 0
    cuts = [0]
    for r in range(1, world_size):
        position = int(np.searchsorted(cumulative, total * r / world_size))
        cuts.append(int(users[position]) + 1 if position < len(users) else cuts[-1])
    end = int(users[-1]) + 1 if len(users) else 0
    cuts.append(max(end, cuts[-1]))
    return cuts[rank], cuts[rank + 1]
