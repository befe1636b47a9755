"""LayerNorm over the channels of a feature map (Ba et al., "Layer Normalization", 2016).

Each pixel's C channels are normalised on their own, as a token's D features are in a transformer: ConvNeXt's stem
and downsampling layers (Liu et al., 2022) use it on [B, C, H, W] maps. Parameters are nn.LayerNorm's
(``weight``, ``bias``), so checkpoints of timm's LayerNorm2d and HF's channels-first ConvNextLayerNorm load as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): a free view of a channels-last map
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)
