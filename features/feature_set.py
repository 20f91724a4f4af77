"""Everything training needs from one ingest output, loaded once: the cleaned
interactions, users' histories, item/user feature bags and the vocabulary sizes."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from features.history import UserHistories
from features.ingest import INTERACTIONS_FILE, load_vocabularies
from features.ordering import Ordering
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from recsys.core.errors import ArtifactError


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
        interactions = scan.collect()
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
