"""Windowed self-attention: non-overlapping windows, their relative position bias and the shifted-window mask.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021 (arXiv:2103.14030),
section 3.2. Self-attention runs inside each M x M window of a feature map, with a relative position bias
B in R^{M^2 x M^2} added to the logits (eq. 4):

    Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V,

where B is read from a learned table B_hat in R^{(2M-1) x (2M-1)} (one per head) at the offset between every pair of
tokens of a window: offsets along each axis lie in [-M+1, M-1]. Shifted windows are computed by cyclically shifting
the map by floor(M/2) towards the top left and masking the pairs of tokens that the shift brought together but that
are not neighbours in the image (section 3.2, "efficient batch computation for shifted configuration", Figure 4).

The helpers here know nothing of Swin's blocks and are shared by every windowed attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attention import AttentionBase
from vitlab.layers.patch_embed import to_2tuple


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Cut a map [B, H, W, C] into non-overlapping windows [B * nW, wh * ww, C] (H, W multiples of the window).
    Windows are ordered image by image, row-major; tokens inside a window are row-major."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)  # (B, nH, wh, nW, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # (B * nH * nW, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """The inverse of `window_partition`: windows [B * nW, wh * ww, C] -> map [B, height, width, C]."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, C)  # (B, nH, nW, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)  # (B, H, W, C)


