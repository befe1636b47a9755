"""Hybrid Vision Transformer: a ResNet stem, then ViT on its feature map.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021
(arXiv:2010.11929), section 3.1 "Hybrid Architecture": the input sequence is formed from a CNN's feature map
instead of raw image patches; eq. 1's projection E is applied to patches of that map, and "as a special case, the
patches can have spatial size 1x1", i.e. the map is flattened and each position projected to D:

    z_0 = [x_class; f^1 E; ...; f^N E] + E_pos,   f = ResNet(x) in R^{H/16 x W/16 x C},   E: a 1x1 convolution C -> D

then eqs. 2-4 of ViT unchanged (`VisionTransformer`, reused whole: `HybridEmbed` takes the place of its patch
embedding). The R50 of the paper's hybrids (section 4.1) is BiT's ResNet (Kolesnikov et al.,
"Big Transfer", ECCV 2020): GroupNorm (32 groups) in place of BatchNorm and weight-standardised convolutions
(`StdConv2d`), stem 7x7 / 2 + 3x3 / 2 max-pool, bottleneck blocks with the stride on the 3x3 convolution. ViT
removes stage 4 and puts its layers into stage 3, keeping the total (6 + 3 = 9 blocks: "layers (3, 4, 9)"), so the
map has stride 16 and 1024 channels. As in the official JAX code and timm, the blocks are post-activation (conv ->
GN -> ReLU, GN on the sum's branch, ReLU after the residual addition) and every padding is TF "SAME".

Parameter names follow timm's ``vit_base_r50_s16_384`` (``patch_embed.backbone.stem.conv``,
``patch_embed.backbone.stages.{i}.blocks.{j}.conv1``, ``patch_embed.proj``, ...), so its state dicts load as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._registry import (
    Converted,
    Exported,
    constructor_args,
    register_architecture,
    register_model,
    register_timm_converter,
    register_timm_exporter,
)
from vitlab.errors import VitlabError
from vitlab.layers import MaxPool2dSame, StdConv2d, check_image, map_to_tokens, to_2tuple
from vitlab.models.vit import TIMM_VIT_ARGS, VisionTransformer, _cfg, infer_vit_args, timm_vit_args

CONV_EPS = 1e-8  # the weight-standardisation epsilon of the official hybrid (timm's and HF's ports keep it)


def bottleneck_width(out_chs: int) -> int:
    """A bottleneck's inner width: a quarter of its output, rounded to a multiple of 8 (at least 8) as timm's and
    HF's ports of BiT do (never below 90% of the quarter). R50's widths (64, 128, 256) are exact quarters."""
    quarter = out_chs / 4
    width = max(8, int(quarter + 4) // 8 * 8)
    return width + 8 if width < 0.9 * quarter else width


def _conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(c_in, c_out, kernel_size, stride=stride, padding="same", eps=CONV_EPS)


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 convolution (with the block's stride) + GroupNorm."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int, num_groups: int) -> None:
        super().__init__()
        self.conv = _conv(in_chs, out_chs, 1, stride)
        self.norm = nn.GroupNorm(num_groups, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 (C -> ~C/4) -> 3x3 (stride) -> 1x1 (-> C), each followed by GroupNorm, ReLU after the first two; the
    residual sum is activated (He et al. 2016's block with the stride on the 3x3 convolution, "ResNet v1.5")."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, first: bool = False, num_groups: int = 32):
        super().__init__()
        mid = bottleneck_width(out_chs)
        self.downsample = Downsample(in_chs, out_chs, stride=stride, num_groups=num_groups) if first else None
        self.conv1 = _conv(in_chs, mid, 1)
        self.norm1 = nn.GroupNorm(num_groups, mid)
        self.conv2 = _conv(mid, mid, 3, stride)
        self.norm2 = nn.GroupNorm(num_groups, mid)
        self.conv3 = _conv(mid, out_chs, 1)
        self.norm3 = nn.GroupNorm(num_groups, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, *, depth: int, stride: int, num_groups: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                Bottleneck(
                    in_chs if i == 0 else out_chs,
                    out_chs,
                    stride=stride if i == 0 else 1,
                    first=i == 0,
                    num_groups=num_groups,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """7x7 / 2 convolution -> GroupNorm -> ReLU -> 3x3 / 2 max-pool: stride 4."""

    def __init__(self, in_chans: int, width: int, *, num_groups: int) -> None:
        super().__init__()
        self.conv = _conv(in_chans, width, 7, 2)
        self.norm = nn.GroupNorm(num_groups, width)
        self.pool = MaxPool2dSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class ResNetBackbone(nn.Module):
    """BiT's ResNet (GroupNorm, weight standardisation, "SAME" padding) up to its last stage's map [B, C, H', W'].

    Stage i has ``layers[i]`` bottlenecks of ``widths[i]`` output channels; stage 0 keeps the stem's stride 4, each
    later one halves the map. ``layers=(3, 4, 9)`` with the default widths is the hybrid's R50 (stride 16)."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        layers: Sequence[int] = (3, 4, 9),
        widths: Sequence[int] = (256, 512, 1024),
        stem_width: int = 64,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if not layers or len(layers) != len(widths):
            raise VitlabError(f"the ResNet backbone needs one width per stage, got layers={layers} widths={widths}")
        for c in (stem_width, *widths, *map(bottleneck_width, widths)):
            if c % num_groups:
                raise VitlabError(f"GroupNorm with {num_groups} groups cannot split {c} channels; change the widths")
        self.stem = ResNetStem(in_chans, stem_width, num_groups=num_groups)
        strides = [1] + [2] * (len(layers) - 1)
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(
            *[
                ResNetStage(chans[i], chans[i + 1], depth=d, stride=s, num_groups=num_groups)
                for i, (d, s) in enumerate(zip(layers, strides))
            ]
        )
        self.strides = (2, 2, *strides)  # stem convolution, stem pool, stages
        self.stride = math.prod(self.strides)
        self.num_features = widths[-1]

    def feature_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The map's (H', W') for an (H, W) input: with "SAME" padding each stride-s layer gives ceil(n / s)."""
        h, w = img_size
        for s in self.strides:
            h, w = math.ceil(h / s), math.ceil(w / s)
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H / stride, W / stride)


