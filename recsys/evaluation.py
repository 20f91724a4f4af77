"""`recsys evaluate`: versions scored on one fixed set of users, beside popularity.

The honest test of a version is events it never saw (its target events, as the build
chose them: `--events`): those after its log ended (a grown
log, `--data`, or a newer version's data). Such events were used neither for training
nor for early stopping, so the figure says what serving will see. When there are none
(the log has not grown, or has no time), the slice falls back to the newest version's
validation split, scored with the weights validated before the refit, and says that
early stopping chose them on it. Every version and the popularity baseline are asked
about the same users, each seeing the same events before the slice.
"""

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from features.config import FeatureConfig
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.sources import DataSource
from recsys.build_config import BuildConfig, Inputs
from recsys.core import schema as s
from recsys.core.errors import RecsysError
from recsys.core.layout import VersionLayout
from recsys.core.versions import verify_version
from recsys.gate import Comparison, compare, last_timestamp
from training.baselines import Popularity
from training.config import TrainConfig
from training.embed import BranchedScorer, TowerScorer
from training.evaluate import (
    EvalTask,
    Scorer,
    eval_task,
    evaluate,
    evaluate_per_user,
    sample_task,
)
from training.export import version_towers
from training.fit import TRAIN_CONFIG
from training.spectral import Spectral
from training.trainer import build_split

MAX_USERS = 10_000


@dataclass
class Slice:
    description: str
    seen: FeatureSet  # the events every model sees of each user
    task: EvalTask
    validated: bool  # score the weights from before the refit (a validation slice)


def _after(features: FeatureSet, cutoff: int, config: TrainConfig) -> Slice | None:
    """Target events (the build's `target_events`, weight > 0) after `cutoff`."""
    events = features.interactions.with_row_index("row")
    later = events.filter(pl.col(s.TIMESTAMP) > cutoff)
    later = later.filter(config.events.is_target(later))
    if later.is_empty():
        return None
    seen = features.restricted_to(events.filter(pl.col(s.TIMESTAMP) <= cutoff))
    task = sample_task(eval_task(later, seen.histories), MAX_USERS)
    if len(task) == 0:
        return None
    return Slice(f"{later.height:,} events after the versions' logs ended", seen, task, False)


def _train_config(version: Path) -> TrainConfig:
    """The resolved training settings a version was built with (its target events)."""
    return TrainConfig.from_dict(
        json.loads((VersionLayout(version).model / TRAIN_CONFIG).read_text())
    )


def recorded_inputs(version: Path) -> Inputs:
    """What `version` was built from (its column names, side tables), as it recorded them."""
    stored = VersionLayout(version).build_config
    return BuildConfig.from_file(stored).inputs if stored.is_file() else Inputs()


def recorded_source(version: Path, source: DataSource) -> DataSource:
    """A grown log read as `version` read its own: the files' column names it was built
    with, and, where `source` names no side tables, the item table it trained on (the
    service's added items merged in) and its user table. Without them the towers would
    score every item without its features."""
    inputs, layout = recorded_inputs(version), VersionLayout(version)

    def existing(path: Path | str | None) -> Path | None:
        return Path(path) if path is not None and Path(path).is_file() else None

    return replace(
        source,
        columns=source.columns or dict(inputs.columns),
        items=source.items or existing(layout.catalogue_items) or existing(inputs.items),
        users=source.users or existing(inputs.users),
    )


def _feature_config(config: TrainConfig) -> FeatureConfig:
    """Ingest settings that give events the weights the build gave them."""
    return FeatureConfig(event_weights=dict(config.event_weights))


