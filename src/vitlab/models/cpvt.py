"""CPVT: Conditional Position encoding Vision Transformer.

Chu, Tian, Zhang, Wang, Shen, "Conditional Positional Encodings for Vision Transformers", ICLR 2023
(arXiv:2102.10882).

CPVT is DeiT / ViT with the fixed position embedding E_pos removed and a Position Encoding Generator
(`vitlab.layers.PEG`, section 3.2) inserted after the first encoder block (section 3.3, Fig. 1b; the ablation of
section 4.4 finds position 0, after the first encoder, the best single place):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E]                  (ViT's eq. 1 without E_pos)
    z_1 = PEG(Encoder_1(z_0))                               PEG(X) = DWConv_3x3(X') + X' on the patch grid X'
    z_l = Encoder_l(z_{l-1}),  l = 2 ... L                  (ViT's eqs. 2-3)

The class token passes the PEG untouched. CPVT-GAP (Fig. 1c) drops the class token and classifies the global
average of the output tokens, which the paper reports as better still. The position encoding comes from a
convolution, so a trained model runs at any input size that the patch size divides, with no interpolation:
the model has no parameter whose shape depends on the input size. Sizes are DeiT's: Ti 192 / 3 heads, S 384 / 6,
B 768 / 12, all 12 layers. ``peg_indices`` places PEGs after other or several blocks (the paper's ablations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from vitlab._registry import register_architecture, register_variant
from vitlab.errors import VitlabError
from vitlab.layers import PEG, low_precision_inference
from vitlab.models._features import take_indices
from vitlab.models._head import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, image_cfg
from vitlab.models.vit import VisionTransformer

PAPER = "Chu et al., Conditional Positional Encodings for Vision Transformers, ICLR 2023 (arXiv:2102.10882)"


@register_architecture
class CPVT(VisionTransformer):
    """ViT with no position embedding, dynamic input size and PEGs after the blocks in ``peg_indices``."""

    arch = "cpvt"

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg"] = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        peg_indices: Sequence[int] = (0,),
        peg_kernel_size: int = 3,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act: str = "gelu",
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=global_pool == "token",  # CPVT-GAP has no class token
            pos_embed="none",
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            act=act,
            dynamic_img_size=True,  # any multiple of the patch size: PEG needs no resampling
        )
        for i in peg_indices:
            if not 0 <= i < depth:
                raise VitlabError(f"peg_indices must name blocks 0 ... {depth - 1}, got {i}")
        # keyed by the block each PEG follows; built after ViT's init_weights, so init_weights below covers it
        self.pegs = nn.ModuleDict({str(i): PEG(embed_dim, kernel_size=peg_kernel_size) for i in sorted(peg_indices)})

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViT's initialisation; the PEG convolution keeps PyTorch's default, as in the DeiT code CPVT builds on
        (its initialiser touches only linear maps and LayerNorms)."""
        super().init_weights()
        for peg in getattr(self, "pegs", {}).values():
            peg.proj.reset_parameters()

    def _encode(
        self, x: torch.Tensor, take: Sequence[int] = (), *, norm: bool = False, stop_early: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (tokens after the last block run, [tokens after each block in ``take``, its PEG applied])."""
        x = self.patch_embed(x)  # (B, H/P, W/P, D)
        grid = (x.shape[1], x.shape[2])
        x = low_precision_inference(self._pos_embed(x))  # (B, prefix + N, D): class token, no position embedding
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if str(i) in self.pegs:
                x = self.pegs[str(i)](x, grid, self.num_prefix_tokens)
            if i in take:
                out.append(self.norm(x) if norm else x)
                if stop_early and i == take[-1]:
                    break  # the blocks after the last one asked for need not run
        return x, out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] (H, W multiples of the patch) -> normalised tokens [B, prefix + N, D]."""
        return self.norm(self._encode(x)[0])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The tokens [B, prefix + N, D] after the chosen blocks, a block's PEG included (see
        `vitlab.models._features`)."""
        take = take_indices(len(self.blocks), indices)
        x, out = self._encode(x, take, norm=norm, stop_early=intermediates_only)
        return out if intermediates_only else (self.norm(x), out)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.head.to(self.patch_embed.proj.weight.device)


# --- registered variants -------------------------------------------------------------------------------------
_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # name -> (embed_dim, num_heads); depth 12


def _add_variant(size: str, gap: bool, patch: int, img: int, in_chans: int = 3, num_classes: int = 1000) -> None:
    dim, heads = _SIZES[size]
    name = f"cpvt_{size}{'_gap' if gap else ''}_patch{patch}_{img}"
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "global_pool": "avg" if gap else "token",
        "embed_dim": dim,
        "depth": 12,
        "num_heads": heads,
    }
    # DeiT's ImageNet statistics for the paper's models (CPVT trains with DeiT's recipe); 0.5 for the small ones
    imagenet = img >= 224
    cfg = image_cfg(
        img,
        in_chans,
        num_classes=num_classes,
        paper=PAPER,
        mean=IMAGENET_DEFAULT_MEAN if imagenet else None,
        std=IMAGENET_DEFAULT_STD if imagenet else None,
    )
    pool = "global average pooling, no class token" if gap else "class token"
    doc = f"CPVT-{size[0].upper()}{'-GAP' if gap else ''}/{patch} trained at {img}x{img}: {pool}."
    register_variant(name, CPVT, kwargs, cfg, doc)


for _size in _SIZES:
    for _gap in (False, True):
        _add_variant(_size, _gap, 16, 224)
# Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
for _gap in (False, True):
    _add_variant("tiny", _gap, 4, 28, in_chans=1, num_classes=10)
    _add_variant("tiny", _gap, 4, 32, in_chans=3, num_classes=10)
