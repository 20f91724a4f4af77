"""Whether a version gets the spectral branch (`training.spectral`), of which rank and
weight: measured on the build's validation split with the towers as validated (the weights
from before the refit) and the filter fitted on the training rows alone, then refitted on
every event. The branch is kept only where it beats the towers alone by MARGIN; the
graph's normalisations (`spectral.NORMALISATIONS`) are tried in turn, and the first that
does is kept, so a log where the lighter one wins pays for one decomposition."""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from features.feature_set import FeatureSet
from features.splits import Split
from training import spectral
from training.batches import BatchBuilder
from training.config import TrainConfig
from training.embed import PrecomputedScorer, item_embeddings, user_embeddings_now
from training.evaluate import EvalTask, eval_task, evaluate, sample_task
from training.model import TwoTower

log = logging.getLogger(__name__)

MARGIN = 1.01  # validation recall the branch must add (x the towers'), against noise


@dataclass
class SpectralChoice:
    branch: spectral.Spectral | None  # fitted on every event and weighted; None: off
    rank: int = 0
    normalisation: float = spectral.NORMALISATIONS[0]  # the graph's degree exponent
    output: float = spectral.OUTPUT_EXPONENT  # the item rows' degree exponent
    weight: float = 0.0  # on the filtered score, beside the towers' 1
    valid: dict[str, float] = field(default_factory=dict)  # option -> validation recall
    reason: str = ""
    seconds: float = 0.0
    basis_rank: int = 0  # the width of the decomposition the rank was cut from

    def to_dict(self) -> dict[str, Any]:
        return {
            "used": self.branch is not None,
            "rank": self.rank,
            "basis_rank": self.basis_rank,
            "normalisation": self.normalisation,
            "output_exponent": self.output,
            "weight": round(self.weight, 6),
            "valid": {k: round(v, 6) for k, v in self.valid.items()},
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
        }


def choose(
    features: FeatureSet, split: Split, validated: TwoTower, config: TrainConfig
) -> SpectralChoice:
    started = time.perf_counter()
    choice = _choose(features, split, validated, config)
    choice.seconds = time.perf_counter() - started
    log.info("spectral branch: %s (%.1f s)", choice.reason, choice.seconds)
    return choice


def _choose(
    features: FeatureSet, split: Split, validated: TwoTower, config: TrainConfig
) -> SpectralChoice:
    if not config.spectral:
        return SpectralChoice(None, reason="off: train.spectral = false")
    if features.num_items > spectral.MAX_ITEMS:
        return SpectralChoice(
            None,
            reason=f"off: {features.num_items:,} items (considered up to {spectral.MAX_ITEMS:,})",
        )
    if split.valid.height == 0:
        return SpectralChoice(None, reason="off: no validation events to choose it on")
    seen = features.restricted_to(split.train)
    task = sample_task(eval_task(split.valid, seen.histories), config.max_valid_users, config.seed)
    if len(task) == 0:
        return SpectralChoice(None, reason="off: no validation users to choose it on")
    train = spectral.interaction_matrix(split.train, features.num_users, features.num_items)
    ranks = spectral.candidate_ranks(*train.shape)
    if not ranks:
        return SpectralChoice(None, reason="off: too few users or items for a rank")
    builder = BatchBuilder(seen, validated.spec.tower)
    builder.mark_known(split.train)
    towers = (
        user_embeddings_now(validated, builder, task.users),
        item_embeddings(validated, builder, features.num_items),
    )
    valid: dict[str, float] = {}
    for normalisation in spectral.NORMALISATIONS:
        choice, chosen_on = _choose_at(normalisation, train, ranks, task, towers, valid, config)
        if choice.branch is not None:
            everything = spectral.interaction_matrix(
                features.interactions, features.num_users, features.num_items
            )
            # the validated rank cut from a basis as wide as the one it was chosen from,
            # begun where that one ended (`spectral.top_right_singular_vectors`)
            basis = spectral.decompose(
                everything, chosen_on.rank, config.seed, normalisation, start=chosen_on
            )
            choice.basis_rank = basis.rank
            choice.branch = spectral.weighted(
                basis.branch(choice.rank, choice.output), choice.weight
            )
            return choice
    return choice


def _choose_at(
    normalisation: float,
    train: sp.csr_matrix,
    ranks: tuple[int, ...],
    task: EvalTask,
    towers: tuple[np.ndarray, np.ndarray],
    valid: dict[str, float],
    config: TrainConfig,
) -> tuple[SpectralChoice, spectral.Basis]:
    """The best branch of one normalisation on validation (fitted on the training rows,
    to be refitted by the caller), or off, and the basis it was cut from; its figures go
    into `valid`, named with the normalisation after the first."""
    metric = f"recall@{config.eval_k}"
    named = "" if normalisation == spectral.NORMALISATIONS[0] else f" (e {normalisation})"
    basis = spectral.decompose(train, ranks[-1], config.seed, normalisation)
    history = train[task.users]
    parts = {}
    for rank in sorted({min(r, basis.rank) for r in ranks}):
        branch = basis.branch(rank)
        parts[rank] = branch.users(history)  # the output exponent leaves a user's part as is
        valid[f"filter{named} rank {rank}"] = _recall(task, parts[rank], branch.item_rows, metric)
    rank = max(parts, key=lambda r: valid[f"filter{named} rank {r}"])
    outputs = {spectral.OUTPUT_EXPONENT: valid[f"filter{named} rank {rank}"]}
    for output in spectral.OUTPUT_EXPONENTS:
        if output not in outputs:
            branch = basis.branch(rank, output)
            outputs[output] = _recall(task, parts[rank], branch.item_rows, metric)
            valid[f"filter{named} rank {rank} output {output}"] = outputs[output]
    output = max(outputs, key=lambda g: outputs[g])  # ties: the default, listed first
    branch, branch_users = basis.branch(rank, output), parts[rank]
    tower_users, tower_items = towers
    ratio = spectral.score_ratio(
        tower_users[: spectral.SPREAD_SAMPLE] @ tower_items.T,
        branch_users[: spectral.SPREAD_SAMPLE] @ branch.item_rows.T,
    )
    blended = {}
    for share in spectral.WEIGHTS:
        if share == 0 and "towers" in valid:
            blended[share] = valid["towers"]  # the towers alone, measured once
            continue
        blended[share] = _recall(
            task,
            np.hstack([tower_users, branch_users]),
            np.hstack([tower_items, branch.item_rows * (share * ratio)]),
            metric,
        )
        valid["towers" if share == 0 else f"towers + filter{named} x{share}"] = blended[share]
    best_share = max(spectral.WEIGHTS, key=lambda share: blended[share])  # ties: the lighter
    best = blended[best_share]
    alone = valid["towers"]
    if best_share == 0 or best < alone * MARGIN:
        return SpectralChoice(
            None,
            valid=valid,
            reason=f"off: validation {metric} {alone:.4f} with the towers alone, "
            f"{best:.4f} at best with the filter",
        ), basis
    weight = best_share * ratio
    return SpectralChoice(
        branch,  # the caller refits it on every event
        rank=rank,
        normalisation=normalisation,
        output=output,
        weight=weight,
        valid=valid,
        reason=f"normalisation {normalisation}, rank {rank}, output exponent {output}, "
        f"weight {weight:.3g}: validation {metric} {best:.4f} against {alone:.4f} with the "
        "towers alone",
    ), basis


def _recall(task: EvalTask, users: np.ndarray, items: np.ndarray, metric: str) -> float:
    scorer = PrecomputedScorer(task.users, users.astype(np.float32), items.astype(np.float32))
    return float(evaluate(scorer, task)[metric])
