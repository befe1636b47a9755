"""TensorFlow's "SAME" padding for PyTorch convolutions and pooling.

TF pads a stride-s layer so that the output has ceil(n / s) positions, putting the odd pixel of padding on the
bottom / right: total padding max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0), of which floor(total / 2) goes first.
PyTorch's symmetric ``padding=k // 2`` agrees only at stride 1 with odd kernels; elsewhere the padding depends on the
input size and is computed on every call. Checkpoints ported from JAX / TF (ViT's R50 hybrid, BiT) need it to
reproduce the original outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.patch_embed import to_2tuple


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Total TF "SAME" padding along one axis of length ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


def is_static_same(kernel_size: int | tuple[int, int], stride: int | tuple[int, int], dilation: int = 1) -> bool:
    """Whether "SAME" is one fixed symmetric padding, whatever the input size (stride 1, odd effective kernel)."""
    k, s = to_2tuple(kernel_size), to_2tuple(stride)
    return all(si == 1 and (dilation * (ki - 1)) % 2 == 0 for ki, si in zip(k, s))


def pad_same(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    value: float = 0.0,
) -> torch.Tensor:
    """Pad a [B, C, H, W] map so that a ``kernel_size`` / ``stride`` layer without padding gives ceil(H / s)."""
    (kh, kw), (sh, sw), (dh, dw) = to_2tuple(kernel_size), to_2tuple(stride), to_2tuple(dilation)
    ph = same_padding(x.shape[-2], kh, sh, dh)
    pw = same_padding(x.shape[-1], kw, sw, dw)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)  # (left, right, top, bottom)
    return x


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TF "SAME" padding. The border is padded with -inf, so it never wins the max."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)
