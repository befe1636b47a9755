"""Locality Self-Attention (LSA).

Lee, Lee and Song, "Vision Transformer for Small-Size Datasets", arXiv:2112.13492 (2021), section 3.3, eq. 4-6.
Trained ViTs on small data spread their attention almost uniformly (a smooth softmax); LSA sharpens it twice:

* diagonal masking: a token's similarity with itself, by far the largest logit of q_i k_j^T, is set to -inf, so
  the softmax distributes all the weight over the *other* tokens (R^M_ij = R_ij for i != j, -inf for i = j);
* learnable temperature: softmax(R^M / tau) with tau learned instead of fixed at sqrt(d_k), so each layer can
  sharpen its distribution.

As the official code, each head learns its own 1 / tau (``inv_temperature``, initialised to 1 / sqrt(d_k), so an
LSA layer starts as the usual scaled dot product with the diagonal masked). Everything else is `Attention`: the
fused and explicit paths and the ``attn_probs`` point the analysis tools record (the masked diagonal is exactly 0
there).
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.attention import Attention


class LocalitySelfAttention(Attention):
    """`Attention` with a learned per-head temperature and each token's attention to itself masked; takes
    `Attention`'s arguments, so `Block(attn_layer=LocalitySelfAttention)` holds it."""

    def __init__(self, dim: int, *, num_heads: int = 8, qk_norm: bool = False, **kwargs) -> None:
        if qk_norm:
            # attend() normalises q after this layer scales it: a LayerNorm would undo the learned temperature
            raise VitlabError("locality self-attention learns its own temperature; build it with qk_norm=False")
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.inv_temperature = nn.Parameter(torch.full((num_heads,), self.head_dim**-0.5))  # 1 / tau, per head

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        # attend() multiplies the logits by 1 / sqrt(d_k) on both paths; folding tau's ratio to it into q makes
        # them q k^T / tau, with a gradient for the temperature on either path
        q = q * (self.inv_temperature / self.scale).to(q.dtype).view(1, -1, 1, 1)
        return self.attend(q, k, v, self._mask_diagonal(attn_mask, N, x.device))

    @staticmethod
    def _mask_diagonal(attn_mask: torch.Tensor | None, N: int, device: torch.device) -> torch.Tensor | None:
        """A boolean mask (True: may attend) without the diagonal, combined with the caller's mask. A single token
        keeps its self-attention: masking it would leave the softmax nothing to weigh."""
        if N == 1:
            return attn_mask
        off_diagonal = ~torch.eye(N, dtype=torch.bool, device=device)  # (N, N)
        if attn_mask is None:
            return off_diagonal
        if attn_mask.dtype == torch.bool:
            return attn_mask & off_diagonal
        return attn_mask.masked_fill(~off_diagonal, float("-inf"))
