"""The quality gate of a rebuild: the candidate, the current version and the best of the
recent versions are measured on the same held-out slice, user by user, and the candidate
is promoted unless it is worse than either reference with 95% confidence.

The rule is noise-aware: the per-user differences of the metric are resampled (a
bootstrap over users), and the candidate fails only when the whole 95% interval of its
mean difference lies below zero (or below `-margin x` the reference, with a margin). A
fixed relative margin let quality slide: 0.314 promoted over 0.324, and one small loss
after another would pass. Comparing with the best recent version too stops that drift:
losses that are each within noise add up until they are not.

The slice is the candidate's validation events (never trained on) that are newer than
everything the current version saw, so neither model has trained on them. When too few
users have such events (a log that did not grow in time, or has no timestamps), all
validation events are used and the decision says so. With no validation users at all
there is nothing to compare on: the candidate is promoted, and the decision says so.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from features.feature_set import FeatureSet
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from training.evaluate import Scorer, eval_task, evaluate_per_user, sample_task

MIN_RECENT_USERS = 100
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    """The candidate against one reference version on the same users."""

    version: str
    reference: float  # the reference's mean metric
    difference: float  # candidate minus reference
    interval: tuple[float, float]  # 95% bootstrap interval of the difference
    worse: bool  # the whole interval lies below -margin x reference


@dataclass(frozen=True)
class GateDecision:
    metric: str
    candidate: float
    current: float
    margin: float  # tolerated loss, relative to a reference (0: none beyond noise)
    slice: str  # "recent" or "validation"
    users: int
    promoted: bool
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)  # current, then best recent


def bootstrap_interval(
    differences: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """The 95% percentile interval of the mean of `differences`, resampled over users."""
    if len(differences) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 200):  # (200, users) at a time: bounded memory
        draws = rng.integers(0, len(differences), (min(200, samples - start), len(differences)))
        means[start : start + len(draws)] = differences[draws].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def gate_slice(valid: pl.DataFrame, seen_until: int | None) -> tuple[pl.DataFrame, str]:
    """Validation events after `seen_until` (the current version's last timestamp)."""
    if seen_until is None or s.TIMESTAMP not in valid.columns:
        return valid, "validation"
    recent = valid.filter(pl.col(s.TIMESTAMP) > seen_until)
    if recent[s.USER_IDX].n_unique() < MIN_RECENT_USERS:
        return valid, "validation"
    return recent, "recent"


def compare(
    name: str, candidate: np.ndarray, reference: np.ndarray, margin: float, seed: int
) -> Comparison:
    low, high = bootstrap_interval(candidate - reference, seed)
    mean = float(reference.mean()) if len(reference) else 0.0
    return Comparison(
        version=name,
        reference=round(mean, 6),
        difference=round(float((candidate - reference).mean()) if len(reference) else 0.0, 6),
        interval=(round(low, 6), round(high, 6)),
        worse=not high >= -margin * mean,  # a NaN interval or reference counts as worse
    )


def decide(
    candidate: np.ndarray,
    references: Mapping[str, np.ndarray],
    current: str,
    margin: float,
    seed: int = 0,
) -> list[Comparison]:
    """The candidate's per-user metric against the current version's and, when another
    recent version scores higher, against that best one too."""
    best = max(references, key=lambda name: float(references[name].mean()))
    names = [current] + ([best] if best != current else [])
    return [compare(n, candidate, references[n], margin, seed) for n in names]


def quality_gate(
    candidate: Scorer,
    current: tuple[str, Scorer],
    features: FeatureSet,
    valid: pl.DataFrame,
    seen_until: int | None,
    margin: float,
    metric: str = "recall@20",
    max_users: int = 10_000,
    seed: int = 0,
    recent: Mapping[str, Scorer] | None = None,
) -> GateDecision:
    """Compare the candidate with the current version and with the best of `recent`
    (other kept versions that read the same features), user by user."""
    rows, slice_name = gate_slice(valid, seen_until)
    task = sample_task(eval_task(rows, features.histories), max_users, seed)
    if len(task) == 0:
        return nothing_to_compare(metric, margin)
    new = evaluate_per_user(candidate, task)[metric]
    references = {current[0]: evaluate_per_user(current[1], task)[metric]}
    for name, scorer in (recent or {}).items():
        references[name] = evaluate_per_user(scorer, task)[metric]
    comparisons = decide(new, references, current[0], margin, seed)
    promoted = not any(c.worse for c in comparisons)
    score = float(new.mean()) if len(new) else 0.0
    parts = [
        f"{c.version} {c.reference:.4f} (difference {c.difference:+.4f}, 95% interval "
        f"{c.interval[0]:+.4f} to {c.interval[1]:+.4f}{': worse' if c.worse else ''})"
        for c in comparisons
    ]
    verdict = "promoted" if promoted else "rejected: worse with 95% confidence"
    return GateDecision(
        metric=metric,
        candidate=round(score, 6),
        current=comparisons[0].reference,
        margin=margin,
        slice=slice_name,
        users=len(task),
        promoted=promoted,
        reason=f"candidate {metric} {score:.4f} against current {parts[0]}"
        + (f" and best recent {parts[1]}" if len(parts) > 1 else "")
        + f" on {len(task)} users ({slice_name} slice): {verdict}",
        comparisons=comparisons,
    )


def not_comparable(reason: str) -> GateDecision:
    """No comparison possible (the current version reads other features): a gate that
    cannot compare does not promote; `--no-gate` is the way to promote anyway."""
    return GateDecision("", 0.0, 0.0, 0.0, "", 0, False, reason)


def nothing_to_compare(metric: str, margin: float) -> GateDecision:
    """No validation users (a log in which every user has one event holds none out): there
    is no evidence against the candidate, so it is promoted as a first build is, and the
    decision says why; refusing would leave such a log's versions stale for good."""
    reason = (
        "cannot compare: no validation users (no user has a held-out event); "
        "promoted without comparing, as a first build is"
    )
    return GateDecision(metric, 0.0, 0.0, margin, "none", 0, True, reason)


def last_timestamp(version_dir: Path) -> int | None:
    value = read_manifest(version_dir, verify=False).get("data", {}).get("last_timestamp")
    return None if value is None else int(value)
