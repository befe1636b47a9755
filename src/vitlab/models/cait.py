"""CaiT: Class-Attention in Image Transformers.

Touvron, Cord, Sablayrolles, Synnaeve, Jégou, "Going deeper with Image Transformers", ICCV 2021 (arXiv:2103.17239).

Two changes let ViT-style models go deeper (section 2 and 3):

* LayerScale (eq. 4): every residual branch of the self-attention stage is multiplied by a learned per-channel
  diagonal matrix initialised to a small eps,

      x'_l    = x_l  + diag(lambda_l,1 ... lambda_l,d)  SA(eta(x_l))
      x_{l+1} = x'_l + diag(lambda'_l,1 ... lambda'_l,d) FFN(eta(x'_l))

  with eta the LayerNorm and eps = 0.1 up to depth 18, 1e-5 at depth 24 and 1e-6 beyond (section 2.1).
  The self-attention is talking-heads attention (Shazeer et al., 2020): the attention logits and then the softmax
  probabilities are each mixed linearly across heads (``proj_l`` before the softmax, ``proj_w`` after it).

* Class attention (section 3): the self-attention stage runs on the patch tokens only, with no class token. The
  class token x_class is inserted after it and updated by ``depth_token_only`` (2) class-attention layers, where
  z = [x_class; x_patches] and only the class token is a query:

      Q = W_q x_class + b_q,  K = W_k z + b_k,  V = W_v z + b_v
      A = Softmax(Q K^T / sqrt(d / h)),  out_CA = W_o A V + b_o

  followed by the FFN on the class token alone, both with LayerScale. The patch tokens pass through unchanged.

The position embedding covers the patch tokens only (the class token never meets it). Model sizes (Table 1):
XXS d=192 / 4 heads, XS 288 / 6, S 384 / 8, M 768 / 16; the number after the size is the self-attention depth.
"""

from __future__ import annotations

import re
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
    register_timm_converter,
    register_timm_exporter,
    register_variant,
)
from vitlab.errors import VitlabError
from vitlab.layers import (
    AttentionBase,
    Block,
    CrossAttention,
    PatchEmbed,
    low_precision_inference,
    resample_pos_embed,
    trunc_normal_init,
    zero_init,
)
from vitlab.models._export import refuse_options
from vitlab.models._features import stage_intermediates
from vitlab.models._head import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    image_cfg,
    record_img_size,
    record_num_classes,
    zero_classifier,
)
from vitlab.models.vit import vit_geometry

PAPER = "Touvron et al., Going deeper with Image Transformers, ICCV 2021 (arXiv:2103.17239)"


def layer_scale_init(depth: int) -> float:
    """The LayerScale initial value eps for a self-attention stage of ``depth`` layers (paper, section 2.1)."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


class TalkingHeadAttention(AttentionBase):
    """Multi-head self-attention with talking heads (Shazeer et al., "Talking-Heads Attention", 2020, arXiv:2003.02436).

    ``proj_l`` mixes the h attention logits of each (query, key) pair across heads before the softmax and
    ``proj_w`` mixes the h probabilities after it. The mixing runs across heads, so no fused kernel computes it:
    this module always takes the explicit path. ``fused_attn`` stays a (False) switch and the softmax output
    passes through ``attn_probs`` so that `attention_modules` and `record_attention` treat it like the others; the
    recorded maps are the softmax probabilities, before ``proj_w`` mixes them (rows sum to 1)."""

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.fused_attn = False  # no fused kernel exists for talking heads; setting it True changes nothing
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
        # a linear map over the head axis: move heads last, mix, move them back
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, h, N, N)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        # softmax in fp32 even under bf16 autocast, as in AttentionBase.attend
        attn = self.attn_probs(attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype))
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, h, N, N)
        x = self.attn_drop(attn) @ v  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, h * hd)
        return self.proj_drop(self.proj(x))


class ClassAttentionBlock(Block):
    """A class-attention layer (section 3): class attention then the FFN, each with LayerScale, updating only the
    class token. The attention is cross-attention with the class token as the only query and z = [x_class;
    x_patches] as keys and values (W_k, W_v fused in ``attn.kv``); one LayerNorm normalises z, the class token
    included, before both."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, attn_layer=CrossAttention, **kwargs)

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        """x: patch tokens [B, N, D], x_cls: class token [B, 1, D] -> the updated class token [B, 1, D]."""
        z = self.norm1(torch.cat([x_cls, x], dim=1))  # (B, 1 + N, D)
        x_cls = x_cls + self.drop_path1(self.ls1(self.attn(z[:, :1], z)))
        return x_cls + self.drop_path2(self.ls2(self.mlp(self.norm2(x_cls))))