def relative_position_index(
    window: int | tuple[int, int],
    table_window: int | tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Index [N, N] (N = wh * ww, row-major tokens) into a flattened (2 Mh - 1) x (2 Mw - 1) relative position table
    of the offset between query i and key j: (dy + Mh - 1) * (2 Mw - 1) + (dx + Mw - 1).

    ``table_window`` (Mh, Mw) defaults to the window itself. A smaller window (a map smaller than the window the
    table was learned for) reads the entries of the offsets it has, so equal offsets keep equal biases."""
    wh, ww = to_2tuple(window)
    mh, mw = to_2tuple(table_window or window)
    if wh > mh or ww > mw:
        raise ValueError(f"window {(wh, ww)} is larger than the table's window {(mh, mw)}")
    ys, xs = torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )  # (wh, ww) each
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): offset of query i from key j
    return (rel[0] + mh - 1) * (2 * mw - 1) + (rel[1] + mw - 1)


def _shift_regions(n: int, window: int, shift: int, device: torch.device | str | None) -> torch.Tensor:
    """Region label along one axis of a map of n (a window multiple) shifted by -shift: the last ``shift``
    positions wrapped round from the start, the last window's other positions did not, and the windows before it
    hold one region each (any label works for them: no window mixes them with another region)."""
    i = torch.arange(n, device=device)
    return (i >= n - window).long() + (i >= n - shift).long()


def shifted_window_mask(
    size: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask [nW, N, N] for windows of a map of ``size`` (window multiples) cyclically shifted by
    ``-shift``: 0 between tokens that are neighbours in the unshifted map, -inf between tokens that the shift put in
    one window from opposite borders.

    -inf, where the references write -100: the blocked weights are then exactly zero rather than e^-100, and no row
    is fully blocked, since every token sees itself."""
    H, W = size
    label = _shift_regions(H, window[0], shift[0], device)[:, None] * 3 + _shift_regions(
        W, window[1], shift[1], device
    )  # (H, W)
    label = window_partition(label.view(1, H, W, 1), window).squeeze(-1)  # (nW, N)
    blocked = label[:, :, None] != label[:, None, :]  # (nW, N, N)
    return torch.zeros(blocked.shape, device=device, dtype=dtype).masked_fill(blocked, float("-inf"))


def window_attention_to_image(
    probs: torch.Tensor, padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Window attention maps [B * nW, h, N, N] (windows of a map padded to ``padded`` and shifted by ``shift``)
    -> attention over image positions [B, h, Hp * Wp, Hp * Wp], zero between positions in different windows.

    Row-major positions of the padded, unshifted map: token (r, c) of the shifted map is position
    ((r + s_h) mod Hp, (c + s_w) mod Wp) of the map before the shift. Rows still sum to 1.
    """
    Hp, Wp = padded
    wh, ww = window
    nW = (Hp // wh) * (Wp // ww)
    B = probs.shape[0] // nW
    heads, N = probs.shape[1], wh * ww
    r = torch.arange(Hp, device=probs.device).view(Hp, 1).expand(Hp, Wp)
    c = torch.arange(Wp, device=probs.device).view(1, Wp).expand(Hp, Wp)
    pos = ((r + shift[0]) % Hp) * Wp + (c + shift[1]) % Wp  # (Hp, Wp): image position of each shifted token
    pos = window_partition(pos[None, :, :, None], window).view(nW, N)  # (nW, N), in the windows' token order
    rows = pos[:, :, None].expand(nW, N, N)
    cols = pos[:, None, :].expand(nW, N, N)
    dense = probs.new_zeros(B, heads, Hp * Wp, Hp * Wp)
    dense[:, :, rows, cols] = probs.view(B, nW, heads, N, N).transpose(1, 2)  # (B, h, nW, N, N)
    return dense


class WindowAttention(AttentionBase):
    """Window multi-head self-attention (W-MSA / SW-MSA) with a learned relative position bias (eq. 4).

    Takes a map [B, H, W, C], pads it to window multiples, shifts it (SW-MSA) and cuts it into windows [B * nW, N, C];
    with a shift, the shift mask [nW, N, N] keeps apart tokens the shift brought together. Bias and mask go to
    `attend` as one additive float mask, so the fused and explicit paths compute the same function and the maps pass
    through ``attn_probs`` (recorded as [B * nW, heads, N, N], windows in `window_partition`'s order).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)  # dropouts, qk_norm (as `Block` passes them)
        self.window_size = to_2tuple(window_size)
        wh, ww = self.window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # derived from the window size alone, so not saved (timm and HF leave it out of checkpoints too)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        # (padded map size, window, shift) of the last call: what `to_image_attention` needs
        self.layout: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    def to_image_attention(self, probs: torch.Tensor) -> torch.Tensor:
        """This module's last recorded maps over image positions (see `window_attention_to_image`)."""
        if self.layout is None:
            return probs
        return window_attention_to_image(probs, *self.layout)

    def relative_position_bias(self, window: tuple[int, int] | None = None) -> torch.Tensor:
        """B for every pair of tokens of a window [heads, N, N]; ``window`` may be smaller than the table's."""
        window = window or self.window_size
        if window == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window_size, device=self.relative_position_bias_table.device)
        N = window[0] * window[1]
        return self.relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (h, N, N)

    def forward(
        self,
        x: torch.Tensor,
        window: tuple[int, int] | None = None,
        shift: tuple[int, int] = (0, 0),
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A map [B, H, W, C] -> [B, H, W, C]: attention within ``window``s of the map shifted by ``shift`` (SW-MSA;
        ``mask`` is then the shift mask of `shifted_window_mask`), W-MSA without a shift."""
        B, H, W, C = x.shape
        window = window or self.window_size
        # zeros at the bottom and right up to a window multiple, before the shift, as HF and the official detection
        # code (timm shifts first, which computes something else at such sizes). Padded tokens are keys like any
        # other, as in all three.
        x = F.pad(x, (0, 0, 0, -W % window[1], 0, -H % window[0]))  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))  # cyclic shift towards the top left
        self.layout = ((Hp, Wp), window, shift)  # for maps over image positions (analysis)
        windows = self.window_attention(window_partition(x, window), window, mask)  # (B * nW, wh * ww, C)
        x = window_reverse(windows, window, Hp, Wp)  # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W]

    def window_attention(
        self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Windows [B * nW, N, C] (image-major, `window_partition`'s order) -> [B * nW, N, C]."""
        B_, N, C = x.shape  # B_ = batch * windows
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B_, h, N, hd)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias(window).unsqueeze(0)  # (1, h, N, N), broadcast over windows
        if mask is not None:
            nW = mask.shape[0]
            bias = bias + mask.unsqueeze(1)  # (nW, h, N, N)
            # windows are image-major (see window_partition): repeat the per-window masks for every image
            bias = bias.unsqueeze(0).expand(B_ // nW, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        return self.attend(q, k, v, bias.to(q.dtype))
