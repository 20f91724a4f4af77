"""Everything training needs from one ingest output, loaded once: the cleaned
interactions, users' histories, item/user feature bags and the vocabulary sizes."""

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.history import UserHistories
from features.ingest import INTERACTIONS_FILE, load_vocabularies
from recsys import schema as s
from recsys.artifacts import read_manifest
from recsys.errors import ArtifactError


@dataclass(frozen=True)
class FeatureSet:
    interactions: pl.DataFrame  # recsys.schema.CLEAN_SCHEMA, sorted by (user, time)
    histories: UserHistories
    num_users: int
    num_items: int
    item_bags: pl.DataFrame | None  # item_idx + List[UInt32] per feature, one row per item
    user_bags: pl.DataFrame | None
    category_counts: dict[str, dict[str, int]]  # side -> feature -> number of categories

    @classmethod
    def load(cls, directory: Path, verify: bool = True) -> "FeatureSet":
        """Load an ingest output directory after checking its manifest and checksums."""
        manifest = read_manifest(directory, verify=verify)
        if manifest.get("kind") != "ingest":
            raise ArtifactError(f"{directory}: not an ingest output (kind={manifest.get('kind')})")
        vocabs = load_vocabularies(directory)
        num_users, num_items = len(vocabs[s.USER_ID]), len(vocabs[s.ITEM_ID])
        interactions = pl.read_parquet(directory / INTERACTIONS_FILE)
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
        return cls(
            interactions=interactions,
            histories=UserHistories.from_interactions(interactions, num_users),
            num_users=num_users,
            num_items=num_items,
            item_bags=bags["items"],
            user_bags=bags["users"],
            category_counts=counts,
        )
