"""Multi-head attention with convolutional projections for queries, keys and values.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021 (arXiv:2103.15808), section 3.2,
eq. 2:

    x_i^{q/k/v} = Flatten(Conv2d(Reshape2D(x_i), s))

where Conv2d is a depthwise-separable convolution: depthwise k x k Conv2d -> BatchNorm2d -> pointwise Conv2d. The
pointwise convolution is a linear map of each token, so it is the usual projection W^Q, W^K, W^V (``proj_q/k/v``);
the depthwise part with BatchNorm (``conv_proj_q/k/v``, the "dw_bn" method) adds local spatial context to every
query, key and value. The keys and values use stride s = 2 (the "squeezed" projection of section 3.2.2): their
sequence is a quarter as long as the queries', which cuts the cost of attention by 4 with little loss of accuracy.
Queries use stride 1, so every token still gets an output. A class token, when present, skips the convolution (it
has no place on the map) and joins q, k and v before the linear projections.

The attention logits are scaled by 1 / sqrt(D) over the full width D, not 1 / sqrt(d_head): the official code
(``self.scale = dim_out ** -0.5``) and HF transformers both do so, and trained weights expect it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitlab.layers.attention import AttentionBase


class ConvProjection(nn.Module):
    """Depthwise k x k convolution (no bias) + BatchNorm over a token map, flattened back to tokens."""

    def __init__(self, dim: int, *, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            dim, dim, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False
        )
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A map [B, C, H, W] -> tokens [B, H' W', C] with H' = ceil(H / stride) (odd kernels)."""
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (B, H' W', C)


class ConvAttention(AttentionBase):
    """Self-attention over ``num_prefix_tokens`` prefix tokens followed by an H x W token map, with convolutional
    projections (``conv_proj_q/k/v``) before the linear ones (``proj_q/k/v``); the core is `AttentionBase.attend`."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_kv: int = 2,
        num_prefix_tokens: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)  # dropouts, qk_norm (as `Block` passes them)
        self.num_prefix_tokens = num_prefix_tokens
        self.conv_proj_q = ConvProjection(dim, kernel_size=kernel_size, stride=1)
        self.conv_proj_k = ConvProjection(dim, kernel_size=kernel_size, stride=stride_kv)
        self.conv_proj_v = ConvProjection(dim, kernel_size=kernel_size, stride=stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """x: [B, prefix + H W, D] with the map in row-major order, grid_size (H, W) -> [B, prefix + H W, D]."""
        B, N, C = x.shape
        H, W = grid_size
        P = self.num_prefix_tokens
        prefix, tokens = x[:, :P], x[:, P:]
        fmap = tokens.transpose(1, 2).reshape(B, C, H, W)  # (B, D, H, W)
        q = torch.cat([prefix, self.conv_proj_q(fmap)], dim=1)  # (B, P + H W, D)
        k = torch.cat([prefix, self.conv_proj_k(fmap)], dim=1)  # (B, P + H' W', D)
        v = torch.cat([prefix, self.conv_proj_v(fmap)], dim=1)
        # attend() scales by 1 / sqrt(d_head) on both paths; the extra 1 / sqrt(h) folded into q makes it the
        # 1 / sqrt(D) that CvT uses (module docstring)
        q = self.split_heads(self.proj_q(q)) * self.num_heads**-0.5  # (B, h, N, hd)
        k = self.split_heads(self.proj_k(k))  # (B, h, M, hd)
        v = self.split_heads(self.proj_v(v))
        return self.attend(q, k, v, None)
