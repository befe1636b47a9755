"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", 2016) as used by DeiT and later ViTs.

During training each sample's residual branch is dropped with probability p and the kept ones are scaled by
1 / (1 - p), so the expected output equals the evaluation-time output.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The per-block drop probabilities of the linear rule (Huang et al., section 3): 0 for the first of ``depth``
    blocks, ``rate`` for the last."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    if keep <= 0.0:  # every branch dropped: no kept sample to rescale, and 0 / 0 would be NaN
        return torch.zeros_like(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one decision per sample, broadcast over tokens and channels
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
