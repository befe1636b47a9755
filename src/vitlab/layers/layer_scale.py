"""LayerScale (Touvron et al., "Going deeper with Image Transformers" / CaiT, 2021, eq. 4).

A learned per-channel scale diag(lambda_1, ..., lambda_D) on each residual branch, initialised to a small value
so that deep networks start close to the identity.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