class HybridEmbed(nn.Module):
    """The hybrid's patch embedding: CNN feature map -> 1x1 projection to D -> tokens [B, N, D] (or a [B, H', W', D]
    grid with ``flatten=False``). It answers what ViT asks of `PatchEmbed`: ``patch_size`` is the backbone's stride
    (the pixels per token side, 16 for R50), ``grid_size`` and ``num_patches`` follow from the image size."""

    def __init__(
        self,
        backbone: ResNetBackbone,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=1)  # E of eq. 1 on 1x1 "patches"
        self.in_chans = in_chans
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.patch_size = (backbone.stride, backbone.stride)
        self.set_img_size(img_size)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise VitlabError(f"image size {self.img_size} is not divisible by the backbone's stride {self.patch_size}")
        self.grid_size = self.backbone.feature_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, self.img_size if self.strict_img_size else None)
        return map_to_tokens(self.proj(self.backbone(x)), self.flatten)  # proj: (B, D, H', W')


@register_architecture
class HybridVisionTransformer(VisionTransformer):
    """`VisionTransformer` whose patch embedding is `HybridEmbed`; every other argument is ViT's (``**kwargs``)."""

    arch = "vit_hybrid"

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 384,
        in_chans: int = 3,
        embed_dim: int = 768,
        dynamic_img_size: bool = False,
        backbone_layers: Sequence[int] = (3, 4, 9),
        backbone_widths: Sequence[int] = (256, 512, 1024),
        backbone_stem_width: int = 64,
        backbone_groups: int = 32,
        **kwargs: Any,
    ) -> None:
        backbone = ResNetBackbone(
            in_chans=in_chans,
            layers=backbone_layers,
            widths=backbone_widths,
            stem_width=backbone_stem_width,
            num_groups=backbone_groups,
        )
        embed = HybridEmbed(
            backbone,
            img_size=img_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=not dynamic_img_size,
            strict_img_size=not dynamic_img_size,
        )
        super().__init__(
            img_size=img_size,
            patch_size=embed.patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            dynamic_img_size=dynamic_img_size,
            embed_layer=embed,
            **kwargs,
        )


