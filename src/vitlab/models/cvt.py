"""Convolutional vision Transformer (CvT).

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021 (arXiv:2103.15808).

CvT is a three-stage hierarchy, like a CNN. Each stage i
  1. embeds the token map of the stage before (the image for stage 1) with an overlapping strided convolution and
     LayerNorm (convolutional token embedding, section 3.1; `vitlab.layers.ConvEmbed`): 7x7 stride 4 at stage 1,
     3x3 stride 2 at stages 2 and 3, so the map shrinks 4, 8, 16 times while the width grows (64, 192, 384 in CvT-13);
  2. runs pre-norm transformer blocks whose attention projects q, k and v with a depthwise 3x3 convolution and
     BatchNorm before the linear maps (convolutional projection, section 3.2, eq. 2;
     `vitlab.layers.ConvAttention`), stride 1 for q and stride 2 for k and v:

         x_i^{q/k/v} = Flatten(Conv2d(Reshape2D(x_i), s))
         x' = MHSA(LN(x)) + x,      y = MLP(LN(x')) + x'

The class token joins only in the last stage and is classified after a final LayerNorm. There is no position
embedding at all: the convolutions encode position (the paper's "removing positional embeddings"), so the model runs
at any input size without interpolation.

Model sizes (Table 2): CvT-13 is 1 + 2 + 10 blocks, widths 64 / 192 / 384 with 1 / 3 / 6 heads (19,997,480
parameters at 1000 classes); CvT-21 is 1 + 4 + 16 blocks (31,622,696); CvT-W24 is 2 + 2 + 20 blocks, widths
192 / 768 / 1024 with 3 / 12 / 16 heads. MLP ratio 4 and q, k, v biases throughout, as the released models.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

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
)
from vitlab.errors import VitlabError
from vitlab.layers import Block, ConvAttention, ConvEmbed, low_precision_inference, trunc_normal_init, zero_init
from vitlab.models._export import refuse_options
from vitlab.models._features import take_indices
from vitlab.models._head import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    image_cfg,
    record_num_classes,
    zero_classifier,
)

PAPER = "Wu et al., CvT: Introducing Convolutions to Vision Transformers, ICCV 2021 (arXiv:2103.15808)"


class CvtStage(nn.Module):
    """Convolutional token embedding, an optional class token, then ``depth`` blocks."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        *,
        patch_size: int,
        patch_stride: int,
        patch_padding: int,
        depth: int,
        class_token: bool,
        drop_path: Sequence[float],
        pos_drop: float,
        norm_eps: float,
        kernel_size: int,
        stride_kv: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.patch_embed = ConvEmbed(
            in_chans, dim, kernel_size=patch_size, stride=patch_stride, padding=patch_padding, norm_eps=norm_eps
        )
        self.num_prefix_tokens = 1 if class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_drop = nn.Dropout(pos_drop)  # dropout on the embedded tokens; there is no position embedding
        # pre-norm blocks whose attention has convolutional projections; it is called with the grid size
        conv_attention = functools.partial(
            ConvAttention, kernel_size=kernel_size, stride_kv=stride_kv, num_prefix_tokens=self.num_prefix_tokens
        )
        self.blocks = nn.ModuleList(
            Block(dim, drop_path=drop_path[j], norm_eps=norm_eps, attn_layer=conv_attention, **block_kwargs)
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A map [B, C_in, H, W] -> tokens [B, prefix + H' W', D] and the grid size (H', W')."""
        x, grid = self.patch_embed(x)  # (B, H' W', D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + H' W', D)
        x = low_precision_inference(self.pos_drop(x))
        for block in self.blocks:
            x = block(x, grid)
        return x, grid

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens [B, prefix + H W, D] -> the map [B, D, H, W] without the prefix tokens."""
        B, _, D = x.shape
        return x[:, self.num_prefix_tokens :].transpose(1, 2).reshape(B, D, *grid)  # (B, D, H, W)


def _per_stage(value: Any, name: str, num_stages: int) -> tuple[Any, ...]:
    """A scalar for every stage, or one value per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise VitlabError(f"{name} has {len(value)} values for {num_stages} stages; give one per stage")
        return tuple(value)
    return (value,) * num_stages


@register_architecture
class ConvolutionalVisionTransformer(nn.Module):
    arch = "cvt"
    head_names = ("head",)

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg"] = "token",
        embed_dim: Sequence[int] = (64, 192, 384),
        depth: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_size: Sequence[int] = (7, 3, 3),
        patch_stride: Sequence[int] = (4, 2, 2),
        patch_padding: Sequence[int] = (2, 1, 1),
        mlp_ratio: float | Sequence[float] = 4.0,
        qkv_bias: bool | Sequence[bool] = True,
        kernel_size: int | Sequence[int] = 3,
        stride_kv: int | Sequence[int] = 2,
        class_token: bool = True,
        final_norm: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        act: str = "gelu",
    ) -> None:
        """``img_size`` is only the default input size recorded in ``default_cfg``: with no position embedding the
        model runs at any size. Per-stage arguments take one value per stage (or one for all). ``class_token``
        adds it to the last stage only; ``drop_path_rate`` grows linearly over the last stage's blocks, as the
        released training configurations set it (0, 0, 0.1)."""
        super().__init__()
        n = len(depth)
        embed_dim, num_heads = _per_stage(embed_dim, "embed_dim", n), _per_stage(num_heads, "num_heads", n)
        patch_size, patch_stride = _per_stage(patch_size, "patch_size", n), _per_stage(patch_stride, "patch_stride", n)
        patch_padding, mlp_ratio = _per_stage(patch_padding, "patch_padding", n), _per_stage(mlp_ratio, "mlp_ratio", n)
        qkv_bias, kernel_size = _per_stage(qkv_bias, "qkv_bias", n), _per_stage(kernel_size, "kernel_size", n)
        stride_kv = _per_stage(stride_kv, "stride_kv", n)
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitlabError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_features = self.embed_dim = embed_dim[-1]

        stages = []
        for i in range(n):
            last = i == n - 1
            dpr = [drop_path_rate * j / max(depth[i] - 1, 1) if last else 0.0 for j in range(depth[i])]
            stages.append(
                CvtStage(
                    in_chans if i == 0 else embed_dim[i - 1],
                    embed_dim[i],
                    patch_size=patch_size[i],
                    patch_stride=patch_stride[i],
                    patch_padding=patch_padding[i],
                    depth=depth[i],
                    class_token=class_token and last,
                    drop_path=dpr,
                    pos_drop=proj_drop_rate,
                    norm_eps=norm_eps,
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratio[i],
                    qkv_bias=qkv_bias[i],
                    kernel_size=kernel_size[i],
                    stride_kv=stride_kv[i],
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    act=act,
                )
            )
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the official code: truncated-normal(0.02) linear weights and class token, zero biases, unit norms;
        convolutions keep PyTorch's default. The classifier starts at zero (uniform predictions), as ViT's."""
        trunc_normal_init(self, norms=(nn.LayerNorm, nn.BatchNorm2d))
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
        zero_init(self.head)

    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    # --- forward --------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's tokens [B, prefix + H/16 W/16, D] (class token first), after
        the final LayerNorm."""
        for i, stage in enumerate(self.stages):
            x, grid = stage(x)
            if i < len(self.stages) - 1:
                x = stage.to_map(x, grid)  # (B, D, H, W), the next stage's input
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output maps [B, D_i, H_i, W_i] of the chosen stages (see `vitlab.models._features`); the last
        stage's class token is left out of its map. ``norm=True`` applies the final LayerNorm to the last stage's
        map, the only one of its width."""
        take = take_indices(len(self.stages), indices)
        out = []
        for i, stage in enumerate(self.stages):
            x, grid = stage(x)
            last = i == len(self.stages) - 1
            if i in take:
                out.append(stage.to_map(self.norm(x) if norm and last else x, grid))
            if intermediates_only and i == take[-1]:
                return out  # the stages after the last one asked for need not run
            if not last:
                x = stage.to_map(x, grid)
        return self.norm(x), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool == "token" and not self.num_prefix_tokens:
                raise VitlabError("global_pool='token' needs a class token; this model has none")
            self.global_pool = global_pool
        self.head = zero_classifier(
            self.num_features, num_classes, device=self.stages[-1].patch_embed.proj.weight.device
        )
        record_num_classes(self, num_classes)


# --- checkpoint converter: HF transformers names -> ours --------------------------------------------------------
# HF's per-layer module paths under ``encoder.stages.i.layers.j.`` -> ours under ``stages.i.blocks.j.``
HF_CVT_LAYER_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.projection_query": "attn.proj_q",
    "attention.attention.projection_key": "attn.proj_k",
    "attention.attention.projection_value": "attn.proj_v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
for _hf, _ours in (("query", "q"), ("key", "k"), ("value", "v")):
    _conv = f"attention.attention.convolution_projection_{_hf}.convolution_projection"
    HF_CVT_LAYER_NAMES[f"{_conv}.convolution"] = f"attn.conv_proj_{_ours}.conv"
    HF_CVT_LAYER_NAMES[f"{_conv}.normalization"] = f"attn.conv_proj_{_ours}.bn"
HF_CVT_EMBED_NAMES = {
    "embedding.convolution_embeddings.projection": "patch_embed.proj",
    "embedding.convolution_embeddings.normalization": "patch_embed.norm",
}


def convert_hf_cvt_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF ``CvtModel`` / ``CvtForImageClassification`` names to vitlab's, BatchNorm running statistics (and
    ``num_batches_tracked``) included."""
    out: dict[str, torch.Tensor] = {}
    for key, v in raw.items():
        k = key.removeprefix("cvt.").removeprefix("encoder.")
        if k.startswith(("layernorm.", "classifier.")):
            out[k.replace("layernorm.", "norm.", 1).replace("classifier.", "head.", 1)] = v
            continue
        parts = k.split(".")  # stages.i.(cls_token | embedding... | layers.j....)
        if len(parts) < 3 or parts[0] != "stages":
            raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
        stage, rest = f"stages.{parts[1]}", ".".join(parts[2:])
        if rest == "cls_token":
            out[f"{stage}.cls_token"] = v
            continue
        mod, leaf = rest.rsplit(".", 1)
        if mod in HF_CVT_EMBED_NAMES:
            out[f"{stage}.{HF_CVT_EMBED_NAMES[mod]}.{leaf}"] = v
            continue
        if parts[2] == "layers":
            mod = ".".join(parts[4:-1])
            if mod in HF_CVT_LAYER_NAMES:
                out[f"{stage}.blocks.{parts[3]}.{HF_CVT_LAYER_NAMES[mod]}.{leaf}"] = v
                continue
        raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
    return out


def _hf_uniform(config: dict[str, Any], key: str, default: Sequence[Any], want: Any = None) -> Any:
    """A HF per-stage setting that vitlab keeps the same in every stage (or equal to ``want``)."""
    values = list(config.get(key, default))
    if len(set(values)) != 1 or (want is not None and values[0] != want):
        raise VitlabError(f"CvT config {key}={values} is not supported; vitlab expects {want or values[0]} per stage")
    return values[0]


@register_hf_converter("cvt")
def convert_hf_cvt(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``CvtModel`` / ``CvtForImageClassification`` directory -> ConvolutionalVisionTransformer arguments and
    state. HF's LayerNorms use PyTorch's default eps (1e-5) whatever ``layer_norm_eps`` says."""
    state = convert_hf_cvt_state(raw)
    depth = list(config.get("depth", (1, 2, 10)))
    cls = list(config.get("cls_token", (False, False, True)))
    if any(cls[:-1]):
        raise VitlabError(f"CvT config cls_token={cls} is not supported; only the last stage may have a class token")
    _hf_uniform(config, "qkv_projection_method", ["dw_bn"] * len(depth), "dw_bn")
    _hf_uniform(config, "stride_q", [1] * len(depth), 1)
    kernel = list(config.get("kernel_qkv", (3, 3, 3)))
    for key in ("padding_q", "padding_kv"):
        if list(config.get(key, (1, 1, 1))) != [k // 2 for k in kernel]:
            raise VitlabError(f"CvT config {key} must be kernel_qkv // 2 (same padding) for vitlab")
    kwargs = {
        "in_chans": config.get("num_channels", 3),
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "global_pool": "token" if cls[-1] else "avg",
        "embed_dim": list(config.get("embed_dim", (64, 192, 384))),
        "depth": depth,
        "num_heads": list(config.get("num_heads", (1, 3, 6))),
        "patch_size": list(config.get("patch_sizes", (7, 3, 3))),
        "patch_stride": list(config.get("patch_stride", (4, 2, 2))),
        "patch_padding": list(config.get("patch_padding", (2, 1, 1))),
        "mlp_ratio": list(config.get("mlp_ratio", (4.0, 4.0, 4.0))),
        "qkv_bias": list(config.get("qkv_bias", (True, True, True))),
        "kernel_size": kernel,
        "stride_kv": list(config.get("stride_kv", (2, 2, 2))),
        "class_token": bool(cls[-1]),
        "final_norm": "norm.weight" in state,
        "norm_eps": 1e-5,
    }
    return Converted("cvt", state, kwargs, _cfg(224, kwargs["in_chans"]))


# --- checkpoint exporter: ours -> HF transformers names ---------------------------------------------------------
HF_CVT_EXPORT_LAYER = {ours: hf for hf, ours in HF_CVT_LAYER_NAMES.items()}
HF_CVT_EXPORT_EMBED = {ours: hf for hf, ours in HF_CVT_EMBED_NAMES.items()}
# options HF's CvT builds one way: a final LayerNorm, eps 1e-5 (its norms ignore layer_norm_eps), GELU, and a class
# token, which it classifies (transformers 5.24's CvtForImageClassification fails without one: it reads outputs[1])
HF_CVT_FIXED = {"final_norm": True, "norm_eps": 1e-5, "act": "gelu", "class_token": True, "global_pool": "token"}


def export_hf_cvt_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CvT names -> HF's (the inverse of `convert_hf_cvt_state`), BatchNorm statistics included."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(("norm.", "head.")):  # HF's final LayerNorm and classifier sit outside ``cvt.``
            out[k.replace("norm.", "layernorm.", 1).replace("head.", "classifier.", 1)] = v
            continue
        parts = k.split(".")  # stages.i.(cls_token | patch_embed.* | blocks.j.*)
        stage, rest = f"cvt.encoder.stages.{parts[1]}", ".".join(parts[2:])
        mod, _, leaf = rest.rpartition(".")
        if rest == "cls_token":
            out[f"{stage}.cls_token"] = v
        elif mod in HF_CVT_EXPORT_EMBED:
            out[f"{stage}.{HF_CVT_EXPORT_EMBED[mod]}.{leaf}"] = v
        elif parts[2] == "blocks" and ".".join(parts[4:-1]) in HF_CVT_EXPORT_LAYER:
            out[f"{stage}.layers.{parts[3]}.{HF_CVT_EXPORT_LAYER['.'.join(parts[4:-1])]}.{leaf}"] = v
        else:
            raise VitlabError(f"parameter {k!r} has no HF CvT counterpart")
    return out


@register_hf_exporter("cvt")
def export_hf_cvt(model: nn.Module) -> Exported:
    """ConvolutionalVisionTransformer -> HF ``CvtForImageClassification``, which classifies the LayerNormed class
    token of the last stage."""
    args = constructor_args(model)
    refuse_options(args, HF_CVT_FIXED, "HF transformers' CvT")
    n = len(args["depth"])
    depth = list(args["depth"])
    if any(d <= i for i, d in enumerate(depth)):
        # transformers' CvtStage indexes its stochastic-depth rates, one per block, by the stage number
        raise VitlabError(
            f"depth={depth} cannot be loaded by HF transformers' CvT, which needs more than i blocks in stage i"
        )
    kernel = list(_per_stage(args["kernel_size"], "kernel_size", n))
    config = {
        "model_type": "cvt",
        "architectures": ["CvtForImageClassification"],
        "num_channels": args["in_chans"],
        "patch_sizes": list(_per_stage(args["patch_size"], "patch_size", n)),
        "patch_stride": list(_per_stage(args["patch_stride"], "patch_stride", n)),
        "patch_padding": list(_per_stage(args["patch_padding"], "patch_padding", n)),
        "embed_dim": list(args["embed_dim"]),
        "num_heads": list(args["num_heads"]),
        "depth": depth,
        "mlp_ratio": [float(r) for r in _per_stage(args["mlp_ratio"], "mlp_ratio", n)],
        "qkv_bias": list(_per_stage(args["qkv_bias"], "qkv_bias", n)),
        "cls_token": [False] * (n - 1) + [True],
        "qkv_projection_method": ["dw_bn"] * n,
        "kernel_qkv": kernel,
        "padding_kv": [k // 2 for k in kernel],
        "stride_kv": list(_per_stage(args["stride_kv"], "stride_kv", n)),
        "padding_q": [k // 2 for k in kernel],
        "stride_q": [1] * n,
        "drop_rate": [args["proj_drop_rate"]] * n,
        "attention_drop_rate": [args["attn_drop_rate"]] * n,
        "drop_path_rate": [0.0] * (n - 1) + [args["drop_path_rate"]],
        "layer_norm_eps": 1e-5,
    }
    return Exported(export_hf_cvt_state(model.state_dict()), to_jsonable(config))


# --- registered variants -------------------------------------------------------------------------------------
def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    mean, std = (IMAGENET_DEFAULT_MEAN[:in_chans], IMAGENET_DEFAULT_STD[:in_chans]) if in_chans <= 3 else (None, None)
    return image_cfg(img_size, in_chans, paper=PAPER, mean=mean, std=std, **extra)


# name -> (embed_dim, depth, num_heads) per stage (Table 2)
_SIZES = {
    "13": ((64, 192, 384), (1, 2, 10), (1, 3, 6)),
    "21": ((64, 192, 384), (1, 4, 16), (1, 3, 6)),
    "w24": ((192, 768, 1024), (2, 2, 20), (3, 12, 16)),
    # small inputs: CvT-13's 64-wide heads on half its widths, 1 + 2 + 4 blocks
    "7": ((64, 128, 192), (1, 2, 4), (1, 2, 3)),
}


def _add_variant(size: str, img: int, in_chans: int = 3, num_classes: int = 1000, **extra: Any) -> None:
    dims, depth, heads = _SIZES[size]
    name = f"cvt_{size}_{img}"
    kwargs = {
        "img_size": img,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "embed_dim": dims,
        "depth": depth,
        "num_heads": heads,
        **extra,
    }
    cfg = _cfg(img, in_chans, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return ConvolutionalVisionTransformer, kwargs, cfg

    variant.__name__ = name
    variant.__doc__ = f"CvT-{size.upper()} at {img}x{img}: widths {dims}, blocks {depth}, heads {heads}."
    register_model(variant)


for _size in ("13", "21"):
    _add_variant(_size, 224)
    _add_variant(_size, 384)
_add_variant("w24", 384)
# Small inputs for CPU training: 28x28 grayscale and 32x32 RGB, 10 classes. A 3x3 stride-2 embedding at every stage
# (total stride 8) keeps a 4x4 map at the last stage where CvT-13's stride 16 would leave 2x2.
_SMALL = {"patch_size": (3, 3, 3), "patch_stride": (2, 2, 2), "patch_padding": (1, 1, 1)}
_add_variant("7", 28, in_chans=1, num_classes=10, **_SMALL)
_add_variant("7", 32, in_chans=3, num_classes=10, **_SMALL)
