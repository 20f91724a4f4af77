"""Retrieval losses as small modules with one signature:

    loss(query_emb (B, D), item_emb (B, D), item_ids (B,), weights=None) -> scalar

Row i of `item_emb` is the positive of query i and a negative for every other query.
`item_ids` mask accidental hits: the same item appearing as another row's positive is not
a negative. `weights` (B,), when given, weight each row's term (a weighted mean: a
purchase at 1.0 counts ten times a view at 0.1). Options (temperature, logQ correction,
mining) are constructor arguments.
"""

import enum
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def weighted_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """The mean of per-row losses, weighted by `weights` when given."""
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def accidental_hits(item_ids: Tensor) -> Tensor:
    """(B, B) True where column j holds the same item as row i's positive, off the diagonal."""
    same = item_ids[:, None] == item_ids[None, :]
    return same.fill_diagonal_(False)


# The widest range of exponents (scores' spread plus the corrections') whose exponentials,
# shifted by the largest, stay far above float32's smallest normal number (e^-60 = 9e-27,
# against 1.2e-38): cosine towers at temperature 0.1 span 20, corrections about 15.
SHARED_EXP_SPREAD = 60.0


def _masked_log_sum_exps(
    scores: Tensor, correction: Tensor, query_correction: Tensor, hits: Tensor | None, both: bool
) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps of scores - correction (per column) and, with `both`, column
    log-sum-exps of scores - query_correction (per row), accidental hits left out: for
    scores of any range."""
    mask = torch.zeros_like(scores, requires_grad=False)
    if hits is not None:
        mask.masked_fill_(hits, float("-inf"))
    rows = torch.logsumexp(scores + (mask - correction[None, :]), dim=1)
    if not both:
        return rows, torch.zeros_like(rows)
    columns = torch.logsumexp(scores + (mask - query_correction[:, None]), dim=0)
    return rows, columns


class _SharedExpLogSumExps(torch.autograd.Function):
    """What `_masked_log_sum_exps` computes, from one exponential of the (B, B) scores:
    e = exp(scores - bound) (bound: the largest score possible), hits set to 0; rows sum
    e times each column's weight exp(-correction), columns sum e times each row's weight
    exp(-query_correction) (weights scaled to at most 1). The gradient is e times a
    rank-two matrix of those sums: one pass, where autograd through two log-sum-exps
    makes four exponentials of the matrix and several copies."""

    @staticmethod
    def forward(
        ctx: Any,
        scores: Tensor,
        bound: Tensor,
        correction: Tensor,
        query_correction: Tensor,
        hits: Tensor | None,
        both: bool,
    ) -> tuple[Tensor, Tensor]:
        lowest, query_lowest = correction.min(), query_correction.min()
        column_weight = torch.exp(lowest - correction)  # (B,), at most 1
        row_weight = torch.exp(query_lowest - query_correction)
        shifted = torch.exp(scores - bound)
        if hits is not None:
            shifted.masked_fill_(hits, 0.0)
        row_sum = shifted @ column_weight
        column_sum = row_weight @ shifted if both else torch.ones_like(row_sum)
        ctx.save_for_backward(shifted, column_weight, row_weight, row_sum, column_sum)
        ctx.both = both
        rows = row_sum.log() + (bound - lowest)
        columns = column_sum.log() + (bound - query_lowest) if both else torch.zeros_like(rows)
        return rows, columns

    @staticmethod
    def backward(ctx: Any, row_grad: Tensor, column_grad: Tensor) -> tuple[Tensor | None, ...]:
        shifted, column_weight, row_weight, row_sum, column_sum = ctx.saved_tensors
        # d rows_i / d scores_ij = e_ij w_j / row_sum_i; d columns_j / d scores_ij =
        # e_ij v_i / column_sum_j.
        factor = torch.outer(row_grad / row_sum, column_weight)
        if ctx.both:
            factor.addr_(row_weight, column_grad / column_sum)
        return factor.mul_(shifted), None, None, None, None, None


class NPairLoss(nn.Module):
    """Multi-class N-pair loss (Sohn, NeurIPS 2016): softmax over the N positives of the
    batch on raw dot products, plus the paper's L2 penalty on embedding norms that keeps
    unnormalised embeddings from growing to shrink the loss."""

    def __init__(self, l2_reg: float = 0.002, mask_accidental_hits: bool = True) -> None:
        super().__init__()
        self.l2_reg = l2_reg
        self.mask_accidental_hits = mask_accidental_hits

    def forward(
        self, query_emb: Tensor, item_emb: Tensor, item_ids: Tensor, weights: Tensor | None = None
    ) -> Tensor:
        logits = query_emb @ item_emb.T  # (B, B)
        if self.mask_accidental_hits:
            logits = logits.masked_fill(accidental_hits(item_ids), float("-inf"))
        target = torch.arange(len(logits), device=logits.device)
        norms = query_emb.pow(2).sum(1) + item_emb.pow(2).sum(1)  # (B,)
        per_row = F.cross_entropy(logits, target, reduction="none") + self.l2_reg * norms
        return weighted_mean(per_row, weights)


class Mining(enum.Enum):
    HARDEST = "hardest"  # the most similar in-batch negative
    SEMI_HARD = "semi_hard"  # the most similar negative still less similar than the positive


class TripletLoss(nn.Module):
    """Triplet margin loss on similarities with in-batch negative mining: anchor = user,
    positive = its item, negative mined from the other rows' items. For semi-hard mining a
    row with no semi-hard negative falls back to its hardest one."""

    def __init__(self, margin: float = 0.2, mining: Mining = Mining.SEMI_HARD) -> None:
        super().__init__()
        self.margin = margin
        self.mining = mining

    def forward(
        self, query_emb: Tensor, item_emb: Tensor, item_ids: Tensor, weights: Tensor | None = None
    ) -> Tensor:
        sim = query_emb @ item_emb.T  # (B, B)
        positive = sim.diagonal()  # (B,)
        invalid = accidental_hits(item_ids) | torch.eye(
            len(sim), dtype=torch.bool, device=sim.device
        )
        negatives = sim.masked_fill(invalid, float("-inf"))
        hardest = negatives.max(dim=1).values  # (B,)
        if self.mining is Mining.SEMI_HARD:
            semi = negatives.masked_fill(negatives >= positive[:, None], float("-inf"))
            best_semi = semi.max(dim=1).values
            hardest = torch.where(torch.isfinite(best_semi), best_semi, hardest)
        has_negative = torch.isfinite(hardest)
        losses = F.relu(hardest - positive + self.margin)
        if not has_negative.any():
            return losses.sum() * 0.0
        return weighted_mean(
            losses[has_negative], weights[has_negative] if weights is not None else None
        )


class InBatchSoftmaxLoss(nn.Module):
    """In-batch sampled softmax (InfoNCE) with a temperature.

    item_log_prob: log of each item's share of training events; subtracting
        log(expected count among the negatives) from each logit corrects the popularity bias
        of in-batch sampling (Yi et al., RecSys 2019). None disables the correction.
    symmetric: add the item -> user direction (each item against all queries).
    query_log_prob: log of each query's (user's) share of training events, for the same
        correction in the item -> user direction, where users are the sampled negatives;
        `forward` then needs `query_ids`. None: no correction there.
    shared_exp: where the scores' range allows, both directions from one exponential of
        the score matrix (`_SharedExpLogSumExps`); False: always the masked log-sum-exps
        (the same values, slower: for comparing the two).
    Extra uniformly sampled negatives (mixed negative sampling) come in through `forward`.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        item_log_prob: Tensor | None = None,
        mask_accidental_hits: bool = True,
        symmetric: bool = False,
        shared_exp: bool = True,
        query_log_prob: Tensor | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.mask_accidental_hits = mask_accidental_hits
        self.symmetric = symmetric
        self.shared_exp = shared_exp
        self.item_log_prob: Tensor | None
        self.register_buffer("item_log_prob", item_log_prob, persistent=False)
        self.query_log_prob: Tensor | None
        self.register_buffer("query_log_prob", query_log_prob, persistent=False)

    def forward(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor,
        weights: Tensor | None = None,
        extra_item_emb: Tensor | None = None,
        extra_item_ids: Tensor | None = None,
        query_ids: Tensor | None = None,
    ) -> Tensor:
        # Log-sum-exps over one (B, B) score matrix rather than cross-entropies over masked
        # copies: both directions share the scores and their gradient. Where the scores'
        # range is bounded (cosine towers), one exponential of the matrix serves both
        # directions (`_SharedExpLogSumExps`); otherwise constant additive masks and
        # torch's log-sum-exp. The loss's cost per step: `make bench ONLY=speed`.
        batch = len(query_emb)
        scaled = query_emb / self.temperature
        scores = scaled @ item_emb.T  # (B, B): query i (row) against positive j (column)
        positive = (scaled * item_emb).sum(dim=1)  # the diagonal, without a (B, B) gradient
        log_prob = self.item_log_prob
        correction = (
            torch.zeros_like(positive)
            if log_prob is None
            else log_prob[item_ids] + math.log(batch)  # (B,) per column
        )
        query_correction = torch.zeros_like(positive)
        if self.query_log_prob is not None and self.symmetric:
            if query_ids is None:
                raise ValueError("a loss with query_log_prob needs the batch's query_ids")
            query_correction = self.query_log_prob[query_ids] + math.log(batch)
        hits = accidental_hits(item_ids) if self.mask_accidental_hits else None
        # Cauchy-Schwarz: every score lies within +-bound.
        with torch.no_grad():
            bound = query_emb.norm(dim=1).max() * item_emb.norm(dim=1).max() / self.temperature
            spread = 2 * bound + max(
                correction.max() - correction.min(),
                query_correction.max() - query_correction.min(),
            )
        if self.shared_exp and float(spread) <= SHARED_EXP_SPREAD:
            row_lse, column_lse = _SharedExpLogSumExps.apply(
                scores, bound, correction, query_correction, hits, self.symmetric
            )
        else:
            row_lse, column_lse = _masked_log_sum_exps(
                scores, correction, query_correction, hits, self.symmetric
            )
        if extra_item_emb is not None and extra_item_ids is not None:
            extra = scaled @ extra_item_emb.T  # (B, M)
            if log_prob is not None:
                extra = extra - math.log(len(extra_item_ids) / len(log_prob))
            extra = extra.masked_fill(item_ids[:, None] == extra_item_ids[None, :], float("-inf"))
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(extra, dim=1))
        per_row = row_lse - (positive - correction)
        if self.symmetric:
            # Item j against every query: column j of the scores, corrected for the
            # queries' shares of the batch where `query_log_prob` is given.
            per_row = (per_row + column_lse - (positive - query_correction)) / 2
        return weighted_mean(per_row, weights)


class CombinedLoss(nn.Module):
    """A weighted sum of losses sharing one batch (e.g. softmax + a little triplet)."""

    def __init__(self, parts: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("CombinedLoss needs at least one loss")
        self.weights = [w for w, _ in parts]
        self.parts = nn.ModuleList([loss for _, loss in parts])

    def forward(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor,
        weights: Tensor | None = None,
        **extra: Tensor,
    ) -> Tensor:
        total = query_emb.new_zeros(())
        for weight, loss in zip(self.weights, self.parts, strict=True):
            kwargs = extra if isinstance(loss, InBatchSoftmaxLoss) else {}
            total = total + weight * loss(query_emb, item_emb, item_ids, weights, **kwargs)
        return total
