"""Vision Transformer.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021.

    z_0  = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos,   E in R^{(P^2 C) x D}, E_pos in R^{(N+1) x D}  (1)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1},                          l = 1 ... L                                (2)
    z_l  = MLP(LN(z'_l)) + z'_l,                                l = 1 ... L                                (3)
    y    = LN(z_L^0)                                                                                       (4)

The classification head is an MLP with one tanh hidden layer at pre-training time (``head_hidden_dim``) and a single
linear layer at fine-tuning time (the default). Global average pooling of the patch tokens replaces the class token
with ``global_pool="avg"`` (paper, appendix D.3). Fine-tuning at a higher resolution keeps the patch size, so the
sequence grows and the pre-trained position embeddings are interpolated in 2D (section 3.2): `set_input_size`.

Model sizes (Table 1): Base 12 layers, D 768, MLP 3072, 12 heads; Large 24, 1024, 4096, 16; Huge 32, 1280, 5120, 16.
Tiny (192, 3 heads) and Small (384, 6 heads) are DeiT's (Touvron et al., 2021).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

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
    register_timm_converter,
    register_timm_exporter,
    register_variant,
)
from vitlab.errors import VitlabError
from vitlab.layers import (
    Attention,
    PatchEmbed,
    block_stack,
    low_precision_inference,
    resample_pos_embed,
    sincos_pos_embed_2d,
    trunc_normal_init,
    zero_init,
)
from vitlab.models._export import export_hf_encoder, refuse_options
from vitlab.models._features import stage_intermediates
from vitlab.models._head import image_cfg, record_img_size, record_num_classes, zero_classifier

IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
PAPER = "Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021 (arXiv:2010.11929)"


@register_architecture
class VisionTransformer(nn.Module):
    arch = "vit"
    # the classifier layers: each is started afresh, not loaded, when a checkpoint's differs in shape or presence
    head_names = ("head", "pre_logits")
    # fine-tuning removes the whole pre-training head and attaches a single zero-initialised linear layer (paper,
    # section 3.1 "Fine-tuning and higher resolution")
    finetune_overrides: ClassVar[dict[str, Any]] = {"head_hidden_dim": None}

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg"] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        pos_embed: Literal["learn", "sincos", "none"] = "learn",
        pre_norm: bool = False,
        fc_norm: bool = False,
        head_hidden_dim: int | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        dynamic_img_size: bool = False,
        embed_layer: nn.Module | None = None,
        attn_layer: Callable[..., nn.Module] = Attention,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitlabError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        if pos_embed not in ("learn", "sincos", "none"):
            raise VitlabError(f"pos_embed must be 'learn', 'sincos' or 'none', got {pos_embed!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size

        # embed_layer: a built patch embedding with PatchEmbed's interface (the hybrid's CNN stem + 1x1 projection)
        if embed_layer is None:
            embed_layer = PatchEmbed(
                img_size,
                patch_size,
                in_chans,
                embed_dim,
                bias=not pre_norm,  # a LayerNorm follows: its shift makes a patch bias redundant (CLIP has none)
                strict_img_size=not dynamic_img_size,
                flatten=not dynamic_img_size,
            )
        self.patch_embed = embed_layer
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if pos_embed == "none":
            self.pos_embed = None
        else:
            # E_pos covers the class token too (eq. 1), unless no_embed_class; a fixed table is a frozen parameter
            # so that checkpoints keep one layout whatever the choice.
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.num_pos_prefix_tokens + num_patches, embed_dim), requires_grad=pos_embed == "learn"
            )
        self.pos_embed_type = pos_embed
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # pre_norm: a LayerNorm on the embedded tokens before the first block, as CLIP's ViT (``ln_pre``)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()

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
            attn_layer=attn_layer,  # a subclass's attention (locality self-attention), as embed_layer its tokenizer
        )
        # eq. 4 applies LN to the output tokens; with fc_norm the LN moves after pooling instead (as in MAE/BEiT).
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        if head_hidden_dim:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(embed_dim, head_hidden_dim))
            self.pre_logits.add_module("act", nn.Tanh())
            self.num_features = head_hidden_dim
        else:
            self.pre_logits = nn.Identity()
            self.num_features = embed_dim
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) weights and zero biases for every linear map, as DeiT and timm; zero classifier,
        as the ViT paper's code (the head starts from uniform predictions); a 2D sine-cosine table if asked."""
        trunc_normal_init(self, types=(nn.Linear, nn.Conv2d))
        # lecun-normal patch embedding (fan-in = P^2 C): keeps token scale independent of patch size and channels
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
        zero_init(self.head)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self._init_pos_embed()

    @torch.no_grad()
    def _init_pos_embed(self) -> None:
        if self.pos_embed is None:
            return
        if self.pos_embed_type == "sincos":
            self.pos_embed.zero_()
            table = sincos_pos_embed_2d(self.patch_embed.grid_size, self.embed_dim)
            self.pos_embed[:, self.num_pos_prefix_tokens :] = table.to(self.pos_embed)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should not touch (besides norms and biases)."""
        return {"pos_embed", "cls_token"}

    @property
    def num_pos_prefix_tokens(self) -> int:
        """The prefix tokens that the position table has rows for: all of them (eq. 1), or none with
        ``no_embed_class`` (timm's layout for DeiT III: only patches have positions, the class token joins after)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    # --- input size ---------------------------------------------------------------------------------------
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution once, resampling the position embeddings (paper, section 3.2)."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        if self.pos_embed is None:
            return
        if self.pos_embed_type == "sincos":
            self.pos_embed = nn.Parameter(
                torch.zeros(
                    1,
                    self.num_pos_prefix_tokens + self.patch_embed.num_patches,
                    self.embed_dim,
                    device=self.pos_embed.device,
                    dtype=self.pos_embed.dtype,
                ),
                requires_grad=False,
            )
            self._init_pos_embed()
        else:
            new = resample_pos_embed(
                self.pos_embed.data, self.patch_embed.grid_size, old_grid, self.num_pos_prefix_tokens
            )
            self.pos_embed = nn.Parameter(new)
        record_img_size(self, img_size)

    # --- forward --------------------------------------------------------------------------------------------
    def prefix_tokens(self) -> list[torch.Tensor]:
        """The learned [1, 1, D] tokens placed before the patch tokens, in order (DeiT adds a distillation token)."""
        return [self.cls_token] if self.cls_token is not None else []

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            B, H, W, D = x.shape
            x = x.reshape(B, H * W, D)  # (B, N, D)
            pos = None
            if self.pos_embed is not None:
                grid = self.patch_embed.grid_size
                pos = resample_pos_embed(self.pos_embed, (H, W), grid, self.num_pos_prefix_tokens)
        else:
            pos = self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in self.prefix_tokens()]
        if pos is not None and self.no_embed_class:
            x = x + pos  # (B, N, D): positions for the patches only; the prefix tokens join without one
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, D)
        if pos is not None and not self.no_embed_class:
            x = x + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> output tokens [B, prefix + N, D] (after the final LN of eq. 4)."""
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
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
        """The output tokens [B, prefix + N, D] of the chosen blocks (see `vitlab.models._features`)."""
        x = low_precision_inference(self.norm_pre(self._pos_embed(self.patch_embed(x))))
        res = stage_intermediates(x, self.blocks, indices, intermediates_only, keep=self.norm if norm else None)
        if intermediates_only:
            return res
        x, out = res
        return self.norm(x), out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]  # z_L^0, the class token

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.head_drop(self.fc_norm(self.pool(x))))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool == "token" and self.cls_token is None:
                raise VitlabError("global_pool='token' needs a class token; this model has none")
            self.global_pool = global_pool
        self.head = zero_classifier(
            self.num_features, num_classes, device=self.pos_embed.device if self.pos_embed is not None else None
        )
        record_num_classes(self, num_classes)


# --- checkpoint converters: HF transformers and timm names -> ours ---------------------------------------------
HF_ACT = {  # HF's hidden_act -> ours; the first name of each of ours is the one an export writes
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}
HF_ACT_EXPORT = {ours: hf for hf, ours in reversed(HF_ACT.items())}


def hf_act(config: dict[str, Any]) -> str:
    """vitlab's name for a HF config's ``hidden_act``, with a one-line error for one vitlab lacks."""
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACT:
        raise VitlabError(f"hidden_act {act!r} is not supported; vitlab knows {sorted(HF_ACT)}")
    return HF_ACT[act]


@register_hf_converter("vit")
def convert_hf_vit(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``ViTModel`` / ``ViTForImageClassification`` directory -> VisionTransformer arguments and state."""
    state = convert_hf_vit_state(raw)
    kwargs = hf_vit_kwargs(config, state)
    return Converted("vit", state, kwargs, _cfg(224, kwargs["in_chans"]))


