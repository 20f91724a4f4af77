"""The byte-mask dropout keeps nn.Dropout's contract: the share kept, the mean preserved,
identity in eval, and every mask byte uniform."""

import pytest
import torch

from training.dropout import ByteDropout, byte_mask


@pytest.mark.parametrize("drop", [0.1, 0.2, 0.5])
def test_mask_keeps_the_rounded_share_in_every_byte_position(drop):
    torch.manual_seed(0)
    mask, keep = byte_mask(torch.empty(800_000), drop)
    assert keep == pytest.approx(1 - round(drop * 256) / 256)
    # Column b holds byte b of each random word: a biased byte shows up as one column.
    shares = mask.view(-1, 8).float().mean(dim=0)
    torch.testing.assert_close(shares, torch.full((8,), keep), atol=4e-3, rtol=0)


def test_training_preserves_the_mean_and_eval_is_identity():
    torch.manual_seed(1)
    layer = ByteDropout(0.2)
    inputs = torch.rand(500, 1_000) + 1.0
    out = layer(inputs)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(51 / 256, abs=3e-3)
    assert out.mean().item() == pytest.approx(inputs.mean().item(), rel=3e-3)
    layer.eval()
    assert layer(inputs) is inputs
    with pytest.raises(ValueError, match="dropout must be in"):
        ByteDropout(1.0)


def test_gradient_flows_through_survivors_only():
    torch.manual_seed(2)
    inputs = torch.ones(64, 64, requires_grad=True)
    out = ByteDropout(0.5)(inputs)
    out.sum().backward()
    assert inputs.grad is not None
    torch.testing.assert_close(inputs.grad, (out.detach() != 0).float() * 2.0)