# --- checkpoint converter: timm's names are ours; the arguments are read off the shapes ------------------------
def _is_timm_hybrid(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.backbone.stem.conv.weight" in state and "patch_embed.proj.weight" in state


@register_timm_converter(_is_timm_hybrid, priority=10)  # above plain ViT, whose keys a hybrid's also has
def convert_timm_hybrid(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm's ``vit_*_r50_*`` / ``vit_*_r26_*`` with a ResNet-v2 backbone (``ResNetV2(preact=False)``)."""
    preact = "patch_embed.backbone.norm.weight" in state
    if preact or "patch_embed.backbone.stages.0.blocks.0.conv1.weight" not in state:
        raise VitlabError("this timm hybrid's backbone is not the post-activation BiT ResNet vitlab implements")
    stage_re = re.compile(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv1\.weight$")
    depths: dict[int, int] = {}
    for k in state:
        if m := stage_re.match(k):
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    layers = [depths[i] for i in range(len(depths))]
    widths = [state[f"patch_embed.backbone.stages.{i}.blocks.0.conv3.weight"].shape[0] for i in range(len(layers))]
    stem = state["patch_embed.backbone.stem.conv.weight"]  # (stem width, C, 7, 7)
    vit = {k: v for k, v in state.items() if not k.startswith("patch_embed.backbone.")}
    stride = 4 * 2 ** (len(layers) - 1)  # a position-table cell covers stride x stride pixels of the image
    kwargs, unknown, source_img = infer_vit_args(vit, declared, patch=(stride, stride))
    kwargs.update(
        in_chans=stem.shape[1],
        backbone_layers=layers,
        backbone_widths=widths,
        backbone_stem_width=stem.shape[0],
    )
    kwargs.pop("patch_size")
    cfg = _cfg(kwargs["img_size"][0], kwargs["in_chans"])
    return Converted("vit_hybrid", dict(state), kwargs, cfg, source_img, unknown)


# timm builds a hybrid's BiT ResNet from the architecture's name alone: stages -> the timm model that has them (at
# widths 256 * 2^i, a 64-wide stem and 32 groups); model_args set the ViT's sizes
TIMM_HYBRIDS = {
    (3, 4, 9): "vit_base_r50_s16_384",
    (3, 4, 6, 3): "vit_large_r50_s32_224",
    (2, 2, 2, 2): "vit_small_r26_s32_224",
}


@register_timm_exporter("vit_hybrid")
def export_timm_hybrid(model: nn.Module) -> Exported:
    """HybridVisionTransformer -> timm's hybrid ViT of the same ResNet stages (the names are the same)."""
    args = constructor_args(model)
    layers = tuple(args["backbone_layers"])
    built = (list(args["backbone_widths"]), args["backbone_stem_width"], args["backbone_groups"])
    if layers not in TIMM_HYBRIDS or built != ([256 * 2**i for i in range(len(layers))], 64, 32):
        raise VitlabError(
            f"backbone_layers={list(layers)} (widths {list(args['backbone_widths'])}, stem "
            f"{args['backbone_stem_width']}, {args['backbone_groups']} groups) cannot be expressed in timm, which "
            f"builds a hybrid's ResNet from its name: stages {' or '.join(map(str, TIMM_HYBRIDS))} at widths "
            "256, 512, ..., a 64-wide stem, 32 groups"
        )
    config = {
        "architecture": TIMM_HYBRIDS[layers],
        "model_args": timm_vit_args(model, [k for k in TIMM_VIT_ARGS if k != "patch_size"]),
        "pretrained_cfg": {
            "first_conv": "patch_embed.backbone.stem.conv",
            "classifier": "head",
            "fixed_input_size": True,
        },
    }
    return Exported(dict(model.state_dict()), config)


# --- registered variants -------------------------------------------------------------------------------------
def _add_variant(
    name: str, img: int, vit: dict[str, Any], backbone: dict[str, Any], *, in_chans: int = 3, num_classes: int = 1000
) -> None:
    kwargs = {"img_size": img, "in_chans": in_chans, "num_classes": num_classes, **vit, **backbone}
    cfg = _cfg(img, in_chans, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return HybridVisionTransformer, kwargs, cfg

    variant.__name__ = name
    variant.__doc__ = (
        f"R{2 + 3 * sum(backbone['backbone_layers'])}+ViT (D={vit['embed_dim']}, {vit['depth']} layers) at "
        f"{img}x{img}, ResNet stages {tuple(backbone['backbone_layers'])}."
    )
    register_model(variant)


_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12}
_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_R50 = {"backbone_layers": (3, 4, 9), "backbone_widths": (256, 512, 1024)}
# R50's stem and first stage only: stride 4, so 28x28 and 32x32 inputs give 7x7 and 8x8 tokens, as ViT-Ti/4
_R11 = {"backbone_layers": (3,), "backbone_widths": (256,)}

_add_variant("vit_base_r50_s16_224", 224, _BASE, _R50)
_add_variant("vit_base_r50_s16_384", 384, _BASE, _R50)
_add_variant("vit_tiny_r11_s4_28", 28, _TINY, _R11, in_chans=1, num_classes=10)
_add_variant("vit_tiny_r11_s4_32", 32, _TINY, _R11, num_classes=10)
