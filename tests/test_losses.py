"""Each loss against a plain-Python oracle on tiny hand-placed embeddings, plus properties
every retrieval loss must have."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training import losses
from training.losses import CombinedLoss, InBatchSoftmaxLoss, Mining, NPairLoss, TripletLoss

# Three users and their items in 2-D: user i sits near item i; items 0 and 2 are the same item.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
P = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.8]])
IDS_DISTINCT = torch.tensor([10, 11, 12])
IDS_REPEAT = torch.tensor([10, 11, 10])


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def softmax_oracle(q, p, ids, temperature=1.0, log_prob=None, mask=True):
    """-log softmax of the positive, looping over rows and columns."""
    q, p, ids = q.tolist(), p.tolist(), ids.tolist()
    total = 0.0
    for i in range(len(q)):
        logits = []
        for j in range(len(p)):
            if mask and j != i and ids[j] == ids[i]:
                continue
            logit = dot(q[i], p[j]) / temperature
            if log_prob is not None:
                logit -= log_prob[ids[j]] + math.log(len(q))
            logits.append((j, logit))
        denominator = sum(math.exp(v) for _, v in logits)
        positive = next(v for j, v in logits if j == i)
        total += -(positive - math.log(denominator))
    return total / len(q)


@pytest.mark.parametrize("ids", [IDS_DISTINCT, IDS_REPEAT])
def test_npair_matches_oracle(ids):
    loss = NPairLoss(l2_reg=0.01)(Q, P, ids)
    norms = sum(dot(v, v) for v in Q.tolist()) + sum(dot(v, v) for v in P.tolist())
    expected = softmax_oracle(Q, P, ids) + 0.01 * norms / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_npair_without_masking_counts_the_duplicate_as_negative():
    masked = NPairLoss(l2_reg=0.0)(Q, P, IDS_REPEAT)
    unmasked = NPairLoss(l2_reg=0.0, mask_accidental_hits=False)(Q, P, IDS_REPEAT)
    assert unmasked.item() == pytest.approx(softmax_oracle(Q, P, IDS_REPEAT, mask=False), rel=1e-5)
    assert unmasked > masked


@pytest.mark.parametrize("ids", [IDS_DISTINCT, IDS_REPEAT])
def test_softmax_with_temperature_and_logq_matches_oracle(ids):
    log_prob = torch.log(torch.tensor([0.1] * 10 + [0.5, 0.3, 0.2]))
    loss = InBatchSoftmaxLoss(temperature=0.2, item_log_prob=log_prob)(Q, P, ids)
    expected = softmax_oracle(Q, P, ids, temperature=0.2, log_prob=log_prob.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_logq_correction_lowers_popular_negatives():
    """Row 0's positive is rare and its one negative (row 1's positive) very popular: with
    the correction that negative's share of row 0's softmax falls from 1/2 to ~e^-6.8, so
    the gradient pushing query 0 away from it nearly vanishes. Query 0 appears in no other
    row, so its gradient is row 0's alone."""
    ids = torch.tensor([0, 1])
    share = torch.log(torch.tensor([1e-3, 0.9]))
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pushes = []
    for log_prob in (None, share):
        queries = torch.tensor([[0.3, 0.3], [0.2, 0.1]], requires_grad=True)
        InBatchSoftmaxLoss(temperature=1.0, item_log_prob=log_prob)(queries, items, ids).backward()
        assert queries.grad is not None
        pushes.append(queries.grad[0])
    # dL/dq0 = (p(pos) - 1) p0 + p(neg) p1, over B = 2 rows; p(neg) is the popular share.
    plain, corrected = pushes
    torch.testing.assert_close(plain, torch.tensor([-0.25, 0.25]))
    popular_share = 1 / (1 + math.exp(-math.log(1e-3) + math.log(0.9)))
    expected = torch.tensor([-popular_share / 2, popular_share / 2])
    torch.testing.assert_close(corrected, expected, rtol=1e-4, atol=1e-7)
    assert corrected.norm() < plain.norm() / 100


def test_extra_negatives_and_symmetric_term_match_oracle():
    extra = torch.tensor([[0.0, -1.0], [0.9, 0.1]])
    extra_ids = torch.tensor([20, 10])  # the second equals row 0's positive: masked for row 0
    loss = InBatchSoftmaxLoss(temperature=1.0, symmetric=True)(
        Q, P, IDS_DISTINCT, extra_item_emb=extra, extra_item_ids=extra_ids
    )
    q, p, e = Q.tolist(), P.tolist(), extra.tolist()
    forward = 0.0
    for i in range(3):
        logits = [dot(q[i], p[j]) for j in range(3)]
        logits += [
            dot(q[i], e[m]) for m in range(2) if extra_ids[m].item() != IDS_DISTINCT[i].item()
        ]
        forward += -(dot(q[i], p[i]) - math.log(sum(math.exp(v) for v in logits)))
    backward = 0.0
    for j in range(3):
        logits = [dot(p[j], q[i]) for i in range(3)]
        backward += -(dot(p[j], q[j]) - math.log(sum(math.exp(v) for v in logits)))
    assert loss.item() == pytest.approx((forward / 3 + backward / 3) / 2, rel=1e-5)


