"""DeiT: data-efficient image transformers and distillation through attention.

Touvron, Cord, Douze, Massa, Sablayrolles and Jégou, "Training data-efficient image transformers & distillation
through attention", ICML 2021 (arXiv:2012.12877).

A DeiT without distillation is the ViT of Dosovitskiy et al. trained with a stronger recipe: `deit_*_patch16_224`
build `VisionTransformer` with DeiT's sizes (Tiny D 192 / 3 heads, Small 384 / 6, Base 768 / 12; 12 layers, MLP ratio
4) and ImageNet normalisation. The distilled models (section 4) add one learned *distillation token* beside the class
token:

    z_0 = [x_class; x_distil; x_p^1 E; ...; x_p^N E] + E_pos,   E_pos in R^{(N+2) x D}

Both tokens go through every block and attend to each other and to the patches. After the final LayerNorm the class
token feeds ``head`` and the distillation token its own linear ``head_dist``. Training (see `vitlab.train.tasks`)
matches ``head`` to the true label and ``head_dist`` to the teacher:

    hard:  L = 1/2 CE(psi(Z_s), y) + 1/2 CE(psi(Z_s^dist), y_t),   y_t = argmax_c Z_t(c)
    soft:  L = (1 - lambda) CE(psi(Z_s), y) + lambda tau^2 KL(psi(Z_t / tau) || psi(Z_s^dist / tau))

At test time the two heads are fused by averaging their logits, as the authors' code does (the paper's text speaks of
adding the two softmax outputs). ``set_distilled_training(True)`` makes forward in training mode return the pair
``(cls_logits, dist_logits)`` instead, so that the distillation task can give each head its own loss.

DeiT III (Touvron, Cord and Jégou, "DeiT III: Revenge of the ViT", ECCV 2022) trains the plain ViT again, with
LayerScale; `deit3_*` are those ViTs in timm's layout of the published weights, whose position embeddings cover the
patches only (``no_embed_class``: the class token joins after them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitlab._registry import (
    Converted,
    Exported,
    register_architecture,
    register_hf_converter,
    register_hf_exporter,
    register_timm_converter,
    register_timm_exporter,
    register_variant,
)
from vitlab.errors import VitlabError
from vitlab.models._head import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, image_cfg
from vitlab.models.vit import (
    HF_VIT_NAMES,
    VisionTransformer,
    check_timm_vit_options,
    convert_hf_encoder_layers,
    hf_vit_export,
    hf_vit_kwargs,
    infer_vit_args,
    is_timm_vit,
    timm_vit_args,
)

PAPER = (
    "Touvron et al., Training data-efficient image transformers & distillation through attention, "
    "ICML 2021 (arXiv:2012.12877)"
)


@register_architecture
class VisionTransformerDistilled(VisionTransformer):
    """ViT with DeiT's distillation token and head. Takes every `VisionTransformer` argument (class-token pooling
    only) plus ``dist_head``: False keeps the distillation token in the sequence but classifies the class token
    alone, as HF's ``DeiTForImageClassification`` and ``DeiTModel`` (whose pooler reads token 0) do."""

    arch = "deit"
    head_names = ("head", "head_dist")  # both classifiers are replaced together for another number of classes

    def __init__(self, *, dist_head: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # a ViT with one prefix token; the second one and its head are added below
        if self.cls_token is None or self.global_pool != "token":
            raise VitlabError(
                "a distilled DeiT pools its class and distillation tokens: keep class_token=True and "
                "global_pool='token'"
            )
        self.dist_head = dist_head
        self.distilled_training = False
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if self.pos_embed is not None:  # E_pos covers both prefix tokens
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.num_pos_prefix_tokens + self.patch_embed.num_patches, self.embed_dim),
                requires_grad=self.pos_embed.requires_grad,
            )
        self.head_dist = self._new_dist_head()
        self._init_distillation()

    def _new_dist_head(self) -> nn.Module | None:
        if not self.dist_head:
            return None
        if self.num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, self.num_classes, device=self.dist_token.device)
        nn.init.zeros_(head.weight)  # zero-initialised like the class head: both start from uniform predictions
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def _init_distillation(self) -> None:
        nn.init.trunc_normal_(self.dist_token, std=0.02)  # as DeiT's code
        self._init_pos_embed()
        if isinstance(self.head_dist, nn.Linear):
            nn.init.zeros_(self.head_dist.weight)
            nn.init.zeros_(self.head_dist.bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "dist_token"):  # VisionTransformer.__init__ calls this before the token exists
            self._init_distillation()

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def prefix_tokens(self) -> list[torch.Tensor]:
        return [self.cls_token, self.dist_token]

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(cls_logits, dist_logits)`` from forward instead of their average."""
        if enable and not self.dist_head:
            raise VitlabError("this DeiT has no distillation head (dist_head=False); it cannot train with a teacher")
        self.distilled_training = enable

    # --- head ------------------------------------------------------------------------------------------------
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Both prefix tokens [B, 2, D] (class, distillation); the class token [B, D] without a distillation head."""
        return x[:, :2] if self.dist_head else x[:, 0]

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits averaged over the two heads (a pair while distilled training). ``pre_logits=True`` returns the
        average of the two tokens' features [B, num_features] (timm's choice): the one vector that, like the fused
        prediction, draws on both tokens, and exactly what both heads read when they are equal."""
        if not self.dist_head:
            return super().forward_head(x, pre_logits)
        x = self.pre_logits(self.head_drop(self.fc_norm(self.pool(x))))  # (B, 2, F)
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        x_cls, x_dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.distilled_training and self.training:
            return x_cls, x_dist
        return (x_cls + x_dist) / 2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise VitlabError("a distilled DeiT pools its class and distillation tokens; global_pool stays 'token'")
        super().reset_classifier(num_classes)
        self.head_dist = self._new_dist_head()


# --- checkpoint converters: HF transformers and timm names -> ours ---------------------------------------------
HF_DEIT_NAMES = {
    **HF_VIT_NAMES,  # DeiTForImageClassification's ``classifier`` reads the class token, as ViT's
    "embeddings.distillation_token": "dist_token",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
}


@register_hf_converter("deit")
def convert_hf_deit(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``DeiTModel``, ``DeiTForImageClassification`` or ``DeiTForImageClassificationWithTeacher``. All three
    carry the distillation token; only the last has the distillation head (found by its weights, or by the saved
    architecture name when it was built without classes and both heads are identities)."""
    sd = {k.removeprefix("deit."): v for k, v in raw.items()}
    # the mask token is only used by the masked-image-modelling head
    state = convert_hf_encoder_layers(sd, HF_DEIT_NAMES, skip=("embeddings.mask_token",))
    with_teacher = "DeiTForImageClassificationWithTeacher" in (config.get("architectures") or [])
    kwargs = {**hf_vit_kwargs(config, state), "dist_head": "head_dist.weight" in state or with_teacher}
    return Converted("deit", state, kwargs, _cfg(224, kwargs["in_chans"]))


