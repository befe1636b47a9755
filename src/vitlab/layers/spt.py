"""Shifted Patch Tokenization (SPT).

Lee, Lee and Song, "Vision Transformer for Small-Size Datasets", arXiv:2112.13492 (2021), section 3.2, eq. 2-3.
ViT's tokens each see one P x P patch and nothing of its neighbours; SPT widens every token's receptive field by
concatenating the image with four copies of itself shifted diagonally by half a patch, then tokenising as usual:

    S(x) = LN(P([x  s_1  s_2  s_3  s_4])) E_S,          s_i: x shifted by (+-P/2, +-P/2), zeros brought in

where P(.) partitions the (5C)-channel image into N patches and flattens each to a vector of P^2 * 5C values, LN
is a LayerNorm over that vector, and E_S in R^{(P^2 5C) x D} projects it (``proj``). The shifts are by floor(P/2)
pixels with zero padding, in the official code's order (left-up, right-up, left-down, right-down of the window, so
the shifted copy ``(dy, dx)`` holds x[i + dy, j + dx]). Each flattened patch is laid out (row, column, channel),
channel fastest, as in the official code.

`ShiftedPatchTokenization` answers what ViT asks of `PatchEmbed` (``patch_size``, ``grid_size``, ``num_patches``,
``set_img_size``, ``proj``), so `VisionTransformer(embed_layer=...)` takes it in place of the patchify layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.patch_embed import PatchGrid

# (dy, dx) in units of the shift: the shifted copy holds x[i + dy * s, j + dx * s] (the official order)
DIAGONAL_SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def shifted_copies(x: torch.Tensor, shift: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, 5C, H, W]: the image, then its four diagonal shifts by ``shift`` pixels, zero-filled."""
    if shift == 0:  # a 1-pixel patch has no half to shift by: SPT is then five copies of the image
        return x.repeat(1, 5, 1, 1)
    H, W = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift))  # (B, C, H + 2s, W + 2s)
    # window (dy, dx) of the padded image starts at ((1 + dy) s, (1 + dx) s): pixel (i, j) is x[i + dy s, j + dx s]
    crops = []
    for dy, dx in DIAGONAL_SHIFTS:
        top, left = (1 + dy) * shift, (1 + dx) * shift
        crops.append(padded[..., top : top + H, left : left + W])
    return torch.cat([x, *crops], dim=1)


class ShiftedPatchTokenization(PatchGrid):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        flatten: bool = True,
        strict_img_size: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, flatten=flatten, strict_img_size=strict_img_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise VitlabError(f"shifted patch tokenization shifts by half a square patch; got {self.patch_size}")
        self.shift = self.patch_size[0] // 2
        patch_dim = 5 * in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm = nn.LayerNorm(patch_dim, eps=norm_eps)  # over each flattened patch, before E_S (eq. 3)
        self.proj = nn.Linear(patch_dim, embed_dim)  # E_S

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, D] in row-major order (a [B, H/P, W/P, D] grid without flatten)."""
        H, W = self.check_input(x)
        B, P = x.shape[0], self.patch_size[0]
        x = shifted_copies(x, self.shift)  # (B, 5C, H, W)
        C5, gh, gw = x.shape[1], H // P, W // P
        x = x.reshape(B, C5, gh, P, gw, P).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, P, P, 5C): channel fastest
        x = self.proj(self.norm(x.reshape(B, gh, gw, P * P * C5)))  # (B, gh, gw, D)
        return x.reshape(B, gh * gw, -1) if self.flatten else x
