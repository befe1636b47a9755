"""Swin Transformer.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021 (arXiv:2103.14030).

Structure (section 3.1, Figure 3): patch partition into 4 x 4 patches and a linear embedding to C channels (with a
LayerNorm, the code's ``patch_norm``), then four stages of Swin Transformer blocks at strides 4, 8, 16, 32. Between
stages, patch merging concatenates each 2 x 2 group of neighbouring tokens (4C), normalises and maps them to 2C.
Blocks come in pairs (eq. 3):

    z^_l   = W-MSA(LN(z_{l-1})) + z_{l-1}
    z_l    = MLP(LN(z^_l)) + z^_l
    z^_l+1 = SW-MSA(LN(z_l)) + z_l
    z_l+1  = MLP(LN(z^_l+1)) + z^_l+1

W-MSA is self-attention inside non-overlapping M x M windows with a relative position bias (eq. 4); SW-MSA is the
same after a cyclic shift of floor(M/2) tokens, with a mask that keeps tokens from attending across the image border
the shift wrapped round (see `vitlab.layers.window`). The classifier is global average pooling of the final,
LayerNorm-ed map and a linear layer. Sizes (section 3.3): Swin-T C=96, depths (2, 2, 6, 2); Swin-S C=96,
(2, 2, 18, 2); Swin-B C=128, (2, 2, 18, 2); Swin-L C=192; heads C/32 in the first stage, doubling with C; M=7.

Any input size works (as in HF and the official detection code): the image is padded with zeros to a patch
multiple, each block pads its map to a window multiple before the shift, and merging pads an odd side. A map side
no longer than the window is covered by one window clamped to it, and then no block of the stage shifts (the
official code's rule: with min(H, W) <= M it sets the shift to 0 and the window to min(H, W)). Where the official
code clamps both sides to min(H, W) we clamp each side to itself; the two agree for square maps and whenever
min(H, W) >= M. A clamped window reads the entries of its own offsets from the M x M bias table. The masks are built
for the actual size on every forward, so nothing ties the model to one resolution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
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
from vitlab.layers import (
    Block,
    PatchEmbed,
    WindowAttention,
    drop_path_rates,
    low_precision_inference,
    shifted_window_mask,
    to_2tuple,
    trunc_normal_init,
    zero_init,
)
from vitlab.models._export import export_hf_block, refuse_options
from vitlab.models._features import take_indices
from vitlab.models._head import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    image_cfg,
    record_num_classes,
    zero_classifier,
)
from vitlab.models.vit import HF_LAYER_NAMES, HF_QKV_NAMES, hf_act, hf_hidden_act

PAPER = (
    "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, ICCV 2021 (arXiv:2103.14030)"
)


def window_and_shift(size: tuple[int, int], window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and the shift of the SW-MSA blocks for a stage whose map is ``size`` (see the module docstring)."""
    H, W = size
    win = (min(window, H), min(window, W))
    shift = (0, 0) if min(H, W) <= window else (window // 2, window // 2)
    return win, shift


class PatchMerging(nn.Module):
    """Concatenate each 2 x 2 group of tokens (4C), LayerNorm, linear 4C -> 2C without bias (section 3.1)."""

    def __init__(self, dim: int, out_dim: int | None = None, *, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # an odd side gets a zero row / column
        H, W = x.shape[1], x.shape[2]
        # channel order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets: the official code's x0, x1, x2, x3
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging (all stages but the first, as timm) and one block per ``drop_path`` rate, alternating W-MSA and
    SW-MSA."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        *,
        window_size: int,
        downsample: bool,
        drop_path: Sequence[float],
        norm_eps: float = 1e-5,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.downsample = PatchMerging(dim, out_dim, norm_eps=norm_eps) if downsample else nn.Identity()
        # pre-norm blocks (eq. 3) over the map [B, H, W, C]; the odd ones shift their windows (SW-MSA)
        attention = partial(WindowAttention, window_size=window_size)
        self.blocks = nn.ModuleList(
            Block(out_dim, drop_path=p, norm_eps=norm_eps, attn_layer=attention, **block_kwargs) for p in drop_path
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C)
        _, H, W, _ = x.shape
        window, shift = window_and_shift((H, W), self.window_size)
        mask = None
        if any(shift) and len(self.blocks) > 1:  # one mask for the stage's SW-MSA blocks, for this size
            padded = (math.ceil(H / window[0]) * window[0], math.ceil(W / window[1]) * window[1])
            mask = shifted_window_mask(padded, window, shift, device=x.device)  # (nW, N, N)
        for i, block in enumerate(self.blocks):
            x = block(x, window, shift, mask) if i % 2 else block(x, window)
        return x


@register_architecture
class SwinTransformer(nn.Module):
    arch = "swin"
    head_names = ("head",)  # the classifier: replaced, not loaded, when a checkpoint has other classes

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        windows = [window_size] * len(depths) if isinstance(window_size, int) else list(window_size)
        if not len(depths) == len(num_heads) == len(windows):
            raise VitlabError(
                f"depths {depths}, num_heads {num_heads} and window_size {window_size} need one entry per stage"
            )
        self.num_classes = num_classes
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]

        # Only default_cfg depends on img_size: PatchEmbed checks it against the patch, and the model pads any input.
        patch = to_2tuple(patch_size)
        img = tuple(math.ceil(s / p) * p for s, p in zip(to_2tuple(img_size), patch))
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_embed = PatchEmbed(
            img, patch, in_chans, embed_dim, flatten=False, strict_img_size=False, norm_layer=norm
        )
        # stochastic depth grows linearly over all blocks of all stages (section 4.1)
        total = sum(depths)
        dpr = drop_path_rates(drop_path_rate, total)
        self.layers = nn.Sequential(
            *[
                SwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    num_heads=num_heads[i],
                    window_size=windows[i],
                    downsample=i > 0,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_eps=norm_eps,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    act=act,
                )
                for i in range(len(depths))
            ]
        )
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) linear maps and bias tables, zero biases, unit LayerNorms (the official code;
        the patch-embedding convolution keeps PyTorch's default, as there); zero classifier, as vitlab's ViT."""

        def bias_table(m: nn.Module) -> None:
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

        trunc_normal_init(self, other=bias_table)
        zero_init(self.head)

    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables, as the official code and timm."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    # --- forward --------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised patch embeddings [B, H/P, W/P, D], zero-padding to a patch multiple."""
        H, W = x.shape[-2:]
        ph, pw = self.patch_embed.patch_size
        x = F.pad(x, (0, -W % pw, 0, -H % ph))
        return low_precision_inference(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's map after the final LayerNorm [B, C', H/32, W/32] (patch 4)."""
        x = self.layers(self._embed(x))
        return self.norm(x).permute(0, 3, 1, 2)  # (B, C', H', W')

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output maps [B, C, H, W] of the chosen stages (see `vitlab.models._features`); ``norm`` applies the
        final LayerNorm to the last stage's map, the only one of its width (as timm)."""
        take = take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        x = self._embed(x)
        out = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in take:
                out.append((self.norm(x) if norm and i == last else x).permute(0, 3, 1, 2))  # (B, C, H, W)
            if intermediates_only and i == take[-1]:
                return out  # the stages after the last one asked for need not run
        return self.norm(x).permute(0, 3, 1, 2), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pooling
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise VitlabError(f"Swin pools by averaging; global_pool={global_pool!r} is not supported")
        self.head = zero_classifier(self.num_features, num_classes, device=self.norm.weight.device)
        record_num_classes(self, num_classes)


# --- checkpoint converters: HF transformers and timm names -> ours ---------------------------------------------
# HF Swin's attention names: "attention.self.*" in saved files, "attention.*_proj" in transformers 5's modules
# (shared with ViT's tables); the bias table moved under "relative_position_bias" in transformers 5.
HF_SWIN_QKV_NAMES = {
    **HF_QKV_NAMES,
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
}
HF_SWIN_TABLES = (
    "attention.self.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table",
)


@register_hf_converter("swin")
def convert_hf_swin(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``SwinModel`` / ``SwinForImageClassification`` directory -> SwinTransformer arguments and state."""
    if config.get("use_absolute_embeddings"):
        raise VitlabError("Swin with absolute position embeddings (use_absolute_embeddings) is not supported")
    if config.get("layer_norm_eps", 1e-5) != 1e-5:
        # HF applies it to the blocks and the final norm but not to the embedding and merging norms
        raise VitlabError(f"Swin with layer_norm_eps={config['layer_norm_eps']} is not supported (only 1e-5)")
    state = convert_hf_swin_state(raw)
    img = config.get("image_size", 224)
    patch = config.get("patch_size", 4)
    kwargs = {
        "img_size": list(img) if isinstance(img, (list, tuple)) else img,
        "patch_size": list(patch) if isinstance(patch, (list, tuple)) else patch,
        "in_chans": config.get("num_channels", 3),
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "embed_dim": config.get("embed_dim", 96),
        "depths": list(config.get("depths", (2, 2, 6, 2))),
        "num_heads": list(config.get("num_heads", (3, 6, 12, 24))),
        "window_size": config.get("window_size", 7),
        "mlp_ratio": config.get("mlp_ratio", 4.0),
        "qkv_bias": config.get("qkv_bias", True),
        "act": hf_act(config),
        "drop_path_rate": config.get("drop_path_rate", 0.1),
        "proj_drop_rate": config.get("hidden_dropout_prob", 0.0),
        "attn_drop_rate": config.get("attention_probs_dropout_prob", 0.0),
    }
    h, w = to_2tuple(img)
    return Converted("swin", state, kwargs, _cfg((h, w), kwargs["in_chans"]))


def convert_hf_swin_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF Swin parameter names to vitlab's (= timm's). HF merges patches at the end of stage i, we (and timm)
    at the start of stage i + 1; HF's separate query / key / value are concatenated into ``qkv``."""
    simple = {
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "embeddings.norm": "patch_embed.norm",
        "layernorm": "norm",
        "classifier": "head",
    }
    block_re = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
    merge_re = re.compile(r"encoder\.layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in raw.items():
        k = key.removeprefix("swin.")
        mod, _, kind = k.rpartition(".")
        if k.endswith("relative_position_index") or k == "embeddings.mask_token":
            continue  # a buffer older files saved; the mask token only serves masked image modelling
        if mod in simple:
            out[f"{simple[mod]}.{kind}"] = v
        elif m := merge_re.match(k):
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}"] = v
        elif m := block_re.match(k):
            prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}", m.group(3)
            name, _, kind = rest.rpartition(".")
            if rest in HF_SWIN_TABLES:
                out[f"{prefix}.attn.relative_position_bias_table"] = v
            elif name in HF_SWIN_QKV_NAMES:
                qkv.setdefault((prefix, kind), {})[HF_SWIN_QKV_NAMES[name]] = v
            elif name in HF_LAYER_NAMES:
                out[f"{prefix}.{HF_LAYER_NAMES[name]}.{kind}"] = v
            else:
                raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
        else:
            raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _is_timm_swin(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and "layers.0.blocks.0.attn.relative_position_bias_table" in state


@register_timm_converter(_is_timm_swin)
def convert_timm_swin(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm's Swin names are vitlab's, up to three things: the classifier (timm's ``head.fc``), the buffers older
    files saved (``relative_position_index``, ``attn_mask``), and where patch merging sits: at the end of stage i
    in timm before 0.9 and in the official checkpoints (which share those names), at the start of stage i + 1 now.

    The window size is read off the relative position tables. The image size is not in the weights (they run at
    any size); it comes from ``declared``, or from the shifted-window masks that older files saved (their window
    count is the map's), and is otherwise left for the caller to name, never taken to be 224."""
    old_layout = any(k.startswith("layers.0.downsample.") for k in state)
    out = {}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if old_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k.replace("head.fc.", "head.", 1) if k.startswith("head.fc.") else k] = v
    kwargs = infer_swin_args(out)
    img = declared.get("img_size") or swin_img_size_from_masks(state, kwargs)
    if img is not None:
        kwargs["img_size"] = img
    cfg = _cfg(img or 224, kwargs["in_chans"])
    return Converted("swin", out, kwargs, cfg, unknown=() if img is not None else ("img_size",))


def swin_img_size_from_masks(state: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> list[int] | None:
    """The image size that the first saved shifted-window mask was built for: stage i's mask is
    ``[windows, M^2, M^2]`` over a map of the image / (patch * 2^i), in whole windows as the official code builds
    it. None when no mask was saved or its windows tile no square map."""
    windows = kwargs["window_size"]
    for k, mask in state.items():
        if m := re.fullmatch(r"layers\.(\d+)\.blocks\.\d+\.attn_mask", k):
            i = int(m.group(1))
            M = windows if isinstance(windows, int) else windows[i]
            per_side = math.isqrt(mask.shape[0])
            if per_side**2 != mask.shape[0] or mask.shape[1] != M * M:
                return None
            ph, pw = kwargs["patch_size"]
            return [per_side * M * ph * 2**i, per_side * M * pw * 2**i]
    return None


def infer_swin_args(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read SwinTransformer constructor arguments off a state dict's tensor shapes (vitlab / timm names)."""
    D, C, ph, pw = state["patch_embed.proj.weight"].shape
    depths: dict[int, int] = {}
    for k in state:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    stages = range(len(depths))
    heads, windows = [], []
    for i in stages:
        table = state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]  # ((2M-1)^2, heads)
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0] or side % 2 == 0:
            raise VitlabError(f"stage {i}'s relative position table has {table.shape[0]} rows: not a square window")
        heads.append(table.shape[1])
        windows.append((side + 1) // 2)
        if state[f"layers.{i}.blocks.0.norm1.weight"].shape[0] != D * 2**i:
            raise VitlabError("Swin whose width does not double at every stage is not supported")
    return {
        "patch_size": [ph, pw],
        "in_chans": C,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "embed_dim": D,
        "depths": [depths[i] for i in stages],
        "num_heads": heads,
        "window_size": windows[0] if len(set(windows)) == 1 else windows,
        "mlp_ratio": state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in state,
    }


# --- checkpoint exporters: ours -> HF transformers and timm names ----------------------------------------------
HF_SWIN_EXPORT_NAMES = {
    "patch_embed.proj": "swin.embeddings.patch_embeddings.projection",
    "patch_embed.norm": "swin.embeddings.norm",
    "norm": "swin.layernorm",
    "head": "classifier",
}
# options HF's and timm's Swin build one way: one window size for every stage, LayerNorm eps 1e-5, GELU
SWIN_FIXED = {"norm_eps": 1e-5, "act": "gelu"}


def _one_window(model: SwinTransformer) -> int:
    windows = {stage.window_size for stage in model.layers}
    if len(windows) != 1:
        raise VitlabError(f"window_size={sorted(windows)} per stage cannot be expressed: HF and timm take one window")
    return windows.pop()


@register_hf_exporter("swin")
def export_hf_swin(model: nn.Module) -> Exported:
    """SwinTransformer -> HF ``SwinForImageClassification`` (the inverse of `convert_hf_swin_state`: patch merging
    back to the end of the stage before, q / k / v split)."""
    args = constructor_args(model)
    refuse_options(args, {"norm_eps": 1e-5}, "HF transformers' Swin")
    out: dict[str, torch.Tensor] = {}
    qkv = [f"attention.self.{n}" for n in ("query", "key", "value")]
    for k, v in model.state_dict().items():
        mod, _, kind = k.rpartition(".")
        if mod in HF_SWIN_EXPORT_NAMES:
            out[f"{HF_SWIN_EXPORT_NAMES[mod]}.{kind}"] = v
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.+)$", k):
            out[f"swin.encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := re.match(r"(layers\.\d+\.blocks\.\d+)\.(.+)$", k):
            layer = "swin.encoder." + m.group(1)
            if m.group(2) == "attn.relative_position_bias_table":
                out[f"{layer}.attention.self.relative_position_bias_table"] = v
            else:
                out.update({f"{layer}.{n}": t for n, t in export_hf_block(m.group(2), v, qkv=qkv).items()})
        else:
            raise VitlabError(f"parameter {k!r} has no HF Swin counterpart")
    patch, img = model.patch_embed.patch_size, args["img_size"]
    config = {
        "model_type": "swin",
        "architectures": ["SwinForImageClassification"],
        "image_size": img if isinstance(img, int) else list(img),
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "num_channels": model.patch_embed.in_chans,
        "embed_dim": model.patch_embed.proj.out_channels,
        "depths": [len(stage.blocks) for stage in model.layers],
        "num_heads": [stage.blocks[0].attn.num_heads for stage in model.layers],
        "window_size": _one_window(model),
        "mlp_ratio": args["mlp_ratio"],
        "qkv_bias": args["qkv_bias"],
        "hidden_act": hf_hidden_act(args["act"]),
        "layer_norm_eps": 1e-5,
        "use_absolute_embeddings": False,
        "hidden_dropout_prob": args["proj_drop_rate"],
        "attention_probs_dropout_prob": args["attn_drop_rate"],
        "drop_path_rate": args["drop_path_rate"],
    }
    return Exported(out, config)


@register_timm_exporter("swin")
def export_timm_swin(model: nn.Module) -> Exported:
    """SwinTransformer -> timm's SwinTransformer: our names but its classifier's, ``head.fc``."""
    args = constructor_args(model)
    refuse_options(args, SWIN_FIXED, "timm's Swin")
    state = {
        ("head.fc." + k.removeprefix("head.") if k.startswith("head.") else k): v for k, v in model.state_dict().items()
    }
    patch = model.patch_embed.patch_size
    model_args = {
        "img_size": args["img_size"],
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "in_chans": model.patch_embed.in_chans,
        "num_classes": model.num_classes,
        "embed_dim": model.patch_embed.proj.out_channels,
        "depths": [len(stage.blocks) for stage in model.layers],
        "num_heads": [stage.blocks[0].attn.num_heads for stage in model.layers],
        "window_size": _one_window(model),
        "mlp_ratio": args["mlp_ratio"],
        "qkv_bias": args["qkv_bias"],
    }
    config = {
        "architecture": "swin_tiny_patch4_window7_224",
        "model_args": to_jsonable(model_args),
        "pretrained_cfg": {"first_conv": "patch_embed.proj", "classifier": "head.fc", "fixed_input_size": True},
    }
    return Exported(state, config)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (embed_dim, depths, num_heads, drop_path_rate); heads have 32 channels (16 in nano). The stochastic depth
# rates are the paper's ImageNet-1K training values (section 4.1). "nano" is vitlab's, for 28x28 and 32x32 inputs:
# half Swin-T's width and three stages of two blocks (a fourth would see a 2 x 2 map): 1.3M parameters and 0.08
# GFLOPs, a seventh of vit_tiny_patch4_28's; a CPU training step costs about 0.8x one of vit_tiny_patch7_28, the
# Fashion-MNIST recipe's model. "tiny" at those sizes keeps Swin-T's sizes.
_SIZES = {
    "nano": (48, (2, 2, 2), (3, 6, 12), 0.1),
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),  # the paper trains Swin-L on ImageNet-22K only, at 0.2
}


def _cfg(img_size: int | tuple[int, int], in_chans: int = 3, *, imagenet: bool = True, **extra: Any) -> dict[str, Any]:
    """ImageNet statistics for RGB ImageNet models (timm's and HF's Swin preprocessing), 0.5 otherwise (as ViT)."""
    imagenet = imagenet and in_chans == 3
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if imagenet else (None, None)
    return image_cfg(to_2tuple(img_size), in_chans, paper=PAPER, mean=mean, std=std, **extra)


def _add_variant(size: str, patch: int, window: int, img: int, in_chans: int = 3, num_classes: int = 1000) -> None:
    dim, depths, heads, dpr = _SIZES[size]
    name = f"swin_{size}_patch{patch}_window{window}_{img}"
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "embed_dim": dim,
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "drop_path_rate": dpr,
    }
    cfg = _cfg(img, in_chans, imagenet=img >= 224, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return SwinTransformer, kwargs, cfg

    variant.__name__ = name
    variant.__doc__ = f"Swin-{size[0].upper()} patch {patch}, window {window} at {img}x{img}: C={dim}, depths {depths}."
    register_model(variant)


for _size in ("tiny", "small", "base", "large"):
    _add_variant(_size, 4, 7, 224)
for _size in ("base", "large"):
    _add_variant(_size, 4, 12, 384)
# Small inputs for CPU training, 10 classes, patch 2: 28x28 grayscale (maps 14, 7, 4: window 7 splits the first
# stage in 2 x 2 shifted windows) and 32x32 RGB (maps 16, 8, 4: window 4 shifts in the first two stages).
for _size in ("nano", "tiny"):
    _add_variant(_size, 2, 7, 28, in_chans=1, num_classes=10)
    _add_variant(_size, 2, 4, 32, in_chans=3, num_classes=10)
