"""Axial attention: self-attention along one axis of an image at a time.

Ho, Kalchbrenner, Weissenborn & Salimans, "Axial Attention in Multidimensional Transformers" (arXiv:1912.12180,
2019); Wang, Zhu, Green, Adam, Yuille & Chen, "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic
Segmentation", ECCV 2020 (arXiv:2003.07853).

Full self-attention over an H x W grid costs O((HW)^2); attention along the height axis (each column on its own)
and then along the width axis (each row) costs O(HW (H + W)) and still lets every position reach every other
one in two steps. Axial-DeepLab's position-sensitive axial attention along one axis of length m (eq. 4),

    y_o = sum_p softmax_p(q_o^T k_p + q_o^T r^q_{p-o} + k_p^T r^k_{p-o}) (v_p + r^v_{p-o}),

adds learned relative-position terms for the offset p - o along the axis (``span`` = the longest axis the layer
accepts; None: no position terms, as Ho et al., whose models add absolute positions to the input). The two
logit terms enter `AttentionBase.attend` as an additive mask, so both attention paths stay open; the value term
r^v is left out: it is a sum over the attention probabilities themselves, which the fused kernel never forms.
As everywhere in vitlab the logits carry the 1/sqrt(d) of Vaswani et al., which the paper leaves out; that is a
constant a learned W_Q and r^k absorb. The two layers run height first, then width (Axial-DeepLab, Fig. 2).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.attention import AttentionBase


class AxialAttention(AttentionBase):
    """Multi-head self-attention along one axis of a [B, H, W, C] grid: ``axis="height"`` attends within each
    column, ``axis="width"`` within each row. Maps are recorded as [B * W, heads, H, H] (height) or
    [B * H, heads, W, W] (width)."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        axis: Literal["height", "width"] = "width",
        span: int | None = None,
        qkv_bias: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if axis not in ("height", "width"):
            raise VitlabError(f"axial attention axis must be 'height' or 'width', got {axis!r}")
        self.axis = axis
        self.span = span
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if span:
            # r^q and r^k for the 2 span - 1 offsets, shared by the heads (as the authors' code)
            self.rel_q = nn.Parameter(torch.zeros(2 * span - 1, self.head_dim))
            self.rel_k = nn.Parameter(torch.zeros(2 * span - 1, self.head_dim))
            nn.init.trunc_normal_(self.rel_q, std=0.02)
            nn.init.trunc_normal_(self.rel_k, std=0.02)
        else:
            self.rel_q = self.rel_k = None
        self.layout: tuple[int, int] | None = None  # (H, W) of the last call: what `to_image_attention` needs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise VitlabError(f"axial attention expects a [B, H, W, C] grid, got shape {tuple(x.shape)}")
        self.layout = (x.shape[1], x.shape[2])
        if self.axis == "height":
            x = x.transpose(1, 2)  # (B, W, H, C): the attended axis last but one
        B, M, L, C = x.shape
        x = x.reshape(B * M, L, C)  # every row (or column) is a sequence of its own
        qkv = self.qkv(x).reshape(B * M, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B * M, h, L, hd)
        mask = self.position_logits(q, k) if self.span else None
        x = self.attend(q, k, v, mask).reshape(B, M, L, C)
        return x.transpose(1, 2) if self.axis == "height" else x

    def to_image_attention(self, probs: torch.Tensor) -> torch.Tensor:
        """This module's last maps [B * M, h, L, L] over image positions [B, h, HW, HW] (row-major), zero outside
        each query's row (width) or column (height); rows still sum to 1."""
        if self.layout is None:
            return probs
        H, W = self.layout
        pos = torch.arange(H * W, device=probs.device).view(H, W)
        lines = pos.T if self.axis == "height" else pos  # (M, L): the positions of each attended column or row
        M, L = lines.shape
        B, heads = probs.shape[0] // M, probs.shape[1]
        dense = probs.new_zeros(B, heads, H * W, H * W)
        dense[:, :, lines[:, :, None], lines[:, None, :]] = probs.view(B, M, heads, L, L).transpose(1, 2)
        return dense

    def position_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(q_o^T r^q_{p-o} + k_p^T r^k_{p-o}) / sqrt(d) for every query o and key p: (B', h, L, L)."""
        L = q.shape[2]
        if L > self.span:
            raise VitlabError(f"axial attention with span {self.span} got an axis of length {L}; build it larger")
        pos = torch.arange(L, device=q.device)
        offset = pos[None, :] - pos[:, None] + self.span - 1  # [o, p] -> index of p - o
        r_q, r_k = self.rel_q[offset], self.rel_k[offset]  # (L, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # the same q and k that attend() compares
        logits = torch.einsum("bhod,opd->bhop", q, r_q.to(q.dtype)) + torch.einsum("bhpd,opd->bhop", k, r_k.to(k.dtype))
        return logits * self.scale


class AxialAttention2d(nn.Module):
    """Height-axis then width-axis attention over a [B, H, W, C] grid (or a [B, C, H, W] map with
    ``channels_first=True``): global context at O(HW (H + W)). ``grid_size`` (H, W) turns on the relative
    position terms with spans H and W; takes `Attention`'s arguments, so `Block(attn_layer=...)` can hold it."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        grid_size: tuple[int, int] | None = None,
        channels_first: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        span_h, span_w = grid_size if grid_size else (None, None)
        self.channels_first = channels_first
        self.height = AxialAttention(dim, num_heads=num_heads, axis="height", span=span_h, **kwargs)
        self.width = AxialAttention(dim, num_heads=num_heads, axis="width", span=span_w, **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise VitlabError("axial attention takes no attn_mask: each axis sees its whole row or column")
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.width(self.height(x))
        return x.permute(0, 3, 1, 2) if self.channels_first else x
