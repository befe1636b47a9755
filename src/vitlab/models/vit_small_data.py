"""ViT for small data sets: the plain ViT with the locality levers that make it learn from little.

A plain ViT has none of a CNN's locality; on small data it trails one. Three changes, each from its paper, put some
back while keeping ViT's encoder (eqs. 2-4 of Dosovitskiy et al., `VisionTransformer`, reused whole):

* Shifted Patch Tokenization (Lee, Lee and Song, "Vision Transformer for Small-Size Datasets", arXiv:2112.13492,
  2021, section 3.2): each token sees its patch and the four diagonal half-patch shifts of the image
  (`ShiftedPatchTokenization`), ``tokenizer="spt"``;
* Locality Self-Attention (same paper, section 3.3): the diagonal of the attention logits masked and a learned
  temperature (`LocalitySelfAttention`), ``lsa=True``;
* a convolutional stem (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021,
  arXiv:2106.14881): 3 x 3 stride-2 convolutions with BatchNorm and ReLU, then a 1 x 1 convolution, in place of
  patchify (`ConvStem`), ``tokenizer="conv"``.

The paper of the stem removes one transformer block so that the stem's flops replace it (its 4-layer stem at 224 px
costs about one block). At 28 px the 2-layer stem of ViT-Ti/4 (96 and 192 channels, then 192 -> 192) costs 10.1M
multiply-adds against 23.1M for one block of 50 tokens (32 px RGB: 13.6M against 30.4M), 0.44 of a block: removing a
block would cut the compute by 0.56 of one, keeping all 12 adds 0.44, so the ``convstem`` variants keep 12 blocks
(``depth=11`` through model_args gives the paper's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from vitlab._registry import register_architecture, register_variant
from vitlab.errors import VitlabError
from vitlab.layers import Attention, ConvStem, LocalitySelfAttention, ShiftedPatchTokenization
from vitlab.models._head import image_cfg
from vitlab.models.vit import VisionTransformer, size_args, size_label

SPT_LSA_PAPER = "Lee, Lee and Song, Vision Transformer for Small-Size Datasets, 2021 (arXiv:2112.13492)"
STEM_PAPER = "Xiao et al., Early Convolutions Help Transformers See Better, NeurIPS 2021 (arXiv:2106.14881)"
TOKENIZERS = ("patch", "spt", "conv")


def build_tokenizer(
    tokenizer: str,
    *,
    img_size: int | tuple[int, int],
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    dynamic_img_size: bool,
    stem_widths: Sequence[int] | None,
) -> nn.Module | None:
    """The patch embedding a ``tokenizer`` name stands for; None for ViT's own patchify layer."""
    if tokenizer not in TOKENIZERS:
        raise VitlabError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if stem_widths is not None and tokenizer != "conv":
        raise VitlabError(f"stem_widths is for tokenizer='conv', not {tokenizer!r}")
    flags = {"flatten": not dynamic_img_size, "strict_img_size": not dynamic_img_size}
    if tokenizer == "spt":
        return ShiftedPatchTokenization(img_size, patch_size, in_chans, embed_dim, **flags)
    if tokenizer == "conv":
        return ConvStem(img_size, patch_size, in_chans, embed_dim, widths=stem_widths, **flags)
    return None


@register_architecture
class SmallDataVisionTransformer(VisionTransformer):
    """`VisionTransformer` with a choice of tokenizer (``"patch"``, ``"spt"``, ``"conv"``) and of attention
    (``lsa``); every other argument is ViT's (``**kwargs``). ``patch_size`` is the pixels per token side for all
    three tokenizers (a power of 2 for the stem)."""

    arch = "vit_small_data"

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        embed_dim: int = 192,
        dynamic_img_size: bool = False,
        tokenizer: Literal["patch", "spt", "conv"] = "spt",
        lsa: bool = True,
        stem_widths: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        embed = build_tokenizer(
            tokenizer,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            dynamic_img_size=dynamic_img_size,
            stem_widths=stem_widths,
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            dynamic_img_size=dynamic_img_size,
            embed_layer=embed,
            attn_layer=LocalitySelfAttention if lsa else Attention,
            **kwargs,
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViT's initialisation; then the stem's convolutions He-normal again (ViT's gives every convolution the
        linear maps' 0.02, too small for a ReLU stack)."""
        super().init_weights()
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.init_weights()


# --- registered variants -------------------------------------------------------------------------------------
# name part -> (tokenizer, lsa)
_LEVERS = {"spt_lsa": ("spt", True), "spt": ("spt", False), "lsa": ("patch", True), "convstem": ("conv", False)}


def _add_variant(levers: str, img: int, in_chans: int, size: str = "tiny", patch: int = 4) -> None:
    tokenizer, lsa = _LEVERS[levers]
    # the stem's name carries no patch size: its grid is patch 4's (two stride-2 convolutions)
    name = f"vit_{size}_convstem_{img}" if tokenizer == "conv" else f"vit_{size}_{levers}_patch{patch}_{img}"
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": 10,
        **size_args(size),
        "tokenizer": tokenizer,
        "lsa": lsa,
    }
    doc = f"ViT-{size_label(size)}/{patch} at {img}x{img} ({in_chans} channels) with {levers.replace('_', ' + ')}."
    paper = STEM_PAPER if tokenizer == "conv" else SPT_LSA_PAPER
    cfg = image_cfg(img, in_chans, paper=paper, num_classes=10)  # mean and std 0.5, as the plain ViT variants
    register_variant(name, SmallDataVisionTransformer, kwargs, cfg, doc)


# 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes, as the plain ViT-Ti/4 variants
for _levers in _LEVERS:
    for _size in ("tiny", "mini"):
        _add_variant(_levers, 28, 1, _size)
        _add_variant(_levers, 32, 3, _size)