def held_out_slice(newest: Path, test: DataSource, work: Path) -> Slice:
    """A held-out file's (user, item) pairs as the test (a random share of each user's
    items that no build saw: the published protocol for logs without time), every user
    of the file asked as they are in the newest version's data. Pairs of a user or an
    item that version never saw are left out, for every model alike (nothing could rank
    them), and counted in the description."""
    data = VersionLayout(newest).data
    seen = FeatureSet.load(data)
    config = _train_config(newest)
    # The version's IDs keep their indices; its column names and event weights apply.
    ingest(test, work / "test", _feature_config(config), previous=data)
    pairs = FeatureSet.load(work / "test").interactions
    pairs = pairs.filter(config.events.is_target(pairs))
    known = pairs.filter(
        (pl.col(s.USER_IDX) < seen.num_users) & (pl.col(s.ITEM_IDX) < seen.num_items)
    )
    if known.is_empty():
        raise RecsysError(
            f"{', '.join(map(str, test.interactions))}: none of its {pairs.height:,} target "
            f"events has a user and an item that {newest.name} knows"
        )
    task = eval_task(known, seen.histories)
    left_out = pairs.height - known.height
    description = (
        f"{known.height:,} held-out events of {', '.join(p.name for p in test.interactions)}"
        + (
            f" ({left_out:,} of users or items {newest.name} never saw left out)"
            if left_out
            else ""
        )
    )
    return Slice(description, seen, task, False)


def evaluation_slice(versions: list[Path], source: DataSource | None, work: Path) -> Slice:
    """Events after every version's log (from `source`, or the newest version's data),
    else the newest version's validation split."""
    newest = max(versions, key=lambda v: v.name)
    data = VersionLayout(newest).data
    config = _train_config(newest)
    if source is not None:
        ingest(source, work / "data", _feature_config(config), previous=data)
        data = work / "data"
    features = FeatureSet.load(data)
    stamps = [last_timestamp(v) for v in versions]
    if all(stamp is not None for stamp in stamps):
        cutoff = max(stamp for stamp in stamps if stamp is not None)
        later = _after(features, cutoff, config)
        if later is not None:
            return later
    split = build_split(features, config)
    seen = features.restricted_to(split.train)
    task = sample_task(eval_task(split.valid, seen.histories), MAX_USERS)
    description = (
        f"the validation split of {newest.name} (early stopping chose the weights on it; "
        "no events after the versions' logs: give the grown log with --data)"
    )
    return Slice(description, seen, task, True)


def evaluate_versions(
    versions: list[Path], source: DataSource | None = None, test: DataSource | None = None
) -> tuple[Slice, dict[str, dict[str, float]]]:
    """Metrics of each version and of popularity on one slice, keyed by name: `test`'s
    held-out events when given, else `evaluation_slice`'s."""
    for version in versions:
        verify_version(version)
    newest = max(versions, key=lambda v: v.name)
    source = recorded_source(newest, source) if source is not None else None
    with tempfile.TemporaryDirectory(prefix="recsys-evaluate-") as tmp:
        if test is not None:
            test = replace(test, columns=test.columns or recorded_inputs(newest).columns)
            chosen = held_out_slice(newest, test, Path(tmp))
        else:
            chosen = evaluation_slice(versions, source, Path(tmp))
    results = {}
    features = chosen.seen
    for version in versions:
        results[version.name] = evaluate(version_scorer(version, chosen), chosen.task)
    popularity = Popularity.fit(features.interactions, features.num_items)
    results["popularity"] = evaluate(popularity, chosen.task)
    return chosen, results


def version_scorer(version: Path, chosen: Slice) -> Scorer:
    """What a version serves, scored on the slice: its towers and, on events it never saw,
    its spectral branch. On its own validation split the towers are scored as validated
    (the weights from before the refit) and the branch, fitted on every event, is left
    out: it has seen those events."""
    model, builder = version_towers(version, chosen.seen, validated=chosen.validated)
    towers = TowerScorer(model, builder, model.spec.num_items, catalogue=chosen.seen.num_items)
    branch = None if chosen.validated else Spectral.load(VersionLayout(version).spectral)
    return towers if branch is None else BranchedScorer(towers, branch, chosen.seen)


def compare_versions(versions: list[Path], chosen: Slice, metric: str = "recall@20") -> Comparison:
    """The second version against the first, user by user on the chosen slice: the mean
    difference of `metric` and its 95% bootstrap interval, as the quality gate computes
    them (an interval that excludes 0 is a difference beyond noise)."""
    first, second = (
        evaluate_per_user(version_scorer(v, chosen), chosen.task)[metric] for v in versions[:2]
    )
    return compare(versions[0].name, second, first, margin=0.0, seed=0)