def hf_vit_kwargs(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """VisionTransformer arguments of a HF ViT-style config (ViT, DeiT), given the state already in vitlab names."""
    if "pre_logits.fc.weight" in state and config.get("pooler_act", "tanh") != "tanh":
        raise VitlabError(f"a pooler with pooler_act={config['pooler_act']!r} is not supported; vitlab's is tanh")
    hidden = config["hidden_size"]
    img = config.get("image_size", 224)
    patch = config.get("patch_size", 16)
    return {
        "img_size": list(img) if isinstance(img, (list, tuple)) else img,
        "patch_size": list(patch) if isinstance(patch, (list, tuple)) else patch,
        "in_chans": config.get("num_channels", 3),
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "embed_dim": hidden,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
        "qkv_bias": config.get("qkv_bias", True),
        "norm_eps": config.get("layer_norm_eps", 1e-12),
        "act": hf_act(config),
        "head_hidden_dim": state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
        "pos_drop_rate": config.get("hidden_dropout_prob", 0.0),
        "proj_drop_rate": config.get("hidden_dropout_prob", 0.0),
        "attn_drop_rate": config.get("attention_probs_dropout_prob", 0.0),
    }


# per-layer names in saved files (all transformers versions) and in transformers 5's in-memory modules; shared by
# every family whose HF encoder layer is ViT's (DeiT)
HF_LAYER_NAMES = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
HF_QKV_NAMES = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}


