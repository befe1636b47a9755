"""Compact Convolutional Transformer (CCT).

Hassani, Walton, Shah, Abuduweili, Li and Shi, "Escaping the Big Data Paradigm with Compact Transformers",
arXiv:2104.05704 (2021). Two changes make a ViT train from scratch on small data sets:

* a convolutional tokenizer (section 3.3) replaces patching: n blocks of

      x_0 = MaxPool(ReLU(Conv2d(x)))        (k x k convolution without bias, then a 3x3 / stride-2 max-pool)

  whose last map [B, D, H', W'] is flattened into H' W' tokens. Overlapping kernels keep local structure and the
  sequence length follows the image size, so the position embedding (learned, 1D sine, or none) is optional;
* sequence pooling (section 3.2) replaces the class token: an attention-weighted average of the output tokens

      x_L' = softmax(g(x_L)^T) in R^{1 x N},   z = x_L' x_L in R^{1 x D}      (g: a linear map D -> 1)

  so every token contributes to the representation in proportion to a learned importance.

The encoder is the transformer of ViT with the official code's layer layout (see `CCTBlock`). Variants are named
``cct_{layers}_{kernel}x{conv layers}_{image size}``; sizes follow Table 1 and the official repository
(SHI-Labs/Compact-Transformers): CCT-2 and CCT-4 D 128, 2 heads, MLP ratio 1; CCT-6 and CCT-7 D 256, 4 heads, ratio 2;
CCT-14 D 384, 6 heads, ratio 3. Intermediate tokenizer convolutions have 64 channels, the last one D; stride
max(1, k // 2 - 1) and padding max(1, k // 2).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from vitlab._registry import Converted, register_architecture, register_model, register_timm_converter
from vitlab.errors import VitlabError
from vitlab.layers import (
    Block,
    check_image,
    drop_path_rates,
    low_precision_inference,
    map_to_tokens,
    resample_pos_embed,
    sincos_pos_embed_1d,
    to_2tuple,
    trunc_normal_init,
    zero_init,
)
from vitlab.models._features import stage_intermediates
from vitlab.models._head import image_cfg, record_img_size, record_num_classes, zero_classifier

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER = "Hassani et al., Escaping the Big Data Paradigm with Compact Transformers, 2021 (arXiv:2104.05704)"


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvTokenizer(nn.Module):
    """``n_conv_layers`` x (Conv2d k x k without bias -> ReLU -> MaxPool 3x3 / 2), flattened to tokens [B, N, D].

    Layers are ``conv_layers.{i}.{0: conv, 1: ReLU, 2: max-pool}``, as in the official code, so its checkpoints map
    one to one. It stands where ViT's patch embedding does and answers the same questions (``grid_size``,
    ``num_patches``, ``patch_size``: the pixels per token side, the product of the strides)."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        n_conv_layers: int = 1,
        kernel_size: int = 7,
        stride: int = 2,
        padding: int = 3,
        conv_width: int = 64,
        pool_kernel_size: int = 3,
        pool_stride: int = 2,
        pool_padding: int = 1,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        if n_conv_layers < 1:
            raise VitlabError(f"the tokenizer needs at least one convolution, got n_conv_layers={n_conv_layers}")
        self.in_chans = in_chans
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self._conv = (kernel_size, stride, padding)
        self._pool = (pool_kernel_size, pool_stride, pool_padding)
        self.n_conv_layers = n_conv_layers
        widths = [in_chans] + [conv_width] * (n_conv_layers - 1) + [embed_dim]
        self.conv_layers = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(pool_kernel_size, stride=pool_stride, padding=pool_padding),
                )
                for c_in, c_out in itertools.pairwise(widths)
            ]
        )
        reduction = (stride * pool_stride) ** n_conv_layers
        self.patch_size = (reduction, reduction)
        self.set_img_size(img_size)

    def grid_for(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (H', W') of an image of ``img_size`` (H, W)."""
        out = []
        for n in img_size:
            for _ in range(self.n_conv_layers):
                n = _conv_out(_conv_out(n, *self._conv), *self._pool)
            out.append(n)
        return out[0], out[1]

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(self.img_size)
        if min(self.grid_size) < 1:
            raise VitlabError(f"image size {self.img_size} is too small for the tokenizer; use a larger image")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, self.img_size if self.strict_img_size else None)
        return map_to_tokens(self.conv_layers(x), self.flatten)  # conv_layers: (B, D, H', W')


class CCTBlock(Block):
    """`Block`'s modules with the official CCT layer order: the second LayerNorm normalises the residual stream
    itself, so the MLP's residual adds to the normalised tokens,

        x = x + MSA(LN_1(x));   x = LN_2(x);   x = x + MLP(x)

    (``TransformerEncoderLayer`` in SHI-Labs/Compact-Transformers, which trained the paper's numbers). The
    parameters are the same as a pre-norm block's; only where LN_2's output goes differs."""

    def forward(self, x: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *attn_args)))
        x = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(x)))


@register_architecture
class CCT(nn.Module):
    arch = "cct"
    head_names = ("head",)  # the classifier; sequence pooling belongs to the backbone and is always loaded

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        n_conv_layers: int = 2,
        kernel_size: int = 7,
        stride: int | None = None,
        padding: int | None = None,
        conv_width: int = 64,
        pool_kernel_size: int = 3,
        pool_stride: int = 2,
        pool_padding: int = 1,
        pos_embed: Literal["learn", "sine", "none"] = "learn",
        global_pool: Literal["seq", "avg"] = "seq",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if pos_embed not in ("learn", "sine", "none"):
            raise VitlabError(f"pos_embed must be 'learn', 'sine' or 'none', got {pos_embed!r}")
        if global_pool not in ("seq", "avg"):
            raise VitlabError(f"global_pool must be 'seq' (sequence pooling) or 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0  # no class token: sequence pooling reads every token
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = ConvTokenizer(
            img_size=img_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            n_conv_layers=n_conv_layers,
            kernel_size=kernel_size,
            stride=max(1, kernel_size // 2 - 1) if stride is None else stride,
            padding=max(1, kernel_size // 2) if padding is None else padding,
            conv_width=conv_width,
            pool_kernel_size=pool_kernel_size,
            pool_stride=pool_stride,
            pool_padding=pool_padding,
            flatten=not dynamic_img_size,
            # a sine table or none fits any size; a learned table fixes the sequence length
            strict_img_size=not dynamic_img_size and pos_embed == "learn",
        )
        self.pos_embed_type = pos_embed
        learn = pos_embed == "learn"
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim)) if learn else None
        # the sine table is a function of the sequence length, computed (and cached) rather than stored, so that it
        # is right at any input size and never resampled as a learned table would be
        self._sine_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)  # linear in depth, as the official code
        self.blocks = nn.Sequential(
            *[
                CCTBlock(
                    embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_eps=norm_eps,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attention_pool = nn.Linear(embed_dim, 1) if global_pool == "seq" else None  # g in x_L' = softmax(g(x_L)^T)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the official code: He-normal tokenizer convolutions (they feed ReLUs), truncated-normal(0.02) linear
        maps with zero biases, a learned position embedding at std 0.2; plus vitlab's zero classifier."""

        def he_normal(m: nn.Module) -> None:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

        trunc_normal_init(self, other=he_normal)
        zero_init(self.head)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    def sine_table(self, like: torch.Tensor) -> torch.Tensor:
        """The official sine table [1, N, D] for tokens ``like`` [B, N, D]: 1D over the flattened sequence,
        PE(p, 2i) = sin(p / 10000^{2i/D}), PE(p, 2i+1) = cos(p / 10000^{2i/D})."""
        key = (like.shape[1], like.device, like.dtype)
        if key not in self._sine_cache:
            self._sine_cache[key] = sincos_pos_embed_1d(like.shape[1], self.embed_dim)[None].to(like)
        return self._sine_cache[key]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    # --- input size ---------------------------------------------------------------------------------------
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution once, resampling a learned position embedding in 2D."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        if self.pos_embed is not None:
            new = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid, num_prefix_tokens=0)
            self.pos_embed = nn.Parameter(new)
        record_img_size(self, img_size)

    # --- forward --------------------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # the residual stream in the parameters' precision: autocast leaves the tokenizer's output in bf16, and
        # without a learned fp32 table to promote it, training would otherwise run the stream in bf16
        x = x.to(self.norm.weight.dtype)
        pos = self.pos_embed
        if self.dynamic_img_size:
            B, H, W, D = x.shape
            x = x.reshape(B, H * W, D)  # (B, N, D)
            if pos is not None:
                pos = resample_pos_embed(pos, (H, W), self.patch_embed.grid_size, 0)
        if self.pos_embed_type == "sine":
            pos = self.sine_table(x)
        if pos is not None:
            x = x + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> output tokens [B, N, D] after the final LayerNorm (no class token)."""
        x = self._pos_embed(self.patch_embed(x))
        x = self.blocks(low_precision_inference(x))
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output tokens [B, N, D] of the chosen blocks (see `vitlab.models._features`)."""
        x = low_precision_inference(self._pos_embed(self.patch_embed(x)))
        res = stage_intermediates(x, self.blocks, indices, intermediates_only, keep=self.norm if norm else None)
        if intermediates_only:
            return res
        x, out = res
        return self.norm(x), out

    def pool_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence pooling's importance weights x_L' = softmax(g(x_L)^T) [B, N] of output tokens [B, N, D]; they
        are positive and sum to 1 over the tokens (uniform 1/N under ``global_pool='avg'``)."""
        if self.attention_pool is None:
            return x.new_full(x.shape[:2], 1.0 / x.shape[1])
        # softmax in fp32 under autocast: the weights of a long sequence are small and bf16 keeps ~3 digits
        return self.attention_pool(x).squeeze(-1).softmax(dim=1, dtype=torch.float32).to(x.dtype)  # (B, N)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention_pool is None:
            return x.mean(dim=1)
        return (self.pool_weights(x).unsqueeze(1) @ x).squeeze(1)  # z = x_L' x_L: (B, 1, N) @ (B, N, D) -> (B, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = zero_classifier(self.num_features, num_classes, device=self.norm.weight.device)
        record_num_classes(self, num_classes)


# --- checkpoint converter: the official repository's names -> ours ---------------------------------------------
_OFFICIAL_BLOCK = {
    "pre_norm": "norm1",
    "self_attn.qkv": "attn.qkv",
    "self_attn.proj": "attn.proj",
    "linear1": "mlp.fc1",
    "norm1": "norm2",
    "linear2": "mlp.fc2",
}
_OFFICIAL = {
    "classifier.positional_emb": "pos_embed",
    "classifier.attention_pool.weight": "attention_pool.weight",
    "classifier.attention_pool.bias": "attention_pool.bias",
    "classifier.norm.weight": "norm.weight",
    "classifier.norm.bias": "norm.bias",
    "classifier.fc.weight": "head.weight",
    "classifier.fc.bias": "head.bias",
}


def _is_official_cct(state: dict[str, torch.Tensor]) -> bool:
    return "tokenizer.conv_layers.0.0.weight" in state and "classifier.blocks.0.self_attn.qkv.weight" in state


@register_timm_converter(_is_official_cct, priority=10)
def convert_official_cct(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """A state dict of SHI-Labs/Compact-Transformers' ``CCT`` (the published CIFAR, Flowers and ImageNet weights).

    Sizes are read off the tensor shapes; the official variants have 64-dimensional heads, and their tokenizer
    stride and padding follow the kernel size (see the module docstring)."""
    if "classifier.class_emb" in state:
        raise VitlabError("CCT with a class token instead of sequence pooling is not supported by vitlab")
    out: dict[str, torch.Tensor] = {}
    pe = state.get("classifier.positional_emb")
    # the official sine table is a frozen parameter; vitlab computes it, so it is recognised and left out
    sine = pe is not None and torch.allclose(pe.float().cpu(), sincos_pos_embed_1d(*pe.shape[1:])[None], atol=1e-5)
    if sine:
        state = {k: v for k, v in state.items() if k != "classifier.positional_emb"}
    block_re = re.compile(r"classifier\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in state.items():
        if k.startswith("tokenizer.conv_layers."):
            out["patch_embed." + k.removeprefix("tokenizer.")] = v
        elif k in _OFFICIAL:
            out[_OFFICIAL[k]] = v
        elif (m := block_re.match(k)) and m.group(2) in _OFFICIAL_BLOCK:
            out[f"blocks.{m.group(1)}.{_OFFICIAL_BLOCK[m.group(2)]}.{m.group(3)}"] = v
        else:
            raise VitlabError(f"official CCT parameter {k!r} has no vitlab counterpart")
    kwargs = infer_cct_args(out, sine_length=pe.shape[1] if sine else None)
    return Converted("cct", out, kwargs, _cfg(kwargs["img_size"][0], kwargs["in_chans"]))


def infer_cct_args(state: dict[str, torch.Tensor], sine_length: int | None = None) -> dict[str, Any]:
    """CCT constructor arguments from a vitlab-named state dict's shapes (``sine_length``: the sequence length of a
    sine table that the state dict held)."""
    convs = sorted(int(k.split(".")[2]) for k in state if re.fullmatch(r"patch_embed\.conv_layers\.\d+\.0\.weight", k))
    first = state["patch_embed.conv_layers.0.0.weight"]  # (width or D, C, k, k)
    D = state["norm.weight"].shape[0]
    kernel = first.shape[-1]
    kwargs: dict[str, Any] = {
        "in_chans": first.shape[1],
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "embed_dim": D,
        "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "num_heads": max(D // 64, 1),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "n_conv_layers": len(convs),
        "kernel_size": kernel,
        "stride": max(1, kernel // 2 - 1),
        "padding": max(1, kernel // 2),
        "conv_width": first.shape[0] if len(convs) > 1 else 64,
        "pos_embed": "none",
        "img_size": [224, 224],
    }
    pe = state.get("pos_embed")
    n = pe.shape[1] if pe is not None else sine_length
    if n is not None:
        side = math.isqrt(n)
        if side * side != n:
            raise VitlabError(f"cannot infer the image size from {n} position embeddings; pass model_name=")
        reduction = (kwargs["stride"] * 2) ** len(convs)  # 3x3 / 2 max-pool after each convolution
        kwargs["img_size"] = [side * reduction, side * reduction]
        kwargs["pos_embed"] = "learn" if pe is not None else "sine"
    return kwargs


# --- registered variants -------------------------------------------------------------------------------------
# name -> (depth, embed_dim, num_heads, mlp_ratio), Table 1 of the paper and the official code
_SIZES = {
    2: (2, 128, 2, 1.0),
    4: (4, 128, 2, 1.0),
    6: (6, 256, 4, 2.0),
    7: (7, 256, 4, 2.0),
    14: (14, 384, 6, 3.0),
}


def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    small = img_size <= 64
    mean, std = (CIFAR_MEAN, CIFAR_STD) if small else (IMAGENET_MEAN, IMAGENET_STD)
    if in_chans != 3:
        mean, std = None, None  # 0.5
    return image_cfg(img_size, in_chans, paper=PAPER, mean=mean, std=std, **extra)


def _add_variant(
    layers: int, kernel: int, n_conv: int, img: int, *, in_chans: int = 3, num_classes: int = 10, sine: bool = False
) -> None:
    depth, dim, heads, ratio = _SIZES[layers]
    name = f"cct_{layers}_{kernel}x{n_conv}_{img}" + ("_sine" if sine else "")
    kwargs = {
        "img_size": img,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": ratio,
        "n_conv_layers": n_conv,
        "kernel_size": kernel,
        "stride": max(1, kernel // 2 - 1),
        "padding": max(1, kernel // 2),
        "pos_embed": "sine" if sine else "learn",
    }
    cfg = _cfg(img, in_chans, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return CCT, kwargs, cfg

    variant.__name__ = name
    variant.__doc__ = (
        f"CCT-{layers}/{kernel}x{n_conv} at {img}x{img}: D={dim}, {depth} layers, {heads} heads, "
        f"{n_conv} {kernel}x{kernel} tokenizer convolution(s), {'sine' if sine else 'learned'} position embedding."
    )
    register_model(variant)


# CIFAR-sized (32x32 RGB, 10 classes) as in Table 2, with the official sine-embedding twins of the published weights
for _layers, _kernel, _n_conv in [(2, 3, 2), (4, 3, 2), (6, 3, 1), (6, 3, 2), (7, 3, 1), (7, 3, 2)]:
    _add_variant(_layers, _kernel, _n_conv, 32)
_add_variant(7, 3, 1, 32, sine=True)
# Flowers-102 and ImageNet
_add_variant(7, 7, 2, 224, num_classes=102)
_add_variant(7, 7, 2, 224, num_classes=102, sine=True)
_add_variant(14, 7, 2, 224, num_classes=1000)
_add_variant(14, 7, 2, 384, num_classes=1000)
# 28x28 grayscale (MNIST, Fashion-MNIST), 10 classes, for CPU training
for _layers, _kernel, _n_conv in [(2, 3, 2), (4, 3, 2), (7, 3, 1), (7, 3, 2)]:
    _add_variant(_layers, _kernel, _n_conv, 28, in_chans=1)
