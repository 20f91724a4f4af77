"""The quality gate of a rebuild: the candidate and the current version are measured on the
same recent held-out slice, and the candidate is promoted only if it is not worse than the
current version by more than a margin.

The slice is the candidate's validation events (each user's last event, never trained on)
that are newer than everything the current version saw, so neither model has trained on
them. When too few users have such events (a log that did not grow in time, or has no
timestamps), all validation events are used and the decision says so.
"""

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.feature_set import FeatureSet
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from training.evaluate import Scorer, eval_task, evaluate, sample_task

MIN_RECENT_USERS = 100


@dataclass(frozen=True)
class GateDecision:
    metric: str
    candidate: float
    current: float
    margin: float  # relative: promote if candidate >= current * (1 - margin)
    slice: str  # "recent" or "validation"
    users: int
    promoted: bool
    reason: str


def gate_slice(valid: pl.DataFrame, seen_until: int | None) -> tuple[pl.DataFrame, str]:
    """Validation events after `seen_until` (the current version's last timestamp)."""
    if seen_until is None or s.TIMESTAMP not in valid.columns:
        return valid, "validation"
    recent = valid.filter(pl.col(s.TIMESTAMP) > seen_until)
    if recent[s.USER_IDX].n_unique() < MIN_RECENT_USERS:
        return valid, "validation"
    return recent, "recent"


def passes(candidate: float, current: float, margin: float) -> bool:
    return candidate >= current * (1.0 - margin)


def quality_gate(
    candidate: Scorer,
    current: Scorer,
    features: FeatureSet,
    valid: pl.DataFrame,
    seen_until: int | None,
    margin: float,
    metric: str = "recall@20",
    max_users: int = 10_000,
    seed: int = 0,
) -> GateDecision:
    rows, slice_name = gate_slice(valid, seen_until)
    task = sample_task(eval_task(rows, features.histories), max_users, seed)
    new, old = evaluate(candidate, task)[metric], evaluate(current, task)[metric]
    promoted = passes(new, old, margin)
    verdict = "not worse than" if promoted else "worse than"
    return GateDecision(
        metric=metric,
        candidate=round(new, 6),
        current=round(old, 6),
        margin=margin,
        slice=slice_name,
        users=len(task),
        promoted=promoted,
        reason=f"candidate {metric} {new:.4f} is {verdict} current {old:.4f} "
        f"minus {margin:.0%} on {len(task)} users ({slice_name} slice)",
    )


def skipped(reason: str) -> GateDecision:
    """No comparison possible (the current version reads other features): promote."""
    return GateDecision("", 0.0, 0.0, 0.0, "", 0, True, reason)


def last_timestamp(version_dir: Path) -> int | None:
    value = read_manifest(version_dir, verify=False).get("data", {}).get("last_timestamp")
    return None if value is None else int(value)
