"""A convolutional stem in place of ViT's patchify layer.

Xiao, Singh, Mintun, Darrell, Dollar and Girshick, "Early Convolutions Help Transformers See Better", NeurIPS 2021
(arXiv:2106.14881), section 3. The patchify stem is one P x P convolution with stride P, "large kernel and large
stride", unlike any CNN's first layers; the paper replaces it by a stack of 3 x 3 convolutions with stride 2, each
followed by BatchNorm and ReLU, and a final 1 x 1 convolution to the width D (no norm, no activation), which made
ViTs far less sensitive to the optimiser and its settings and 1-2% more accurate on ImageNet. log2(P) stride-2
convolutions give the patchify stem's grid; the widths double from layer to layer and the last one equals D (the
paper's ViT_C-1GF: 24, 48, 96, 192 for D = 192 and P = 16), so two layers of D / 2 and D stand for P = 4.

`ConvStem` answers what ViT asks of `PatchEmbed` (``patch_size``: the pixels per token side, ``grid_size``,
``num_patches``, ``set_img_size``, ``proj``: the final 1 x 1 convolution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.patch_embed import PatchGrid, map_to_tokens


def stem_widths(patch_size: int, embed_dim: int) -> list[int]:
    """The paper's widths for a stride-``patch_size`` stem: log2(P) layers doubling up to ``embed_dim``."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise VitlabError(f"a stem of stride-2 convolutions needs a patch size that is a power of 2, got {patch_size}")
    return [max(1, embed_dim // 2 ** (n - 1 - i)) for i in range(n)]


class ConvStem(PatchGrid):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        widths: Sequence[int] | None = None,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        widths = list(widths) if widths is not None else stem_widths(patch_size, embed_dim)
        if 2 ** len(widths) != patch_size:
            raise VitlabError(
                f"{len(widths)} stride-2 convolutions make patch size {2 ** len(widths)}, not {patch_size}"
            )
        # each 3 x 3 / 2 convolution with padding 1 maps n to ceil(n / 2): n / P after log2(P) of them
        super().__init__(img_size, patch_size, in_chans, flatten=flatten, strict_img_size=strict_img_size)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_chans, *widths[:-1]], widths):
            # no bias: the BatchNorm that follows would cancel it
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], embed_dim, kernel_size=1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal (fan-out) convolutions before a ReLU, as the paper's CNN-style stem (pycls, timm's ResNets).
        A model that re-initialises its linear maps (ViT's trunc-normal 0.02) calls this again after."""
        for m in self.stem.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, D] in row-major order (a [B, H/P, W/P, D] grid without flatten)."""
        self.check_input(x)
        return map_to_tokens(self.proj(self.stem(x)), self.flatten)  # proj: (B, D, H/P, W/P)
