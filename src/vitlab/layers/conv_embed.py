"""Convolutional token embedding: an overlapping strided convolution followed by LayerNorm.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021 (arXiv:2103.15808), section 3.1: the
token map x_{i-1} of stage i - 1 (the image for stage 1) is mapped by a k x k convolution with stride s < k and
padding p to f(x_{i-1}) in R^{H_i x W_i x C_i}, H_i = floor((H_{i-1} + 2p - k) / s) + 1, then flattened to
H_i W_i tokens and layer-normalised. Unlike ViT's patch embedding the patches overlap, so neighbouring tokens
share pixels, and the stride shortens the sequence while the width grows from stage to stage, as in a CNN.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.errors import VitlabError


class ConvEmbed(nn.Module):
    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        *,
        kernel_size: int = 7,
        stride: int = 4,
        padding: int = 2,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A map [B, C_in, H, W] -> tokens [B, H' W', D] in row-major order and the grid size (H', W')."""
        if x.shape[1] != self.in_chans:
            raise VitlabError(
                f"input has {x.shape[1]} channels but the model expects {self.in_chans}; convert the images first"
            )
        x = self.proj(x)  # (B, D, H', W')
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)  # (B, H' W', D)
