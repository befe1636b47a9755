"""Vision transformers whose attention is cheaper than full: axial attention and local-window attention.

The course's two answers to the quadratic cost of self-attention over N = HW tokens, each in a ViT-style
isotropic network (patch embedding, pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))``, final LN, average
pooling) that keeps the tokens on their H x W grid:

* ``attn_type="axial"``: Wang et al., "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation",
  ECCV 2020 (arXiv:2003.07853), and Ho et al., "Axial Attention in Multidimensional Transformers" (arXiv:1912.12180):
  height-axis then width-axis attention with position-sensitive logits (`vitlab.layers.AxialAttention2d`),
  O(N (H + W)), a global receptive field in every block;
* ``attn_type="local"``: Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019
  (arXiv:1906.05909): each token attends to its k x k neighbourhood with relative row / column embeddings
  (`vitlab.layers.LocalSelfAttention`), O(N k^2); the receptive field grows by k - 1 per block.

Neither adds absolute position embeddings: both papers place tokens by relative embeddings alone. The papers
build ResNet-shaped networks (attention in place of each 3x3 convolution, with a convolutional stem); this isotropic
form holds everything but the attention fixed, so the two compare with each other and with ViT at equal size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from vitlab._registry import register_architecture, register_model
from vitlab.errors import VitlabError
from vitlab.layers import (
    AxialAttention2d,
    LocalSelfAttention,
    PatchEmbed,
    block_stack,
    low_precision_inference,
    trunc_normal_init,
)
from vitlab.models._features import take_indices
from vitlab.models._head import image_cfg, record_num_classes, zero_classifier

PAPERS = {
    "axial": "Wang et al., Axial-DeepLab: Stand-Alone Axial-Attention, ECCV 2020 (arXiv:2003.07853)",
    "local": "Ramachandran et al., Stand-Alone Self-Attention in Vision Models, NeurIPS 2019 (arXiv:1906.05909)",
}


@register_architecture
class GridVisionTransformer(nn.Module):
    arch = "grid_vit"
    head_names = ("head",)
    num_prefix_tokens = 0  # no class token: the tokens are the grid

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 28,
        patch_size: int | Sequence[int] = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        attn_type: Literal["axial", "local"] = "axial",
        kernel_size: int = 7,
        rel_pos: bool = True,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.attn_type = attn_type
        # a [B, H/P, W/P, D] grid, which LayerNorm, the MLP and both attentions take as it is
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False)
        if attn_type == "axial":
            attn_layer = functools.partial(AxialAttention2d, grid_size=self.patch_embed.grid_size if rel_pos else None)
        elif attn_type == "local":
            attn_layer = functools.partial(LocalSelfAttention, kernel_size=kernel_size, rel_pos=rel_pos)
        else:
            raise VitlabError(f"attn_type must be 'axial' or 'local', got {attn_type!r}")
        self.blocks = block_stack(
            depth,
            embed_dim,
            drop_path_rate=drop_path_rate,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            init_values=init_values,
            norm_eps=norm_eps,
            act=act,
            attn_layer=attn_layer,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.num_features = embed_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = zero_classifier(embed_dim, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As ViT's: truncated-normal(0.02) linear maps and zero biases, lecun-normal patch embedding; the zero
        classifier (`zero_classifier`) and the relative embeddings (truncated-normal(0.02)) keep their own start."""
        trunc_normal_init(self, skip=self.head)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def no_weight_decay(self) -> set[str]:
        """The relative position embeddings, like position embeddings elsewhere."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("rel_q", "rel_k", "rel_h", "rel_w")}

    # --- forward --------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> output tokens [B, N, D] in row-major grid order (after the final LN)."""
        x = self.blocks(low_precision_inference(self.patch_embed(x)))  # (B, H/P, W/P, D)
        return self.norm(x).flatten(1, 2)  # (B, N, D)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output tokens [B, N, D] of the chosen blocks (see `vitlab.models._features`)."""
        take = take_indices(len(self.blocks), indices)
        x = low_precision_inference(self.patch_embed(x))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                out.append((self.norm(x) if norm else x).flatten(1, 2))
            if intermediates_only and i == take[-1]:
                return out
        return self.norm(x).flatten(1, 2), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))  # global average pooling over the grid
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = zero_classifier(self.num_features, num_classes, device=self.patch_embed.proj.weight.device)
        record_num_classes(self, num_classes)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (embed_dim, depth, num_heads), DeiT's sizes; MLP ratio 4.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6)}
_PREFIX = {"axial": "axial_vit", "local": "sasa_vit"}


def _add_variant(attn_type: str, size: str, patch: int, img: int, in_chans: int, **extra: Any) -> None:
    dim, depth, heads = _SIZES[size]
    name = f"{_PREFIX[attn_type]}_{size}_patch{patch}_{img}"
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": 10,
        "attn_type": attn_type,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        **extra,
    }
    cfg = image_cfg(img, in_chans, num_classes=10, paper=PAPERS[attn_type])

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return GridVisionTransformer, kwargs, cfg

    variant.__name__ = name
    kind = (
        "axial (height, then width)" if attn_type == "axial" else f"{extra['kernel_size']}x{extra['kernel_size']} local"
    )
    variant.__doc__ = (
        f"{size} ({dim}, {depth} blocks, {heads} heads) with {kind} attention, patch {patch}, {img}x{img}."
    )
    register_model(variant)


# Fashion-MNIST / MNIST (28x28 grayscale) and CIFAR (32x32 RGB); patch 2 keeps a 14x14 / 16x16 grid, large enough
# for the cheaper attentions to differ from full attention. k = 7 is the paper's neighbourhood.
for _img, _chans in ((28, 1), (32, 3)):
    _add_variant("axial", "tiny", 2, _img, _chans)
    _add_variant("local", "tiny", 2, _img, _chans, kernel_size=7)
