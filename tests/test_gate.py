"""The noise-aware quality gate: per-user differences, a bootstrap interval, and the best
recent version as a second reference so that small losses cannot add up night after
night."""

import numpy as np

from recsys.gate import bootstrap_interval, decide

USERS = 943


def _scores(mean: float, seed: int, noise: np.ndarray | None = None) -> np.ndarray:
    """Per-user recall-like values: a shared per-user level plus a model's own noise."""
    base = noise if noise is not None else np.random.default_rng(99).uniform(0, 0.6, USERS)
    own = np.random.default_rng(seed).normal(0, 0.05, USERS)
    return np.clip(base + own + mean - base.mean(), 0, 1)


def test_the_interval_holds_the_mean_difference():
    rng = np.random.default_rng(0)
    differences = rng.normal(-0.01, 0.1, 5000)
    low, high = bootstrap_interval(differences, seed=1)
    assert low < differences.mean() < high
    assert high - low < 0.01  # about 4 standard errors (0.1 / sqrt(5000) = 0.0014) wide
    assert bootstrap_interval(np.zeros(100)) == (0.0, 0.0)
    assert bootstrap_interval(differences, seed=1) == (low, high)  # seeded: reproducible


def test_a_fixed_margin_let_this_loss_through_and_the_gate_does_not():
    """The issue's case: 0.314 was promoted over 0.324 by the old 5% margin."""
    current, candidate = _scores(0.324, 1), _scores(0.314, 2)
    assert candidate.mean() >= 0.95 * current.mean()  # what the old rule passed
    [comparison] = decide(candidate, {"v1": current}, "v1", margin=0.0)
    assert comparison.worse and comparison.interval[1] < 0


def test_a_candidate_within_noise_is_promoted():
    current, candidate = _scores(0.324, 1), _scores(0.323, 2)
    [comparison] = decide(candidate, {"v1": current}, "v1", margin=0.0)
    assert not comparison.worse
    assert comparison.interval[0] < 0 < comparison.interval[1]


def test_losses_within_noise_cannot_add_up():
    """Each night a little worse than the night before: within noise of the current
    version, but the best recent version is far enough ahead to reject."""
    best, current, candidate = _scores(0.340, 1), _scores(0.335, 2), _scores(0.329, 3)
    alone = decide(candidate, {"current": current}, "current", margin=0.0)
    assert not alone[0].worse  # against the current version only, it would pass
    both = decide(candidate, {"current": current, "best": best}, "current", margin=0.0)
    assert [c.version for c in both] == ["current", "best"]
    assert not both[0].worse and both[1].worse


def test_a_margin_tolerates_a_stated_loss():
    current, candidate = _scores(0.324, 1), _scores(0.314, 2)
    [comparison] = decide(candidate, {"v1": current}, "v1", margin=0.1)
    assert not comparison.worse  # up to 10% of 0.324 tolerated
