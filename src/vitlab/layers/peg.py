"""Position Encoding Generator (Chu et al., "Conditional Positional Encodings for Vision Transformers", ICLR 2023,
arXiv:2102.10882, section 3.2 and Fig. 2).

The patch tokens X in R^{B x N x C} are reshaped back to their 2D grid X' in R^{B x C x H x W}, a function F of
each token's local neighbourhood produces the conditional position encoding, and it is added to the tokens:

    PEG(X) = flatten(F(X') + X'),   F = k x k depthwise convolution with (k - 1) / 2 zero padding, k >= 3

Prefix tokens (the class token) have no place on the grid and pass through unchanged. The zero padding is what
lets the encoding carry absolute position: tokens near the border see zeros that interior tokens do not. Because F
is a convolution, the same weights serve any grid size, so the model needs no interpolation at a new resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.errors import VitlabError


class PEG(nn.Module):
    def __init__(self, dim: int, *, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise VitlabError(f"PEG needs an odd kernel size of at least 3 (paper, section 3.2), got {kernel_size}")
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """x: tokens [B, prefix + H * W, C] in row-major grid order, grid_size (H, W) -> the same shape."""
        B, N, C = x.shape
        H, W = grid_size
        if N != num_prefix_tokens + H * W:
            raise VitlabError(f"PEG got {N} tokens for a {H}x{W} grid with {num_prefix_tokens} prefix tokens")
        prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        feat = tokens.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        feat = self.proj(feat) + feat  # F(X') + X'
        return torch.cat([prefix, feat.flatten(2).transpose(1, 2)], dim=1)  # (B, prefix + H*W, C)