def _is_timm_deit(state: dict[str, torch.Tensor]) -> bool:
    return "dist_token" in state and is_timm_vit(state)


@register_timm_converter(_is_timm_deit, priority=10)  # a distilled DeiT state dict is a ViT one plus dist_token
def convert_timm_deit(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm's names are ours; the position embedding covers two prefix tokens."""
    check_timm_vit_options(state)
    kwargs, unknown, source_img = infer_vit_args(state, declared, extra_prefix_tokens=1)
    kwargs["dist_head"] = "head_dist.weight" in state or "head.weight" not in state
    return Converted("deit", dict(state), kwargs, _cfg(224, kwargs["in_chans"]), source_img, unknown)


# --- checkpoint exporters: ours -> HF transformers and timm names ----------------------------------------------
@register_hf_exporter("deit")
def export_hf_deit(model: nn.Module) -> Exported:
    """A distilled DeiT -> HF ``DeiTForImageClassificationWithTeacher`` (the mean of the two heads' logits, as
    ours in eval mode), or ``DeiTForImageClassification`` without a distillation head (the class token's)."""
    names = {ours: hf for hf, ours in HF_DEIT_NAMES.items() if not hf.startswith("classifier.")}
    if not model.dist_head:  # HF's DeiTForImageClassification names its one classifier as ViT's does
        names.update({"head.weight": "classifier.weight", "head.bias": "classifier.bias"})
    state, config = hf_vit_export(model, names, "deit.")
    cls = "DeiTForImageClassificationWithTeacher" if model.dist_head else "DeiTForImageClassification"
    return Exported(state, {"model_type": "deit", "architectures": [cls], **config})


@register_timm_exporter("deit")
def export_timm_deit(model: nn.Module) -> Exported:
    """A distilled DeiT -> timm's VisionTransformerDistilled (the names are the same)."""
    if not model.dist_head:
        raise VitlabError("dist_head=False cannot be expressed in timm's distilled DeiT, which always has head_dist")
    config = {
        "architecture": "deit_base_distilled_patch16_224",
        "model_args": timm_vit_args(model),
        "pretrained_cfg": {
            "first_conv": "patch_embed.proj",
            "classifier": ["head", "head_dist"],
            "fixed_input_size": True,
        },
    }
    return Exported(dict(model.state_dict()), config)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (embed_dim, depth, num_heads), Table 1 of the paper; MLP ratio 4.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    # ImageNet statistics; another number of channels gets their channel average (grayscale: 0.449 / 0.226)
    mean = IMAGENET_DEFAULT_MEAN if in_chans == 3 else (sum(IMAGENET_DEFAULT_MEAN) / 3,) * in_chans
    std = IMAGENET_DEFAULT_STD if in_chans == 3 else (sum(IMAGENET_DEFAULT_STD) / 3,) * in_chans
    rounded = {"mean": tuple(round(m, 3) for m in mean), "std": tuple(round(s, 3) for s in std)}
    return image_cfg(img_size, in_chans, paper=PAPER, **rounded, **extra)


def _add_variant(size: str, patch: int, img: int, *, distilled: bool, in_chans: int = 3, num_classes: int = 1000):
    dim, depth, heads = _SIZES[size]
    name = f"deit_{size}_{'distilled_' if distilled else ''}patch{patch}_{img}"
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
    }
    kind = "distilled (class + distillation tokens)" if distilled else "ViT"
    doc = f"DeiT-{size[0].upper()}/{patch} {kind} at {img}x{img}: D={dim}, {depth} layers, {heads} heads."
    register_variant(name, cls, kwargs, _cfg(img, in_chans, num_classes=num_classes), doc)


