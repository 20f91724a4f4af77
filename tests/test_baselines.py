"""The EASE peer: the float32 Cholesky solve in place equals the textbook float64 inverse,
and a catalogue too large for memory is named with the reason, not run."""

import numpy as np
import pytest

from training.baselines import Ease, ease_weights


@pytest.mark.parametrize("block", [7, 2048])  # several blocks of the mirrored triangle, one
def test_ease_in_float32_matches_the_float64_inverse(block: int) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((400, 90)) < 0.08).astype(np.float32)  # users x items
    gram = x.T @ x
    l2 = 10.0
    expected = np.linalg.inv(gram.astype(np.float64) + l2 * np.eye(90))
    expected = -expected / np.diag(expected)
    expected[np.diag_indices(90)] = 0.0
    got = ease_weights(gram.copy(), l2, block=block)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.diag(got).any()


def test_a_catalogue_beyond_memory_is_refused_with_its_size() -> None:
    assert Ease.fits(1_000) is None
    reason = Ease.fits(10_000_000)  # a 400 TB matrix
    assert reason is not None and "10,000,000 items need" in reason and "available" in reason


def test_a_gram_matrix_that_is_not_positive_definite_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not positive definite"):
        ease_weights(-np.eye(3, dtype=np.float32), 0.0)
