"""Local-window self-attention: every pixel attends to its k x k neighbourhood.

Ramachandran, Parmar, Vaswani, Bello, Levskaya & Shlens, "Stand-Alone Self-Attention in Vision Models",
NeurIPS 2019 (arXiv:1906.05909), section 3.1:

    y_ij = sum_{a,b in N_k(i,j)} softmax_ab(q_ij^T k_ab + q_ij^T r_{a-i,b-j}) v_ab                  (eq. 3)

N_k(i, j) is the k x k block centred on (i, j) (k = 7 in the paper's models). The relative embedding
r_{a-i,b-j} concatenates a row-offset embedding r_{a-i} and a column-offset embedding r_{b-j}, each half the
(per-head) width. Each head computes this attention on its own slice of the channels, with its own embeddings.

Vectorised, with no loop over pixels, as blocks with a halo (Vaswani et al., "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones", CVPR 2021, arXiv:2103.12731): the grid is cut into b x b query blocks, each
block's keys and values are unfolded once from its (b + k - 1)^2 surrounding window of the zero-padded grid and
shared by its b^2 queries, and an additive mask keeps, for every query, exactly its own k x k neighbourhood inside
the image (-inf elsewhere, the padded border included, which thus gets no weight; the paper is silent on borders)
and carries the q^T r term. The function is eq. 3's. Per-pixel unfolding would copy every key and value
k^2 = 49 times (it ran 8x slower than full attention over 32 x 32 tokens in a CPU measurement); the halo copies
them (b + k - 1)^2 / b^2 = 3 times for b = 8, k = 7, at the price of scoring the masked pairs. Maps are recorded
per block as [B * blocks, heads, b * b, (b + k - 1)^2] (queries and keys row-major; zero outside each query's
neighbourhood).

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
        block_size: int = 8,
        rel_pos: bool = True,
        qkv_bias: bool = True,
        channels_first: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise VitlabError(f"local attention needs an odd kernel_size to centre on each pixel, got {kernel_size}")
        if block_size < 1:
            raise VitlabError(f"local attention block_size must be at least 1, got {block_size}")
        if rel_pos and self.head_dim % 2:
            raise VitlabError(f"relative embeddings split each head in row and column halves; head dim {self.head_dim}")
        self.kernel_size = kernel_size
        self.block_size = block_size  # only how the work is cut: the function does not depend on it
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
        self.layout: tuple[int, int] | None = None  # (H, W) of the last call: what `to_image_attention` needs

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise VitlabError("local attention takes no attn_mask: the neighbourhood is its mask")
        if x.ndim != 4:
            raise VitlabError(f"local attention expects a [B, H, W, C] grid, got shape {tuple(x.shape)}")
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = x.shape
        self.layout = (H, W)
        ks, b, h, hd = self.kernel_size, self.block_size, self.num_heads, self.head_dim
        pad, halo = ks // 2, self.block_size + ks - 1
        nh, nw = -(-H // b), -(-W // b)  # blocks down and across; the grid is padded to whole blocks
        qkv = F.pad(self.qkv(x), (0, 0, 0, nw * b - W, 0, nh * b - H))  # (B, nh*b, nw*b, 3C)
        q, kv = qkv.split([C, 2 * C], dim=-1)
        q = q.reshape(B, nh, b, nw, b, h, hd).permute(0, 1, 3, 5, 2, 4, 6).reshape(B * nh * nw, h, b * b, hd)
        # each block's halo as a strided view of the zero-padded grid; the one copy (the reshape) moves whole
        # channel vectors
        kv = F.pad(kv, (0, 0, pad, pad, pad, pad)).unfold(1, halo, b).unfold(2, halo, b)  # (B, nh, nw, 2C, hb, hb)
        kv = kv.permute(0, 1, 2, 4, 5, 3).reshape(B * nh * nw, halo * halo, 2, h, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nb, h, hb^2, hd)
        allowed = self.neighbourhoods(H, W, x.device)  # (nb, b^2, hb^2)
        mask = allowed.expand(B, -1, -1, -1).reshape(B * nh * nw, 1, b * b, halo * halo)
        if self.rel_h is not None:
            mask = self.position_logits(q).masked_fill(~mask, float("-inf"))
        x = self.attend(q, k, v, mask)  # (B*nb, b^2, C)
        x = x.view(B, nh, nw, b, b, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * b, nw * b, C)[:, :H, :W]
        return x.permute(0, 3, 1, 2) if self.channels_first else x

    def to_image_attention(self, probs: torch.Tensor) -> torch.Tensor:
        """This module's last maps [B * blocks, h, b^2, hb^2] over image positions [B, h, HW, HW] (row-major): each
        row holds its pixel's k x k neighbourhood and sums to 1."""
        if self.layout is None:
            return probs
        H, W = self.layout
        b, pad = self.block_size, self.kernel_size // 2
        halo = b + 2 * pad
        nh, nw = -(-H // b), -(-W // b)

        def positions(n_blocks: int, size: int, offsets: torch.Tensor) -> torch.Tensor:
            """(blocks, len(offsets)) image coordinates along one axis; -1 outside the image."""
            at = torch.arange(n_blocks, device=probs.device)[:, None] * b + offsets
            return torch.where((at >= 0) & (at < size), at, -1)

        def flat(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            """Row-major position of every (row, col) pair per block, H * W (a spare slot, cropped) outside."""
            inside = (rows[:, None, :, None] >= 0) & (cols[None, :, None, :] >= 0)
            pos = torch.where(inside, rows[:, None, :, None] * W + cols[None, :, None, :], H * W)
            return pos.reshape(nh * nw, -1)  # (blocks, n * n)

        queries = torch.arange(b, device=probs.device)
        keys = torch.arange(halo, device=probs.device) - pad
        q_pos = flat(positions(nh, H, queries), positions(nw, W, queries))  # (blocks, b^2)
        k_pos = flat(positions(nh, H, keys), positions(nw, W, keys))  # (blocks, hb^2)
        B, heads = probs.shape[0] // (nh * nw), probs.shape[1]
        dense = probs.new_zeros(B, heads, H * W + 1, H * W + 1)
        dense[:, :, q_pos[:, :, None], k_pos[:, None, :]] = probs.view(B, nh * nw, heads, b * b, -1).transpose(1, 2)
        return dense[:, :, : H * W, : H * W]

    def neighbourhoods(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """For every block, query and halo key: whether the key is in the query's k x k neighbourhood and inside
        the image: (blocks, b^2, hb^2)."""
        ks, b, pad = self.kernel_size, self.block_size, self.kernel_size // 2
        halo = b + ks - 1
        nh, nw = -(-H // b), -(-W // b)
        qi = torch.arange(b, device=device)
        ki = torch.arange(halo, device=device) - pad  # halo position relative to the block's first row
        off = ki[None, :] - qi[:, None]  # (b, hb): a - i for a query row and a key row within one block
        near = off.abs() <= pad
        key_row = torch.arange(nh, device=device)[:, None] * b + ki  # (nh, hb): the key's image row
        key_col = torch.arange(nw, device=device)[:, None] * b + ki
        q_row = torch.arange(nh, device=device)[:, None] * b + qi  # (nh, b)
        q_col = torch.arange(nw, device=device)[:, None] * b + qi
        rows = near[None] & ((key_row >= 0) & (key_row < H))[:, None, :]  # (nh, b, hb)
        cols = near[None] & ((key_col >= 0) & (key_col < W))[:, None, :]  # (nw, b, hb)
        allowed = rows[:, None, :, None, :, None] & cols[None, :, None, :, None, :]  # (nh, nw, b, b, hb, hb)
        # queries in the padding past the image see everything, so that no softmax row is empty (their outputs
        # are cropped; an all -inf row would put NaN into the gradients)
        pad_q = (q_row >= H)[:, None, :, None] | (q_col >= W)[None, :, None, :]  # (nh, nw, b, b)
        return (allowed | pad_q[..., None, None]).reshape(nh * nw, b * b, halo * halo)

    def position_logits(self, q: torch.Tensor) -> torch.Tensor:
        """q_ij^T r_{a-i,b-j} / sqrt(d) for every query and halo key of a block: (B*nb, h, b^2, hb^2). With r the
        concatenation [r_{a-i}, r_{b-j}], the product splits into the first half of q against the row embedding of
        the row offset and the second half against the column embedding of the column offset; each depends on one
        coordinate of the query and of the key, so the two (b, b, hb) products broadcast into the (hb, hb) halo."""
        n, h, _, hd = q.shape
        b, ks, half = self.block_size, self.kernel_size, hd // 2
        halo = b + ks - 1
        offset = torch.arange(halo, device=q.device)[None, :] - torch.arange(b, device=q.device)[:, None]  # (b, hb)
        offset = offset.clamp(0, ks - 1)  # index of r for (a - i) + (k-1)/2; outside the window it is masked
        q = (self.q_norm(q) * self.scale).view(n, h, b, b, hd)  # the q that attend() compares with the keys
        by_row = torch.einsum("nhijd,hikd->nhijk", q[..., :half], self.rel_h[:, offset].to(q.dtype))  # key row k
        by_col = torch.einsum("nhijd,hjld->nhijl", q[..., half:], self.rel_w[:, offset].to(q.dtype))  # key col l
        return (by_row[..., :, None] + by_col[..., None, :]).reshape(n, h, b * b, halo * halo)
