"""Dropout whose mask costs a random byte per element rather than a random float.

On CPU, drawing a float per element was a tenth of a training step (the towers' pooled
inputs: B x 1,024 elements a step at 256-d); eight mask bytes from each random 64-bit
integer make the same mask in half the time. The drop probability is rounded to
a multiple of 1/256 (0.2 -> 51/256 = 0.199), and survivors are scaled by the rounded one.
"""

import torch
from torch import Tensor, nn

LEVELS = 256  # values a mask byte takes


def byte_mask(like: Tensor, drop: float) -> tuple[Tensor, float]:
    """(mask, keep share): True where an element of `like` survives."""
    threshold = round(drop * LEVELS)
    n = like.numel()
    # The whole int64 range, so all eight bytes are uniform (random_() leaves the sign
    # bit clear: a byte in eight would keep 60% where 80% was asked).
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=like.device
    )
    mask = words.view(torch.uint8)[:n].view(like.shape) >= threshold
    return mask, 1.0 - threshold / LEVELS


class ByteDropout(nn.Module):
    """nn.Dropout's contract (zero a share `p` of elements while training, scale the rest
    up; identity in eval), with the cheaper mask above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, inputs: Tensor) -> Tensor:
        if not self.training or round(self.p * LEVELS) == 0:
            return inputs
        mask, keep = byte_mask(inputs, self.p)
        return inputs * mask * (1.0 / keep)
