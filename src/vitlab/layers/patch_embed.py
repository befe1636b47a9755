"""Patch embedding (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021, eq. 1).

The image x in R^{H x W x C} is cut into N = HW / P^2 non-overlapping patches x_p in R^{P^2 C}, each mapped by
E in R^{(P^2 C) x D}. A P x P convolution with stride P is exactly that linear map applied to every patch
(its weight is E reshaped to (D, C, P, P)), and it is faster than unfolding the patches by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitlab.errors import VitlabError


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise VitlabError(f"expected one size or (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def check_image(x: torch.Tensor, in_chans: int, img_size: tuple[int, int] | None) -> None:
    """One-line errors for images [B, C, H, W] with another number of channels or, when ``img_size`` is given (a
    model with a fixed input size), another size."""
    _, C, H, W = x.shape
    if C != in_chans:
        raise VitlabError(f"input has {C} channels but the model expects {in_chans}; convert the images first")
    if img_size is not None and (H, W) != img_size:
        raise VitlabError(
            f"input size ({H}, {W}) differs from the model's {img_size}; resize the images, "
            "call set_input_size(), or build the model with dynamic_img_size=True"
        )


def map_to_tokens(x: torch.Tensor, flatten: bool = True) -> torch.Tensor:
    """A map [B, D, H, W] -> tokens [B, H*W, D] in row-major order, or the grid [B, H, W, D] with ``flatten=False``
    (models with dynamic input sizes resample their position embedding to it first)."""
    if flatten:
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
    return x.permute(0, 2, 3, 1)  # (B, H, W, D)


class PatchGrid(nn.Module):
    """What ViT asks of a tokenizer: the image cut into a grid of P x P patches (``patch_size``, ``img_size``,
    ``grid_size``, ``num_patches``, ``set_img_size``) and the input checks. Subclasses say how a patch becomes a token
    (a linear map here; shifted copies in SPT; a convolutional stem)."""

    def __init__(
        self,
        img_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_chans: int,
        *,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.set_img_size(img_size)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise VitlabError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """(H, W) of images [B, C, H, W], after one-line errors for the wrong channels, size or divisibility."""
        check_image(x, self.in_chans, self.img_size if self.strict_img_size else None)
        H, W = x.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise VitlabError(f"input size ({H}, {W}) is not divisible by patch size {self.patch_size}")
        return H, W


class PatchEmbed(PatchGrid):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        bias: bool = True,
        flatten: bool = True,
        strict_img_size: bool = True,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, flatten=flatten, strict_img_size=strict_img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        # a norm over the embedding (Swin's "patch_norm"); Identity holds no state, so ViT checkpoints are unchanged
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.norm(map_to_tokens(self.proj(x), self.flatten))  # proj: (B, D, H/P, W/P)