def cross_entropy_reference(
    q, p, ids, temperature, log_prob, weights, symmetric=True, query_log_prob=None, users=None
):
    """Both directions (or the first) as masked cross-entropies over their own logits."""
    batch = len(q)
    hits = (ids[:, None] == ids[None, :]) & ~torch.eye(batch, dtype=torch.bool)
    forward = (q @ p.T / temperature - (log_prob[ids] + math.log(batch))[None, :]).masked_fill(
        hits, float("-inf")
    )
    reverse = p @ q.T / temperature
    if query_log_prob is not None:
        reverse = reverse - (query_log_prob[users] + math.log(batch))[None, :]
    reverse = reverse.masked_fill(hits, float("-inf"))
    target = torch.arange(batch)
    per_row = torch.nn.functional.cross_entropy(forward, target, reduction="none")
    if symmetric:
        reverse_rows = torch.nn.functional.cross_entropy(reverse, target, reduction="none")
        per_row = (per_row + reverse_rows) / 2
    return (per_row * weights).sum() / weights.sum()


@pytest.mark.parametrize(
    "length, shared_exp, path",
    [(1.0, True, "shared exponential"), (30.0, True, "masked"), (1.0, False, "masked")],
)
@pytest.mark.parametrize(
    "symmetric, corrects_queries", [(True, False), (False, False), (True, True)]
)
def test_softmax_matches_plain_cross_entropies_in_value_and_gradient(
    length, shared_exp, path, symmetric, corrects_queries, monkeypatch
):
    """The loss works on one shared score matrix; the gradients must be those of masked
    cross-entropies (repeated items, logQ for items and, in the reverse direction, for
    users, event weights). Unit vectors take the path with one exponential of the matrix
    and a hand-written gradient; long vectors (scores spread too far for one shift), or
    `shared_exp=False`, the masked log-sum-exps."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    p = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    q, p = (length * torch.nn.functional.normalize(v, dim=1) for v in (q, p))
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4])
    log_prob = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64))
    weights = torch.tensor([1.0, 0.1, 0.5, 1.0, 0.1, 1.0, 0.3], dtype=torch.float64)
    users = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    query_log_prob = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64))
    query_log_prob = query_log_prob if corrects_queries else None
    loss_fn = InBatchSoftmaxLoss(
        0.3, log_prob, symmetric=symmetric, shared_exp=shared_exp, query_log_prob=query_log_prob
    )
    shared = []
    original = losses._SharedExpLogSumExps.apply
    monkeypatch.setattr(
        losses._SharedExpLogSumExps, "apply", lambda *a: shared.append(1) or original(*a)
    )

    def ours(qq, pp):
        return loss_fn(qq, pp, ids, weights, query_ids=users)

    def reference(qq, pp):
        return cross_entropy_reference(
            qq, pp, ids, 0.3, log_prob, weights, symmetric, query_log_prob, users
        )

    values, grads = [], []
    for compute in (ours, reference):
        qq, pp = q.clone().requires_grad_(), p.clone().requires_grad_()
        value = compute(qq, pp)
        value.backward()
        values.append(value.item())
        grads.append((qq.grad, pp.grad))
    assert bool(shared) == (path == "shared exponential")
    assert values[0] == pytest.approx(values[1], rel=1e-10)
    for ours, expected in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def triplet_oracle(q, p, ids, margin, semi_hard):
    q, p, ids = q.tolist(), p.tolist(), ids.tolist()
    losses = []
    for i in range(len(q)):
        pos = dot(q[i], p[i])
        negs = [dot(q[i], p[j]) for j in range(len(p)) if j != i and ids[j] != ids[i]]
        if not negs:
            continue
        chosen = max(negs)
        if semi_hard:
            semi = [n for n in negs if n < pos]
            chosen = max(semi) if semi else chosen
        losses.append(max(0.0, chosen - pos + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mining", [Mining.HARDEST, Mining.SEMI_HARD])
@pytest.mark.parametrize("ids", [IDS_DISTINCT, IDS_REPEAT])
def test_triplet_matches_oracle(mining, ids):
    loss = TripletLoss(margin=0.3, mining=mining)(Q, P, ids)
    expected = triplet_oracle(Q, P, ids, 0.3, semi_hard=mining is Mining.SEMI_HARD)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_combined_loss_is_the_weighted_sum():
    parts = [(1.0, InBatchSoftmaxLoss(temperature=0.5)), (0.5, TripletLoss(margin=0.2))]
    combined = CombinedLoss(parts)(Q, P, IDS_DISTINCT)
    expected = parts[0][1](Q, P, IDS_DISTINCT) + 0.5 * parts[1][1](Q, P, IDS_DISTINCT)
    assert combined.item() == pytest.approx(expected.item(), rel=1e-6)


LOSSES = [
    NPairLoss(),
    TripletLoss(mining=Mining.HARDEST),
    InBatchSoftmaxLoss(temperature=0.1),
    InBatchSoftmaxLoss(temperature=0.1, symmetric=True),
]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12), st.sampled_from(range(len(LOSSES))))
def test_properties_finite_order_invariant_and_lower_when_positives_align(seed, batch, which):
    loss_fn = LOSSES[which]
    generator = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(batch, 4, generator=generator), dim=1)
    p = torch.nn.functional.normalize(torch.randn(batch, 4, generator=generator), dim=1)
    ids = torch.arange(batch)
    value = loss_fn(q, p, ids)
    assert torch.isfinite(value)
    order = torch.randperm(batch, generator=generator)
    assert loss_fn(q[order], p[order], ids[order]).item() == pytest.approx(
        value.item(), rel=1e-5, abs=1e-6
    )
    # With orthonormal queries, positives on their queries beat positives opposite them.
    # (Moving positives merely closer is not monotone: a positive can also move towards
    # another row's query, which hypothesis found for N-pair.)
    basis = torch.linalg.qr(torch.randn(batch, batch, generator=generator))[0]
    assert loss_fn(basis, basis, ids).item() < loss_fn(basis, -basis, ids).item()
