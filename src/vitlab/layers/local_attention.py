"""Local-window self-attention: every pixel attends to its k x k neighbourhood.

Ramachandran, Parmar, Vaswani, Bello, Levskaya & Shlens, "Stand-Alone Self-Attention in Vision Models",
NeurIPS 2019 (arXiv:1906.05909), section 3.1:

    y_ij = sum_{a,b in N_k(i,j)} softmax_ab(q_ij^T k_ab + q_ij^T r_{a-i,b-j}) v_ab                  (eq. 3)

N_k(i, j) is the k x k block centred on (i, j) (k = 7 in the paper's models). The relative embedding
r_{a-i,b-j} concatenates a row-offset embedding r_{a-i} and a column-offset embedding r_{b-j}, each half the
(per-head) width. Each head computes this attention on its own slice of the channels, with its own embeddings.

Vectorised, with no loop over pixels: keys and values are unfolded into their k x k neighbourhoods (`F.unfold`,
zero padding at the borders), and the attention runs as a batch of one-query attentions through
`AttentionBase.attend`, with an additive mask that carries the q^T r term and -inf at the padded border
positions, which therefore receive no weight (the paper is silent on borders; zero keys would take some).
Maps are recorded as [B * H * W, heads, 1, k * k] (one query, its neighbourhood in row-major order).

As everywhere in vitlab the logits carry the 1/sqrt(d) of Vaswani et al., which eq. 3 leaves out (a constant a
learned W_Q absorbs). The paper's heads read disjoint slices of the input (block-diagonal W_Q, W_K, W_V); here
the projections are full, as in multi-head attention elsewhere, followed by `AttentionBase`'s output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.attention import AttentionBase


class LocalSelfAttention(AttentionBase):
    """Stand-alone self-attention over a [B, H, W, C] grid (a [B, C, H, W] map with ``channels_first=True``);
    takes `Attention`'s arguments, so `Block(attn_layer=...)` can hold it."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        kernel_size: int = 7,
        rel_pos: bool = True,
        qkv_bias: bool = True,
        channels_first: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise VitlabError(f"local attention needs an odd kernel_size to centre on each pixel, got {kernel_size}")
        if rel_pos and self.head_dim % 2:
            raise VitlabError(f"relative embeddings split each head in row and column halves; head dim {self.head_dim}")
        self.kernel_size = kernel_size
        self.channels_first = channels_first
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos:
            # r_{a-i} and r_{b-j} for offsets -(k-1)/2 .. (k-1)/2, per head
            self.rel_h = nn.Parameter(torch.zeros(num_heads, kernel_size, self.head_dim // 2))
            self.rel_w = nn.Parameter(torch.zeros(num_heads, kernel_size, self.head_dim // 2))
            nn.init.trunc_normal_(self.rel_h, std=0.02)
            nn.init.trunc_normal_(self.rel_w, std=0.02)
        else:
            self.rel_h = self.rel_w = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise VitlabError("local attention takes no attn_mask: the neighbourhood is its mask")
        if x.ndim != 4:
            raise VitlabError(f"local attention expects a [B, H, W, C] grid, got shape {tuple(x.shape)}")
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = x.shape
        N, ks, h, hd = H * W, self.kernel_size, self.num_heads, self.head_dim
        kk = ks * ks
        q, kv = self.qkv(x).split([C, 2 * C], dim=-1)  # (B, H, W, C), (B, H, W, 2C)
        q = q.reshape(B * N, 1, h, hd).transpose(1, 2)  # (B*N, h, 1, hd): one query per pixel
        # unfold's channel index runs over (2, h, hd) and then the k*k offsets, row-major
        kv = F.unfold(kv.permute(0, 3, 1, 2), ks, padding=ks // 2)  # (B, 2C * kk, N)
        kv = kv.view(B, 2, h, hd, kk, N).permute(1, 0, 5, 2, 4, 3).reshape(2, B * N, h, kk, hd)
        k, v = kv.unbind(0)  # (B*N, h, kk, hd): each pixel's neighbourhood
        inside = F.unfold(x.new_ones(1, 1, H, W), ks, padding=ks // 2)[0].T > 0  # (N, kk): False on padding
        mask = inside[None, :, None, None, :].expand(B, N, 1, 1, kk).reshape(B * N, 1, 1, kk)
        if self.rel_h is not None:
            mask = self.position_logits(q).masked_fill(~mask, float("-inf"))
        x = self.attend(q, k, v, mask)  # (B*N, 1, C)
        x = x.view(B, H, W, C)
        return x.permute(0, 3, 1, 2) if self.channels_first else x

    def position_logits(self, q: torch.Tensor) -> torch.Tensor:
        """q_ij^T r_{a-i,b-j} / sqrt(d) for every pixel and neighbourhood offset: (B*N, h, 1, k*k)."""
        h, ks, half = self.rel_h.shape
        r = torch.cat(
            [self.rel_h[:, :, None, :].expand(h, ks, ks, half), self.rel_w[:, None, :, :].expand(h, ks, ks, half)],
            dim=-1,
        ).reshape(h, ks * ks, 2 * half)  # r_{a-i,b-j} = [r_{a-i}, r_{b-j}], offsets row-major as unfold's
        return (self.q_norm(q) * self.scale) @ r.transpose(-2, -1).to(q.dtype)  # (B*N, h, 1, kk)