def convert_hf_encoder_layers(
    sd: dict[str, torch.Tensor], simple: dict[str, str], skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Map a HF ViT-style encoder to vitlab names: ``simple`` renames whole keys; ``encoder.layer.i.*`` go to
    ``blocks.i.*``. HF keeps separate query / key / value projections; vitlab's fused ``qkv`` is their
    concatenation along the output dimension, in that order."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer_re = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        if k in skip:
            continue
        m = layer_re.match(k)
        if not m:
            raise VitlabError(f"HF checkpoint parameter {k!r} has no vitlab counterpart")
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        if mod in HF_QKV_NAMES:
            qkv.setdefault((i, kind), {})[HF_QKV_NAMES[mod]] = v
        elif mod in HF_LAYER_NAMES:
            out[f"blocks.{i}.{HF_LAYER_NAMES[mod]}.{kind}"] = v
        else:
            raise VitlabError(f"HF checkpoint parameter {k!r} has no vitlab counterpart")
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# whole-key renames of HF ViT's embeddings, final norm, pooler and classifier (DeiT extends them)
HF_VIT_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def convert_hf_vit_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF ``ViTModel`` / ``ViTForImageClassification`` parameter names to vitlab's."""
    sd = {k.removeprefix("vit."): v for k, v in raw.items()}
    # the mask token is only used by masked-image-modelling heads
    return convert_hf_encoder_layers(sd, HF_VIT_NAMES, skip=("embeddings.mask_token",))


def is_timm_vit(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and "blocks.0.attn.qkv.weight" in state


@register_timm_converter(is_timm_vit)
def convert_timm_vit(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm's ViT names are vitlab's: only the constructor arguments are read, off the tensor shapes where they
    show and from ``declared`` (a timm config, a named variant) where they do not."""
    check_timm_vit_options(state)
    kwargs, unknown, source_img = infer_vit_args(state, declared)
    return Converted("vit", dict(state), kwargs, _cfg(224, kwargs["in_chans"]), source_img, unknown)


def check_timm_vit_options(state: dict[str, torch.Tensor]) -> None:
    """A one-line error for a timm ViT option that vitlab does not build."""
    for key in ("reg_token", "blocks.0.attn.proj.weight_g"):
        if key in state:
            raise VitlabError(f"timm ViT option with parameter {key!r} is not supported by vitlab yet")


def infer_vit_args(
    state: dict[str, torch.Tensor],
    declared: dict[str, Any],
    *,
    extra_prefix_tokens: int = 0,
    patch: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], list[int] | None]:
    """ViT constructor arguments of a timm-named state dict: (those its tensor shapes tell, those they do not and
    ``declared`` does not either, the image size its position table was made for).

    The head count is never guessed: the weights hold only the heads' concatenation ([3D, D] for q, k, v), so it
    comes from ``declared``, from the per-head q/k norms where the model has them, or is reported unknown.
    ``extra_prefix_tokens``: tokens besides the class token (DeiT's distillation token); ``patch``: the pixels per
    position-table cell when it is not the patch embedding's kernel (a hybrid's CNN stride)."""
    w = state["patch_embed.proj.weight"]  # (D, C, P, P)
    D, C, ph, pw = w.shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    class_token = "cls_token" in state
    prefix = (1 if class_token else 0) + extra_prefix_tokens
    img, no_embed_class = None, bool(declared.get("no_embed_class", False))
    if "pos_embed" in state:
        img, no_embed_class = vit_geometry(state["pos_embed"].shape[1], prefix, patch or (ph, pw), declared)
    fc_norm = "fc_norm.weight" in state
    kwargs: dict[str, Any] = {
        "img_size": img or [224, 224],
        "patch_size": [ph, pw],
        "in_chans": C,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "global_pool": "avg" if fc_norm or not class_token else "token",
        "embed_dim": D,
        "depth": depth,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value is loaded, not used
        "class_token": class_token,
        "no_embed_class": no_embed_class,
        "pos_embed": "learn" if "pos_embed" in state else "none",
        "pre_norm": "norm_pre.weight" in state,
        "fc_norm": fc_norm,
        "head_hidden_dim": state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
    }
    unknown: tuple[str, ...] = ("num_heads",)
    if "blocks.0.attn.q_norm.weight" in state:  # q/k norms act on one head: their width is the head size
        kwargs["num_heads"] = D // state["blocks.0.attn.q_norm.weight"].shape[0]
        unknown = ()
    return kwargs, unknown, img


def vit_geometry(rows: int, prefix: int, patch: tuple[int, int], declared: dict[str, Any]) -> tuple[list[int], bool]:
    """(image size, no_embed_class) of a position table with ``rows`` rows before ``prefix`` prefix tokens.

    The declared image size settles it when its grid fits the table with or without the prefix rows; otherwise the
    grid is taken square, as every published ViT's. A table that fits a square grid only without its prefix rows
    is also a non-square grid with them (15 + 1 = 16 = 4 x 4), so that layout must be declared (``no_embed_class``,
    or a variant or config.json that says it)."""
    stated = declared.get("no_embed_class")
    layouts = [bool(stated)] if stated is not None else [False, True]
    if prefix == 0:  # no prefix token: the two layouts are one
        layouts = layouts[:1]
    img = declared.get("img_size")
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else img
        for no_embed_class in layouts:
            if (h // patch[0]) * (w // patch[1]) == rows - (0 if no_embed_class else prefix):
                return [h, w], no_embed_class
    n = rows - (0 if layouts[0] else prefix)
    side = math.isqrt(n)
    if side * side == n:
        return [side * patch[0], side * patch[1]], layouts[0]
    if len(layouts) > 1 and math.isqrt(rows) ** 2 == rows:
        raise VitlabError(
            f"the position table's {rows} rows fit a square grid without a class-token row (timm's "
            "no_embed_class, as DeiT III) or another grid with one; name the model (model_name=) or pass its "
            "config.json"
        )
    raise VitlabError(f"cannot infer the image size from {rows} position embeddings; pass model_name=")


# --- checkpoint exporters: ours -> HF transformers and timm names (the inverses of the converters above) ---------
def hf_hidden_act(act: str) -> str:
    """HF's ``hidden_act`` for one of our activations, with a one-line error for one HF lacks."""
    if act not in HF_ACT_EXPORT:
        raise VitlabError(f"act={act!r} has no HF hidden_act; HF models take {sorted(HF_ACT_EXPORT)}")
    return HF_ACT_EXPORT[act]


# the HF ViT options a vitlab ViT may not have; HF's ViTForImageClassification classifies the final-LayerNormed
# class token with one linear layer
HF_VIT_FIXED = {
    "class_token": True,
    "global_pool": "token",
    "fc_norm": False,
    "pre_norm": False,
    "qk_norm": False,
    "init_values": None,
    "head_hidden_dim": None,
}


def full_pos_embed(model: nn.Module) -> torch.Tensor:
    """The position table [1, prefix + N, D] that a library adding it to every token (HF) needs, with the same
    outputs: ours, with zero rows for the prefix tokens of timm's no_embed_class layout; zeros without one."""
    D, N, prefix = model.embed_dim, model.patch_embed.num_patches, model.num_prefix_tokens
    pos = model.pos_embed.detach() if model.pos_embed is not None else torch.zeros(1, N, D)
    missing = prefix + N - pos.shape[1]  # (1, prefix + N, D): zero rows for what the table does not cover
    return torch.cat([pos.new_zeros(1, missing, D), pos], dim=1)


def hf_vit_export(model: nn.Module, names: dict[str, str], prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The state (HF names, ``prefix`` before all but the classifiers) and config sizes of a ViT-style model
    (ViT, DeiT), once its options pass `HF_VIT_FIXED`."""
    args = constructor_args(model)
    refuse_options(args, HF_VIT_FIXED, "HF transformers' ViT")
    state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    state["pos_embed"] = full_pos_embed(model)
    heads = {v for v in names.values() if "classifier" in v}  # on HF's task model, outside its backbone's prefix
    out = {(n if n in heads else prefix + n): v for n, v in export_hf_encoder(state, names).items()}
    patch, img, D = model.patch_embed.patch_size, model.patch_embed.img_size, model.embed_dim
    config = {
        "hidden_size": D,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.blocks[0].attn.num_heads,
        "intermediate_size": model.blocks[0].mlp.fc1.out_features,
        "hidden_act": hf_hidden_act(args["act"]),
        "layer_norm_eps": args["norm_eps"],
        "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "num_channels": model.patch_embed.in_chans,
        "qkv_bias": args["qkv_bias"],
        "hidden_dropout_prob": args["proj_drop_rate"],
        "attention_probs_dropout_prob": args["attn_drop_rate"],
    }
    return out, config


HF_VIT_EXPORT_NAMES = {ours: hf for hf, ours in HF_VIT_NAMES.items()}


@register_hf_exporter("vit")
def export_hf_vit(model: nn.Module) -> Exported:
    """VisionTransformer -> HF ``ViTForImageClassification`` (a learned, sin-cos or absent position table is
    written as HF's learned one, with the same values)."""
    state, config = hf_vit_export(model, HF_VIT_EXPORT_NAMES, "vit.")
    return Exported(state, {"model_type": "vit", "architectures": ["ViTForImageClassification"], **config})


# the ViT arguments that timm's VisionTransformer takes under the same names and meaning (timm's config.json
# ``model_args``, read back by `convert_timm_vit`)
TIMM_VIT_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "qk_norm",
    "init_values",
    "class_token",
    "no_embed_class",
    "pre_norm",
    "fc_norm",
    "dynamic_img_size",
)
# options timm's ViT builds only one way: no pre-logits MLP (timm removed it), LayerNorm eps 1e-6
TIMM_VIT_FIXED = {"head_hidden_dim": None, "norm_eps": 1e-6}


def timm_vit_args(model: nn.Module, keys: Sequence[str] = TIMM_VIT_ARGS) -> dict[str, Any]:
    """timm ``model_args`` of a ViT-style model: every size stated (the architecture name timm is given is a base
    variant), a sin-cos table written as a learned one with its values."""
    args = constructor_args(model)
    refuse_options(args, TIMM_VIT_FIXED, "timm's ViT")
    out = {k: args[k] for k in keys if k in args}
    out.update(num_heads=model.blocks[0].attn.num_heads, num_classes=model.num_classes)
    out["pos_embed"] = "none" if model.pos_embed is None else "learn"
    if args["act"] != "gelu":
        out["act_layer"] = args["act"]  # timm's name for it; vitlab's timm reader maps it back
    return to_jsonable(out)


@register_timm_exporter("vit")
def export_timm_vit(model: nn.Module) -> Exported:
    """VisionTransformer -> timm's VisionTransformer (the names are the same)."""
    config = {
        "architecture": "vit_base_patch16_224",
        "model_args": timm_vit_args(model),
        "pretrained_cfg": {"first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": True},
    }
    return Exported(dict(model.state_dict()), config)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (embed_dim, depth, num_heads); MLP ratio 4 throughout.
_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
# Sized for a CPU, small images only: name -> (embed_dim, depth, num_heads, mlp_ratio). ViT-Mini (0.8M parameters)
# trains Fashion-MNIST at 4.6x ViT-Ti/4's images per second, so that 10 minutes on 2 cores hold ~10 epochs
# where ViT-Ti/4 gets 3 (benchmarks/small_data.py, docs/small_data.md).
_CPU_SIZES = {"mini": (128, 6, 4, 2.0)}


def size_label(size: str) -> str:
    """How a variant's docstring names a size: ViT-T, ViT-S, ... and ViT-Mini (a CPU size, spelled out)."""
    return size.capitalize() if size in _CPU_SIZES else size[0].upper()


def size_args(size: str) -> dict[str, Any]:
    """The width, depth, heads and MLP ratio of a named ViT size (``tiny``, ``mini``, ...)."""
    dim, depth, heads, mlp_ratio = (*_SIZES[size], 4.0) if size in _SIZES else _CPU_SIZES[size]
    return {"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio}


def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    if in_chans <= 3:
        extra = {"mean": IMAGENET_INCEPTION_MEAN[:in_chans], "std": IMAGENET_INCEPTION_STD[:in_chans], **extra}
    return image_cfg(img_size, in_chans, paper=PAPER, **extra)


# Published weights of the same architecture (timm's Hub repositories, ImageNet-21k pre-trained, fine-tuned on
# ImageNet-1k; Steiner et al., "How to train your ViT?", 2021), for create_model(name, pretrained=True).
_HUB_TAGS = {
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch32_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "augreg2_in21k_ft_in1k",
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",
    "vit_huge_patch14_224": "orig_in21k",
}


def _add_variant(size: str, patch: int, img: int, in_chans: int = 3, num_classes: int = 1000) -> None:
    dims = size_args(size)
    name = f"vit_{size}_patch{patch}_{img}"
    kwargs = {"img_size": img, "patch_size": patch, "in_chans": in_chans, "num_classes": num_classes, **dims}
    cfg = _cfg(img, in_chans, num_classes=num_classes)
    if name in _HUB_TAGS:
        cfg["hf_hub_id"] = f"timm/{name}.{_HUB_TAGS[name]}"
    doc = (
        f"ViT-{size_label(size)}/{patch} at {img}x{img}: "
        f"D={dims['embed_dim']}, {dims['depth']} layers, {dims['num_heads']} heads, MLP ratio {dims['mlp_ratio']:g}."
    )
    register_variant(name, VisionTransformer, kwargs, cfg, doc)


for _size in _SIZES:
    for _patch in (14, 16, 32):
        _add_variant(_size, _patch, 224)
for _size in ("base", "large"):
    for _patch in (16, 32):
        _add_variant(_size, _patch, 384)
# Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
_add_variant("tiny", 4, 28, in_chans=1, num_classes=10)
_add_variant("tiny", 7, 28, in_chans=1, num_classes=10)
_add_variant("small", 4, 28, in_chans=1, num_classes=10)
_add_variant("mini", 4, 28, in_chans=1, num_classes=10)
_add_variant("tiny", 4, 32, in_chans=3, num_classes=10)
_add_variant("small", 4, 32, in_chans=3, num_classes=10)
_add_variant("mini", 4, 32, in_chans=3, num_classes=10)
