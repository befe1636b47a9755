"""ConvNeXt.

Liu, Mao, Wu, Feichtenhofer, Darrell and Xie, "A ConvNet for the 2020s", CVPR 2022 (arXiv:2201.03545).

A ResNet modernised step by step towards a Swin Transformer (section 2, Fig. 2):

* "patchify" stem (section 2.2): a 4x4 stride-4 convolution (non-overlapping patches, as a ViT patch embedding)
  + LayerNorm;
* stages of blocks (Fig. 4), each on a map x [B, C, H, W]:

      y = x + DropPath( gamma * Linear_{4C->C}( GELU( Linear_{C->4C}( LN( DWConv7x7(x) ) ) ) ) )

  a depthwise convolution mixes space (section 2.3) with a 7x7 kernel (2.5, Swin's window size), one LayerNorm
  over channels (2.6), an inverted bottleneck 4x wide (2.4) with a single GELU (2.6), a LayerScale gamma
  initialised to 1e-6 (Touvron et al., 2021) and stochastic depth;
* separate downsampling layers between stages: LayerNorm + 2x2 stride-2 convolution (section 2.6);
* global average pooling, a final LayerNorm and the linear classifier.

The 1x1 convolutions of the inverted bottleneck are linear maps over channels: the block permutes the map to
channels-last (B, H, W, C) once and uses the shared `Mlp` and `nn.LayerNorm` there, as the official code. timm's
``conv_mlp`` variants (atto ... nano) hold the same numbers in 1x1-convolution shape; their converter reshapes.

Variants: Tiny / Small / Base are the paper's (section 3: channels C and blocks B per stage); atto, femto, pico
and nano are timm's smaller ones. ``convnext_atto_28`` / ``convnext_atto_32`` take 28x28 grayscale or 32x32 RGB
images with a 1x1 "stem" (patch size 1): the three downsamplings then leave a 3x3 (28) or 4x4 (32) map for the
last stage, where a 4x4 stem would leave 1x1 and reduce the 7x7 depthwise convolution to its centre tap. The
stage resolutions at 28 (28, 14, 7, 3) mirror ImageNet's at 224 (56, 28, 14, 7).

Parameter names are timm's (``stem.0``, ``stages.1.downsample.1``, ``stages.0.blocks.0.conv_dw``, ``head.norm``,
``head.fc``) except LayerScale's, the shared module ``ls.gamma`` where timm has ``gamma``.

Channels-last: with ``model.to(memory_format=torch.channels_last)`` and channels-last inputs the block's permute
to (B, H, W, C) yields a contiguous tensor, so LayerNorm and the linear maps copy nothing, and the layout holds to
the last map (tested).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitlab._io import to_jsonable
from vitlab._registry import (
    Converted,
    Exported,
    constructor_args,
    register_architecture,
    register_hf_converter,
    register_hf_exporter,
    register_model,
    register_timm_converter,
    register_timm_exporter,
)
from vitlab.errors import VitlabError
from vitlab.layers import DropPath, LayerNorm2d, LayerScale, Mlp, drop_path_rates, get_act_layer, trunc_normal_init
from vitlab.models._export import refuse_options
from vitlab.models._features import stage_intermediates
from vitlab.models._head import imagenet_cfg, record_num_classes, zero_classifier
from vitlab.models.vit import hf_act, hf_hidden_act

PAPER = "Liu et al., A ConvNet for the 2020s, CVPR 2022 (arXiv:2201.03545)"


class ConvNeXtBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(mlp_ratio * dim), act_layer=get_act_layer(act))
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C): LN and the 1x1 convolutions act on channels
        x = self.ls(self.mlp(self.norm(x))).permute(0, 3, 1, 2)  # (B, C, H, W)
        return shortcut + self.drop_path(x)


class NormHead(nn.Module):
    """Global average pooling -> LayerNorm -> dropout -> linear classifier (timm's ``head.norm``, ``head.fc``)."""

    def __init__(self, dim: int, num_classes: int, *, eps: float = 1e-6, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(drop_rate)
        self.fc = zero_classifier(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(x.mean(dim=(2, 3))))  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(x)


@register_architecture
class ConvNeXt(nn.Module):
    arch = "convnext"
    head_names = ("head.fc",)  # the classifier; the head's LayerNorm belongs to the backbone and is kept

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        patch_size: int = 4,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        head_norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise VitlabError(f"depths {list(depths)} and dims {list(dims)} must name the same stages")
        self.num_classes = num_classes
        self.stem = nn.Sequential(  # patchify: non-overlapping patch_size x patch_size patches, then LN
            nn.Conv2d(in_chans, dims[0], patch_size, stride=patch_size), LayerNorm2d(dims[0], eps=norm_eps)
        )
        n = sum(depths)
        dpr = drop_path_rates(drop_path_rate, n)
        stages, k = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i == 0:
                downsample: nn.Module = nn.Identity()  # the stem already brought the map to dims[0]
            else:
                downsample = nn.Sequential(LayerNorm2d(dims[i - 1], eps=norm_eps), nn.Conv2d(dims[i - 1], dim, 2, 2))
            blocks = [
                ConvNeXtBlock(
                    dim,
                    kernel_size=kernel_size,
                    mlp_ratio=mlp_ratio,
                    ls_init_value=ls_init_value,
                    drop_path=dpr[k + j],
                    norm_eps=norm_eps,
                    act=act,
                )
                for j in range(depth)
            ]
            k += depth
            stages.append(nn.Sequential(OrderedDict(downsample=downsample, blocks=nn.Sequential(*blocks))))
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.head = NormHead(self.num_features, num_classes, eps=head_norm_eps, drop_rate=drop_rate)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) weights and zero biases for convolutions and linear maps (the official code),
        unit LayerNorms; the classifier stays zero (`zero_classifier`)."""
        trunc_normal_init(self, types=(nn.Conv2d, nn.Linear), skip=self.head.fc)

    # --- forward --------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's map [B, dims[-1], H / (patch_size * 8), W / (patch_size * 8)]."""
        return self.stages(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output maps [B, C, H, W] of the chosen stages (see `vitlab.models._features`; ``norm`` has nothing
        to apply: the final LayerNorm acts on the pooled vector)."""
        return stage_intermediates(self.stem(x), self.stages, indices, intermediates_only)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head.fc = zero_classifier(self.num_features, num_classes, device=self.head.norm.weight.device)
        record_num_classes(self, num_classes)


# --- checkpoint converters: HF transformers and timm names -> ours ---------------------------------------------
_HF_NAMES = [  # (pattern, replacement) on HF names without the "convnext." prefix
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.ls.gamma"),
    (r"^layernorm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
]


def convert_hf_convnext_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ConvNextModel`` / ``ConvNextForImageClassification`` names -> ours."""
    out = {}
    for key, v in raw.items():
        k = key.removeprefix("convnext.")
        for pattern, repl in _HF_NAMES:
            new, hits = re.subn(pattern, repl, k)
            if hits:
                out[new] = v
                break
        else:
            raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
    return out


@register_hf_converter("convnext")
def convert_hf_convnext(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``ConvNextForImageClassification`` directory -> ConvNeXt arguments and state. HF's final LayerNorm
    takes ``layer_norm_eps`` (1e-12 in the published facebook/convnext-* configs); its other norms use 1e-6."""
    state = convert_hf_convnext_state(raw)
    ls = config.get("layer_scale_init_value", 1e-6)
    patch = config.get("patch_size", 4)
    kwargs = {
        "in_chans": config.get("num_channels", 3),
        "num_classes": state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0,
        "depths": list(config.get("depths", [3, 3, 9, 3])),
        "dims": list(config.get("hidden_sizes", [96, 192, 384, 768])),
        "patch_size": patch[0] if isinstance(patch, (list, tuple)) else patch,
        "ls_init_value": ls if ls > 0 else None,
        "act": hf_act(config),
        "head_norm_eps": config.get("layer_norm_eps", 1e-12),
        "drop_path_rate": config.get("drop_path_rate", 0.0),
    }
    img = config.get("image_size", 224)
    return Converted("convnext", state, kwargs, _cfg(img if isinstance(img, int) else img[0], kwargs["in_chans"]))


def _is_timm_convnext(state: dict[str, torch.Tensor]) -> bool:
    return "stem.0.weight" in state and "stages.0.blocks.0.conv_dw.weight" in state


@register_timm_converter(_is_timm_convnext)
def convert_timm_convnext(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm ConvNeXt state dict -> ours: ``gamma`` -> ``ls.gamma``; 1x1-convolution MLP weights of the conv_mlp
    variants (atto ... nano) -> linear weights."""
    for key, what in (
        ("stem.2.weight", "overlapping stems"),
        ("norm_pre.weight", "head_norm_first"),
        ("head.pre_logits.fc.weight", "an MLP head"),
        ("stages.0.blocks.0.mlp.grn.weight", "ConvNeXt-V2 (GRN)"),
    ):
        if key in state:
            raise VitlabError(f"timm ConvNeXt with {what} (parameter {key!r}) is not supported by vitlab yet")
    out = {}
    for k, v in state.items():
        if re.fullmatch(r"stages\.\d+\.blocks\.\d+\.gamma", k):
            k = k.removesuffix("gamma") + "ls.gamma"
        elif re.fullmatch(r"stages\.\d+\.blocks\.\d+\.mlp\.fc\d\.weight", k) and v.ndim == 4:
            v = v.flatten(1)  # (out, in, 1, 1) -> (out, in)
        out[k] = v
    kwargs = infer_convnext_args(out)
    return Converted("convnext", out, kwargs, _cfg(224, kwargs["in_chans"]))


def infer_convnext_args(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ConvNeXt arguments from a state dict under our names, read off the tensor shapes."""
    found = (re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k) for k in state)
    blocks = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    num_stages = 1 + max(s for s, _ in blocks)
    depths = [1 + max(b for s, b in blocks if s == i) for i in range(num_stages)]
    dims = [state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(num_stages)]
    stem = state["stem.0.weight"]  # (dims[0], C, P, P)
    return {
        "in_chans": stem.shape[1],
        "num_classes": state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0,
        "depths": depths,
        "dims": dims,
        "patch_size": stem.shape[-1],
        "kernel_size": state["stages.0.blocks.0.conv_dw.weight"].shape[-1],
        "mlp_ratio": state["stages.0.blocks.0.mlp.fc1.weight"].shape[0] / dims[0],
        "ls_init_value": 1e-6 if "stages.0.blocks.0.ls.gamma" in state else None,
    }


# --- checkpoint exporters: ours -> HF transformers and timm names ----------------------------------------------
_HF_EXPORT_NAMES = [  # (pattern, replacement) on our names: the inverse of _HF_NAMES
    (r"^stem\.0\.", "convnext.embeddings.patch_embeddings."),
    (r"^stem\.1\.", "convnext.embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"convnext.encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"convnext.encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"convnext.encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"convnext.encoder.stages.\1.layers.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ls\.gamma$", r"convnext.encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "convnext.layernorm."),
    (r"^head\.fc\.", "classifier."),
]
# options HF's and timm's ConvNeXt build one way: a 7x7 depthwise kernel (HF), an MLP 4x wide, block norms at 1e-6
HF_CONVNEXT_FIXED = {"kernel_size": 7, "mlp_ratio": 4.0, "norm_eps": 1e-6}
TIMM_CONVNEXT_FIXED = {"mlp_ratio": 4.0, "norm_eps": 1e-6, "head_norm_eps": 1e-6}


def _rename(k: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, hits = re.subn(pattern, repl, k)
        if hits:
            return new
    raise VitlabError(f"parameter {k!r} has no HF ConvNeXt counterpart")


@register_hf_exporter("convnext")
def export_hf_convnext(model: nn.Module) -> Exported:
    """ConvNeXt -> HF ``ConvNextForImageClassification``; its final LayerNorm takes ``layer_norm_eps``."""
    args = constructor_args(model)
    refuse_options(args, HF_CONVNEXT_FIXED, "HF transformers' ConvNeXt")
    ls = args["ls_init_value"]
    config = {
        "model_type": "convnext",
        "architectures": ["ConvNextForImageClassification"],
        "num_channels": args["in_chans"],
        "patch_size": args["patch_size"],
        "num_stages": len(args["depths"]),
        "hidden_sizes": list(args["dims"]),
        "depths": list(args["depths"]),
        "hidden_act": hf_hidden_act(args["act"]),
        "layer_scale_init_value": ls if ls else 0.0,  # 0: no LayerScale parameter
        "layer_norm_eps": args["head_norm_eps"],
        "drop_path_rate": args["drop_path_rate"],
        "image_size": model.default_cfg["input_size"][1],
    }
    state = {_rename(k, _HF_EXPORT_NAMES): v for k, v in model.state_dict().items()}
    return Exported(state, to_jsonable(config))


@register_timm_exporter("convnext")
def export_timm_convnext(model: nn.Module) -> Exported:
    """ConvNeXt -> timm's ConvNeXt with linear MLP layers (``conv_mlp=False``, convnext_tiny's): our names but
    LayerScale's, which timm keeps on the block as ``gamma``."""
    args = constructor_args(model)
    refuse_options(args, TIMM_CONVNEXT_FIXED, "timm's ConvNeXt")
    state = {re.sub(r"\.ls\.gamma$", ".gamma", k): v for k, v in model.state_dict().items()}
    model_args = {
        "in_chans": args["in_chans"],
        "num_classes": model.num_classes,
        "depths": list(args["depths"]),
        "dims": list(args["dims"]),
        "patch_size": args["patch_size"],
        "kernel_sizes": args["kernel_size"],
        "ls_init_value": args["ls_init_value"],
        **({"act_layer": args["act"]} if args["act"] != "gelu" else {}),
    }
    config = {
        "architecture": "convnext_tiny",
        "model_args": to_jsonable(model_args),
        "pretrained_cfg": {"first_conv": "stem.0", "classifier": "head.fc"},
    }
    return Exported(state, config)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (depths, dims)
_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    return imagenet_cfg(img_size, in_chans, PAPER, **extra)


def _add_variant(size: str, img: int = 224, in_chans: int = 3, num_classes: int = 1000, patch: int = 4) -> None:
    depths, dims = _SIZES[size]
    name = f"convnext_{size}" + (f"_{img}" if img != 224 else "")
    kwargs = {"in_chans": in_chans, "num_classes": num_classes, "depths": depths, "dims": dims, "patch_size": patch}
    cfg = _cfg(img, in_chans, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return ConvNeXt, kwargs, cfg

    variant.__name__ = name
    variant.__doc__ = f"ConvNeXt-{size}: depths {list(depths)}, dims {list(dims)}, {patch}x{patch} stem, {img}x{img}."
    register_model(variant)


for _size in _SIZES:
    _add_variant(_size)
# Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
_add_variant("atto", 28, in_chans=1, num_classes=10, patch=1)
_add_variant("atto", 32, in_chans=3, num_classes=10, patch=1)