@register_architecture
class CaiT(nn.Module):
    arch = "cait"
    head_names = ("head",)
    # the self-attention stage has no prefix token (the class token joins only for class attention), so the
    # position embedding covers the patches alone: checkpoint loading resamples it with no prefix
    num_prefix_tokens = 0

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg"] = "token",
        embed_dim: int = 384,
        depth: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        depth_token_only: int = 2,
        mlp_ratio_token_only: float = 4.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if depth_token_only < 1:
            raise VitlabError(f"CaiT needs at least one class-attention layer, got depth_token_only={depth_token_only}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.init_values = layer_scale_init(depth) if init_values is None else init_values

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            strict_img_size=not dynamic_img_size,
            flatten=not dynamic_img_size,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        common = {"num_heads": num_heads, "qkv_bias": qkv_bias, "norm_eps": norm_eps, "act": act}
        # the official code drops every self-attention layer with the same rate (not DeiT's linear ramp)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rate,
                    init_values=self.init_values,
                    attn_layer=TalkingHeadAttention,
                    **common,
                )
                for _ in range(depth)
            ]
        )
        # class-attention layers: no dropout or stochastic depth, as in the official code
        self.blocks_token_only = nn.ModuleList(
            [
                ClassAttentionBlock(embed_dim, mlp_ratio=mlp_ratio_token_only, init_values=self.init_values, **common)
                for _ in range(depth_token_only)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the official code: truncated-normal(0.02) for every linear map (talking-heads mixing included), the
        class token and the position embedding; zero biases; the patch convolution keeps PyTorch's default; a zero
        classifier, as vitlab's ViT. LayerScale keeps the eps it was built with."""
        trunc_normal_init(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        zero_init(self.head)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution once, resampling the patch position embeddings in 2D."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        new = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid, num_prefix_tokens=0)
        self.pos_embed = nn.Parameter(new)
        record_img_size(self, img_size)

    # --- forward --------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> patch tokens plus position embedding [B, N, D] (no class token)."""
        x = self.patch_embed(x)
        pos = self.pos_embed
        if self.dynamic_img_size:
            B, H, W, D = x.shape
            x = x.reshape(B, H * W, D)  # (B, N, D)
            pos = resample_pos_embed(pos, (H, W), self.patch_embed.grid_size, num_prefix_tokens=0)
        return low_precision_inference(self.pos_drop(x + pos))

    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, D] -> [class token; patch tokens] [B, 1 + N, D], the patch tokens unchanged."""
        # repeat, not expand: torch's module tracker (FLOP counting) rejects a parameter's view made under no_grad
        x_cls = self.cls_token.to(x.dtype).repeat(x.shape[0], 1, 1)  # (B, 1, D)
        for block in self.blocks_token_only:
            x_cls = block(x, x_cls)
        return torch.cat([x_cls, x], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, 1 + N, D], the class token first."""
        x = self.blocks(self._embed(x))
        return self.norm(self._class_attention(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The patch tokens [B, N, D] after the chosen self-attention blocks (see `vitlab.models._features`);
        as in timm, the class-attention layers, which update only the class token, are not among them."""
        x = self._embed(x)
        res = stage_intermediates(x, self.blocks, indices, intermediates_only, keep=self.norm if norm else None)
        if intermediates_only:
            return res
        x, out = res
        return self.norm(self._class_attention(x)), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = zero_classifier(self.num_features, num_classes, device=self.cls_token.device)
        record_num_classes(self, num_classes)


# --- timm checkpoints ----------------------------------------------------------------------------------------
# timm (and the official facebookresearch/deit code) name LayerScale ``gamma_1`` / ``gamma_2`` on the block and
# keep class attention's key and value projections apart (``attn.k``, ``attn.v``); vitlab's shared LayerScale is
# ``ls1.gamma`` and its cross-attention fuses them into ``attn.kv``. Every other name is the same.
_TIMM_GAMMA = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.gamma_([12])$")
_TIMM_CLASS_KV = re.compile(r"^blocks_token_only\.(\d+)\.attn\.([kv])\.(weight|bias)$")


def convert_timm_cait_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    kv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if m := _TIMM_CLASS_KV.match(k):
            kv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif m := _TIMM_GAMMA.match(k):
            out[f"{m.group(1)}.ls{m.group(2)}.gamma"] = v
        else:
            out[k] = v
    for (i, kind), parts in kv.items():
        if set(parts) != {"k", "v"}:
            raise VitlabError(f"timm CaiT checkpoint has blocks_token_only.{i}.attn.k but not .v (or the reverse)")
        out[f"blocks_token_only.{i}.attn.kv.{kind}"] = torch.cat([parts["k"], parts["v"]], dim=0)  # W_k over W_v
    return out


def _is_timm_cait(state: dict[str, torch.Tensor]) -> bool:
    return "blocks_token_only.0.attn.q.weight" in state and "blocks.0.attn.proj_l.weight" in state


@register_timm_converter(_is_timm_cait, priority=10)  # a CaiT state dict also has the keys that identify a ViT
def convert_timm_cait(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm / official CaiT state dict -> CaiT arguments (read off the tensor shapes) and vitlab names."""
    D, C, ph, pw = state["patch_embed.proj.weight"].shape  # (D, C, P, P)

    def count(prefix: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in state if k.startswith(prefix))

    # patches only: CaiT's position embedding has no class-token entry
    img, _ = vit_geometry(state["pos_embed"].shape[1], 0, (ph, pw), declared)
    kwargs = {
        "img_size": img,
        "patch_size": [ph, pw],
        "in_chans": C,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "embed_dim": D,
        "depth": count("blocks."),
        "num_heads": state["blocks.0.attn.proj_l.weight"].shape[0],  # talking heads mix h x h: the head count
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "depth_token_only": count("blocks_token_only."),
        "mlp_ratio_token_only": state["blocks_token_only.0.mlp.fc1.weight"].shape[0] / D,
    }
    return Converted("cait", convert_timm_cait_state(state), kwargs, _cfg(img[0], C), img)


def export_timm_cait_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CaiT names -> timm's (the inverse of `convert_timm_cait_state`)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if m := re.match(r"^(blocks(?:_token_only)?\.\d+)\.ls([12])\.gamma$", k):
            out[f"{m.group(1)}.gamma_{m.group(2)}"] = v
        elif m := re.match(r"^(blocks_token_only\.\d+\.attn)\.kv\.(weight|bias)$", k):
            k_part, v_part = v.chunk(2, dim=0)  # W_k over W_v
            out[f"{m.group(1)}.k.{m.group(2)}"], out[f"{m.group(1)}.v.{m.group(2)}"] = k_part, v_part
        else:
            out[k] = v
    return out


# the CaiT arguments timm's Cait takes under the same names; it builds LayerNorm eps 1e-6 and GELU only
TIMM_CAIT_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "global_pool",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "depth_token_only",
    "mlp_ratio_token_only",
)


@register_timm_exporter("cait")
def export_timm_cait(model: nn.Module) -> Exported:
    """CaiT -> timm's Cait."""
    args = constructor_args(model)
    refuse_options(args, {"norm_eps": 1e-6, "act": "gelu"}, "timm's CaiT")
    model_args = {k: args[k] for k in TIMM_CAIT_ARGS}
    model_args.update(num_classes=model.num_classes, init_values=model.init_values)
    config = {
        "architecture": "cait_xxs24_224",
        "model_args": to_jsonable(model_args),
        "pretrained_cfg": {"first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": True},
    }
    return Exported(export_timm_cait_state(model.state_dict()), config)


# --- registered variants -------------------------------------------------------------------------------------
# size -> (embed_dim, num_heads) (Table 1); LayerScale eps as the official checkpoints were trained (XXS-36 used
# 1e-5 where section 2.1's rule would give 1e-6).
_SIZES = {"xxs": (192, 4), "xs": (288, 6), "s": (384, 8), "m": (768, 16)}
_VARIANTS = {  # name -> (size, depth, LayerScale eps, image size)
    "cait_xxs24_224": ("xxs", 24, 1e-5, 224),
    "cait_xxs24_384": ("xxs", 24, 1e-5, 384),
    "cait_xxs36_224": ("xxs", 36, 1e-5, 224),
    "cait_xxs36_384": ("xxs", 36, 1e-5, 384),
    "cait_xs24_384": ("xs", 24, 1e-5, 384),
    "cait_s24_224": ("s", 24, 1e-5, 224),
    "cait_s24_384": ("s", 24, 1e-5, 384),
    "cait_s36_384": ("s", 36, 1e-6, 384),
    "cait_m36_384": ("m", 36, 1e-6, 384),
    "cait_m48_448": ("m", 48, 1e-6, 448),
}


def _cfg(img_size: int, in_chans: int = 3, num_classes: int = 1000) -> dict[str, Any]:
    # ImageNet statistics for the paper's models (DeiT's training recipe); 0.5 for the small ones
    imagenet = img_size >= 224
    return image_cfg(
        img_size,
        in_chans,
        num_classes=num_classes,
        paper=PAPER,
        mean=IMAGENET_DEFAULT_MEAN if imagenet else None,
        std=IMAGENET_DEFAULT_STD if imagenet else None,
    )


def _add_variant(
    name: str, size: str, depth: int, eps: float, img: int, patch: int = 16, in_chans: int = 3, num_classes: int = 1000
) -> None:
    dim, heads = _SIZES[size]
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "init_values": eps,
    }
    doc = f"CaiT-{size.upper()}{depth} at {img}x{img}: D={dim}, {heads} heads, 2 class-attention layers."
    register_variant(name, CaiT, kwargs, _cfg(img, in_chans, num_classes), doc)


for _name, (_size, _depth, _eps, _img) in _VARIANTS.items():
    _add_variant(_name, _size, _depth, _eps, _img)
# Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
_add_variant("cait_xxs24_patch4_28", "xxs", 24, 1e-5, 28, patch=4, in_chans=1, num_classes=10)
_add_variant("cait_xxs24_patch4_32", "xxs", 24, 1e-5, 32, patch=4, in_chans=3, num_classes=10)