for _distilled in (False, True):
    for _size in _SIZES:
        _add_variant(_size, 16, 224, distilled=_distilled)
    _add_variant("base", 16, 384, distilled=_distilled)
    # Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
    _add_variant("tiny", 4, 28, distilled=_distilled, in_chans=1, num_classes=10)
    _add_variant("tiny", 7, 28, distilled=_distilled, in_chans=1, num_classes=10)
    _add_variant("small", 4, 28, distilled=_distilled, in_chans=1, num_classes=10)
    _add_variant("tiny", 4, 32, distilled=_distilled, num_classes=10)
    _add_variant("small", 4, 32, distilled=_distilled, num_classes=10)


# DeiT III: size -> (embed_dim, depth, num_heads, patch); LayerScale starts at 1e-6 (the paper's code, as timm's)
_DEIT3 = {"small": (384, 12, 6, 16), "base": (768, 12, 12, 16), "large": (1024, 24, 16, 16), "huge": (1280, 32, 16, 14)}


def _add_deit3(size: str, img: int) -> None:
    dim, depth, heads, patch = _DEIT3[size]
    kwargs = {
        "img_size": img,
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "init_values": 1e-6,
        "no_embed_class": True,
    }
    doc = f"DeiT III {size} /{patch} at {img}x{img}: D={dim}, {depth} layers, {heads} heads, LayerScale."
    register_variant(f"deit3_{size}_patch{patch}_{img}", VisionTransformer, kwargs, _cfg(img), doc)


for _size in _DEIT3:
    _add_deit3(_size, 224)
for _size in ("small", "base", "large"):
    _add_deit3(_size, 384)
