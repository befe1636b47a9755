"""Position embeddings: fixed sine-cosine tables and resampling of learned ones.

* 1D sine-cosine: Vaswani et al. (2017), section 3.5: PE(pos, 2i) = sin(pos / 10000^{2i/D}),
  PE(pos, 2i+1) = cos(pos / 10000^{2i/D}).
* 2D sine-cosine: a quarter of the channels each for sin(x w), cos(x w), sin(y w), cos(y w) with
  w_k = 1 / 10000^{k / (D/4 - 1)}, as in MoCo v3 (Chen et al., 2021) and big_vision's "posemb_sincos_2d".
* Resampling: ViT (Dosovitskiy et al., 2021, section 3.2) fine-tunes at higher resolution by 2D interpolation of
  the pre-trained position embeddings according to their location in the original image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_pos_embed_1d(num_pos: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 1D table [num_pos, dim] (dim even)."""
    if dim % 2:
        raise ValueError(f"1D sine-cosine embedding needs an even dim, got {dim}")
    pos = torch.arange(num_pos, dtype=torch.float64)[:, None]
    inv_freq = temperature ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = pos * inv_freq  # (num_pos, dim/2)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_pos, dim)  # interleaved sin, cos
    return pe.float()


def sincos_pos_embed_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D table [H * W, dim] (dim divisible by 4), row-major over the (H, W) patch grid."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine embedding needs dim divisible by 4, got {dim}")
    h, w = grid_size
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    x = x.reshape(-1, 1) * omega  # (H*W, D/4)
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a position embedding [1, prefix + H*W, D] to the grid ``new_size``.

    Prefix tokens (class, distillation) have no position in the image, so they are kept apart and untouched.
    Interpolation runs in fp32 whatever the parameter's dtype, then the result is cast back: bicubic in bf16
    loses visible precision. ``old_size`` defaults to the square grid that fits the patch tokens.
    """
    new_size = (int(new_size[0]), int(new_size[1]))
    num_patch = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_patch)
        if side * side != num_patch:
            raise ValueError(f"cannot infer the grid of {num_patch} position embeddings; pass old_size")
        old_size = (side, side)
    old_size = (int(old_size[0]), int(old_size[1]))
    if old_size[0] * old_size[1] != num_patch:
        raise ValueError(f"old_size {old_size} does not match {num_patch} position embeddings")
    if new_size == old_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype, D = grid.dtype, grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], D).to(dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)
