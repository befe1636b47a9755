"""Weight-standardised convolution (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", arXiv:1903.10520), as used with GroupNorm by BiT (Kolesnikov et al., "Big Transfer", ECCV 2020,
section 4.3) and by the ResNet stem of ViT's hybrid (Dosovitskiy et al., ICLR 2021).

Each output filter is standardised over its fan-in before the convolution:

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

with the biased variance. The stored parameter is the raw W, so checkpoints of timm's ``StdConv2d`` /
``StdConv2dSame`` and HF's ``WeightStandardizedConv2d`` load as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.padding import is_static_same, pad_same


class StdConv2d(nn.Conv2d):
    """Conv2d on standardised weights. ``padding``: an int, ``None`` for PyTorch's symmetric ((s - 1) + (k - 1)) // 2
    (timm's default), or ``"same"`` for TF "SAME" padding (the official JAX hybrid's), computed per call where the
    input size decides it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | Literal["same"] | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        dynamic_same = padding == "same" and not is_static_same(kernel_size, stride, dilation)
        if padding == "same":
            padding = 0 if dynamic_same else dilation * (kernel_size - 1) // 2
        elif padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.dynamic_same = dynamic_same
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)  # (out, in/groups * k * k): one row per filter
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        return ((flat - mean) * torch.rsqrt(var + self.eps)).reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", padding=same" if self.dynamic_same else "") + f", eps={self.eps}"
