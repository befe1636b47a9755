"""CLIP: contrastive language-image pre-training.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
(arXiv:2103.00020). An image encoder and a text encoder are trained jointly so that the n real (image, text) pairs
of a batch score higher than the n^2 - n wrong ones; Figure 3's pseudo-code:

    I_f = image_encoder(I)                          # [n, d_i]
    T_f = text_encoder(T)                           # [n, d_t]
    I_e = l2_normalize(np.dot(I_f, W_i), axis=1)    # [n, d_e]   joint multimodal embedding
    T_e = l2_normalize(np.dot(T_f, W_t), axis=1)    # [n, d_e]
    logits = np.dot(I_e, T_e.T) * np.exp(t)         # [n, n]     scaled pairwise cosine similarities
    labels = np.arange(n)
    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    loss   = (loss_i + loss_t) / 2

W_i and W_t are linear maps without bias (section 2.4: "only a linear projection"); the temperature t is a learned
log-parameterised scalar "initialized to the equivalent of 0.07 ... and clipped to prevent scaling the logits by
more than 100" (section 2.5). Zero-shot classification embeds a prompt per class ("a photo of a {label}.") and
picks the class whose text embedding is nearest the image's (section 3.1.2; `vitlab.zeroshot`).

Here the image encoder is any registered vitlab image model (its pre-logits features: ``forward_head(...,
pre_logits=True)``), the text encoder one of `vitlab.models.text`. The API is open_clip's: ``encode_image``,
``encode_text``, ``forward(images, texts)`` with ``logits_per_image`` / ``logits_per_text``. HF transformers
``CLIPModel`` directories (OpenAI's weights) load through `convert_hf_clip`: the vision tower becomes a vitlab ViT
(``pre_norm`` for CLIP's ``ln_pre``, ``act="quick_gelu"``), the text tower a `TextTransformer`, and the tokenizer
comes from the directory's ``tokenizer.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._io import to_jsonable
from vitlab._registry import (
    Converted,
    Exported,
    build_model,
    build_variant,
    check_model_name,
    constructor_args,
    list_models,
    register_architecture,
    register_hf_converter,
    register_hf_exporter,
)
from vitlab.errors import VitlabError
from vitlab.layers import no_weight_decay_names
from vitlab.models._export import export_hf_encoder, refuse_options
from vitlab.models.text import (
    SOT,
    TOKENIZER_FILE,
    TextTokenizer,
    TextTransformer,
    build_text_tower,
    load_pretrained_text,
    text_context_length,
    text_tower_args,
)
from vitlab.models.vit import HF_VIT_FIXED, convert_hf_encoder_layers, full_pos_embed, hf_act, hf_hidden_act

PAPER = (
    "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021 "
    "(arXiv:2103.00020)"
)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPOutput(NamedTuple):
    logits_per_image: torch.Tensor  # [n_images, n_texts]: scaled cosine similarities
    logits_per_text: torch.Tensor  # [n_texts, n_images]: its transpose
    image_embeds: torch.Tensor  # [n_images, embed_dim], unit norm
    text_embeds: torch.Tensor  # [n_texts, embed_dim], unit norm
    logit_scale: torch.Tensor  # exp(t), at most max_logit_scale


def contrastive_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The symmetric cross-entropy of Figure 3, in fp32: the mean of the image -> text and the text -> image
    cross-entropies. ``logits_per_text`` defaults to the transpose and ``labels`` (the column of each row's pair)
    to the diagonal. A process holding a shard of a distributed batch passes its images' rows against every text,
    its texts' rows against every image, and the global indices of its pairs."""
    logits_i = logits_per_image.float()
    logits_t = logits_i.t() if logits_per_text is None else logits_per_text.float()
    if labels is None:
        labels = torch.arange(logits_i.shape[0], device=logits_i.device)
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


@register_architecture
class CLIP(nn.Module):
    arch = "clip"
    head_names: tuple[str, ...] = ()  # no classifier: nothing is reset when loading

    def __init__(
        self,
        *,
        image_model: str,
        text_model: str,
        text_args: dict[str, Any],
        image_args: dict[str, Any] | None = None,
        embed_dim: int = 512,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        lock_image: bool = False,
        lock_text: bool = False,
    ) -> None:
        super().__init__()
        # the image tower without its classifier: forward_head(..., pre_logits=True) is its feature I_f
        self.image_encoder = build_variant(image_model, **{**(image_args or {}), "num_classes": 0})
        self.text_encoder = build_text_tower(text_model, dict(text_args))
        self.image_proj = nn.Linear(self.image_encoder.num_features, embed_dim, bias=False)  # W_i
        self.text_proj = nn.Linear(self.text_encoder.num_features, embed_dim, bias=False)  # W_t
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # t, exp(t) = 1 / temperature
        # exp() of this float32 value stays below max_logit_scale (exp(float32(log 100)) is 100.0000076)
        self.max_log_scale = math.log(max_logit_scale) - 1e-6
        self.embed_dim = embed_dim
        self.context_length = text_context_length(text_model, text_args)
        self.lock_image, self.lock_text = lock_image, lock_text
        self.tokenizer: TextTokenizer | None = None
        nn.init.normal_(self.image_proj.weight, std=self.image_encoder.num_features**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text_encoder.num_features**-0.5)
        for locked, tower in ((lock_image, self.image_encoder), (lock_text, self.text_encoder)):
            if locked:
                tower.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> CLIP:
        """A locked tower stays in eval mode (no dropout, fixed normalisation statistics) while the rest trains."""
        super().train(mode)
        if self.lock_image:
            self.image_encoder.eval()
        if self.lock_text:
            self.text_encoder.eval()
        return self

    # --- towers --------------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the image tower's pre-logits features I_f [B, d_i] (what few-shot probes use)."""
        with torch.no_grad() if self.lock_image else nullcontext():
            enc = self.image_encoder
            return enc.forward_head(enc.forward_features(images), pre_logits=True)

    def text_features(self, texts: torch.Tensor | str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, L] (or strings, tokenized with the model's tokenizer) -> sentence features T_f [B, d_t]."""
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        with torch.no_grad() if self.lock_text else nullcontext():
            return self.text_encoder(ids)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise VitlabError("this CLIP model has no tokenizer: pass token ids, or load a checkpoint saved with one")
        return self.tokenizer(texts).to(self.logit_scale.device)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """I_e: the projected image embedding [B, embed_dim], unit length unless ``normalize=False``."""
        x = self.image_proj(self.image_features(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts: torch.Tensor | str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """T_e: the projected text embedding [B, embed_dim], unit length unless ``normalize=False``."""
        x = self.text_proj(self.text_features(texts))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(t), clipped at ``max_logit_scale`` (section 2.5)."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, images: torch.Tensor, texts: torch.Tensor | str | Sequence[str]) -> CLIPOutput:
        if self.training:
            # OpenAI clips the parameter after every optimizer step; clipping it before each training forward is the
            # same (the next use sees the clipped value) without a hook in the training loop, and keeps its
            # gradient alive, which clipping only the forward value would not once t passed the bound.
            with torch.no_grad():
                self.logit_scale.clamp_(max=self.max_log_scale)
        image_embeds, text_embeds = self.encode_image(images), self.encode_text(texts)
        scale = self.scale()
        logits_per_image = scale * image_embeds @ text_embeds.t()  # (n_images, n_texts)
        return CLIPOutput(logits_per_image, logits_per_image.t(), image_embeds, text_embeds, scale)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"} | no_weight_decay_names(image_encoder=self.image_encoder, text_encoder=self.text_encoder)

    # --- files beside the weights (`vitlab.checkpoint` calls these) -------------------------------------------------
    def save_files(self, directory: str | Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_files(self, directory: str | Path) -> None:
        if (Path(directory) / TOKENIZER_FILE).exists():
            self.tokenizer = TextTokenizer.load(directory, context_length=self.context_length)


def create_clip(
    image_model: str,
    text_model: str,
    *,
    image_args: dict[str, Any] | None = None,
    text_args: dict[str, Any] | None = None,
    tokenizer: TextTokenizer | None = None,
    embed_dim: int = 512,
    lock_image: bool = False,
    lock_text: bool = False,
    pretrained_text: bool = True,
    **kwargs: Any,
) -> CLIP:
    """A CLIP model from a registered image model and a named text tower (`vitlab.models.text.TEXT_MODELS`).

    A text transformer trained from scratch takes its vocabulary from ``tokenizer`` (e.g. `train_bpe_tokenizer` on
    the training captions); a pretrained tower (all_minilm_l6_v2) loads its weights and tokenizer unless
    ``pretrained_text=False``. ``image_args`` / ``text_args`` override the towers' sizes.
    """
    check_model_name(image_model)  # the registry's one-line error with suggestions, before anything is built
    args = text_tower_args(text_model, tokenizer=tokenizer, **(text_args or {}))
    init = {
        "image_model": image_model,
        "image_args": dict(image_args or {}),
        "text_model": text_model,
        "text_args": args,
        "embed_dim": embed_dim,
        "lock_image": lock_image,
        "lock_text": lock_text,
        **kwargs,
    }
    model = build_model(CLIP, "clip", init, {})
    model.default_cfg = {**model.image_encoder.default_cfg, "num_classes": 0, "paper": PAPER}
    loaded = load_pretrained_text(text_model, model.text_encoder, context_length=model.context_length)
    model.tokenizer = tokenizer or loaded
    return model


# --- HF transformers CLIPModel directories -> ours ------------------------------------------------------------------
# CLIP's encoder layer under the names of HF ViT's, so that ViT's converter maps it (q/k/v fused into qkv)
_HF_CLIP_LAYER = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.o_proj",
    "layer_norm1": "layernorm_before",
    "layer_norm2": "layernorm_after",
}


def _hf_tower_state(raw: dict[str, torch.Tensor], prefix: str, simple: dict[str, str]) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in raw.items():
        if not k.startswith(prefix) or k.endswith("position_ids"):  # position ids: a buffer older versions saved
            continue
        k = k[len(prefix) :].removeprefix("encoder.")
        for old, new in _HF_CLIP_LAYER.items():
            k = k.replace(f".{old}.", f".{new}.")
        sd[k] = v
    # the position (and class) embeddings change shape: the caller maps them
    return convert_hf_encoder_layers(
        sd, simple, skip=("embeddings.class_embedding", "embeddings.position_embedding.weight")
    )


def _hf_sub_config(config: dict[str, Any], key: str) -> dict[str, Any]:
    sub = config.get(key) or {}
    # HF's defaults for keys a config may leave out (CLIPTextConfig / CLIPVisionConfig)
    return {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **sub}


@register_hf_converter("clip")
def convert_hf_clip(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``CLIPModel`` directory -> a CLIP with a vitlab ViT image tower and a `TextTransformer` text tower."""
    v, t = _hf_sub_config(config, "vision_config"), _hf_sub_config(config, "text_config")
    image = _hf_tower_state(
        raw,
        "vision_model.",
        {
            "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
            "pre_layrnorm.weight": "norm_pre.weight",
            "pre_layrnorm.bias": "norm_pre.bias",
            "post_layernorm.weight": "norm.weight",  # LN of every token, then the class token: the same numbers
            "post_layernorm.bias": "norm.bias",
        },
    )
    image["cls_token"] = raw["vision_model.embeddings.class_embedding"].reshape(1, 1, -1)
    image["pos_embed"] = raw["vision_model.embeddings.position_embedding.weight"].unsqueeze(0)
    text = _hf_tower_state(
        raw,
        "text_model.",
        {
            "embeddings.token_embedding.weight": "token_embed.weight",
            "final_layer_norm.weight": "norm.weight",
            "final_layer_norm.bias": "norm.bias",
        },
    )
    text["pos_embed"] = raw["text_model.embeddings.position_embedding.weight"].unsqueeze(0)
    size, patch, width = v.get("image_size", 224), v.get("patch_size", 32), v["hidden_size"]
    image_args = {
        "img_size": size,
        "patch_size": patch,
        "in_chans": v.get("num_channels", 3),
        "embed_dim": width,
        "depth": v["num_hidden_layers"],
        "num_heads": v["num_attention_heads"],
        "mlp_ratio": v.get("intermediate_size", 4 * width) / width,
        "pre_norm": True,
        "norm_eps": v["layer_norm_eps"],
        "act": hf_act(v),
    }
    eos = t.get("eos_token_id", 49407)
    text_args = {
        "vocab_size": t.get("vocab_size", 49408),
        "eot_token_id": eos,
        "context_length": t.get("max_position_embeddings", 77),
        "width": t["hidden_size"],
        "depth": t["num_hidden_layers"],
        "num_heads": t["num_attention_heads"],
        "mlp_ratio": t.get("intermediate_size", 4 * t["hidden_size"]) / t["hidden_size"],
        "act": hf_act(t),
        "norm_eps": t["layer_norm_eps"],
        "pool": "argmax" if eos == 2 else "eot",  # HF keeps the legacy argmax pooling for eos_token_id == 2
    }
    name = f"vit_base_patch{patch}_{size}"  # the closest registered name; image_args set every size
    kwargs = {
        "image_model": name if name in list_models() else "vit_base_patch16_224",
        "image_args": image_args,
        "text_model": "text_transformer",
        "text_args": text_args,
        "embed_dim": config.get("projection_dim", 512),
    }
    state = {
        **{f"image_encoder.{k}": w for k, w in image.items()},
        **{f"text_encoder.{k}": w for k, w in text.items()},
        "image_proj.weight": raw["visual_projection.weight"],
        "text_proj.weight": raw["text_projection.weight"],
        "logit_scale": raw["logit_scale"].reshape(()),
    }
    cfg = {
        "input_size": (image_args["in_chans"], size, size),
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "num_classes": 0,
        "interpolation": "bicubic",
        "paper": PAPER,
    }
    return Converted("clip", state, kwargs, cfg)


# --- ours -> HF transformers CLIPModel ------------------------------------------------------------------------------
_HF_CLIP_EXPORT_LAYER = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_CLIP_EXPORT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# what HF's CLIPVisionModel builds one way: a ViT with CLIP's ln_pre, a class token it pools, biased projections
HF_CLIP_IMAGE_FIXED = {**HF_VIT_FIXED, "pre_norm": True, "qkv_bias": True}
HF_LEGACY_EOS = 2  # HF CLIP pools the largest token id instead of the end-of-text token when eos_token_id == 2


def _hf_clip_tower(state: dict[str, torch.Tensor], prefix: str, simple: dict[str, str]) -> dict[str, torch.Tensor]:
    encoder = export_hf_encoder(
        state, simple, layer="encoder.layers", names=_HF_CLIP_EXPORT_LAYER, qkv=_HF_CLIP_EXPORT_QKV
    )
    return {prefix + k: v for k, v in encoder.items()}


def _hf_clip_vision(image: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if getattr(image, "arch", None) != "vit":
        raise VitlabError(f"a CLIP image tower of architecture {image.arch!r} has no HF CLIP counterpart (a ViT has)")
    args = constructor_args(image)
    refuse_options(args, HF_CLIP_IMAGE_FIXED, "HF transformers' CLIP vision tower")
    (h, w), (ph, pw) = image.patch_embed.img_size, image.patch_embed.patch_size
    if h != w or ph != pw:
        raise VitlabError(f"img_size={[h, w]}, patch_size={[ph, pw]}: HF's CLIP vision tower takes square ones")
    body = {k: v for k, v in image.state_dict().items() if k not in ("cls_token", "pos_embed")}
    simple = {
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "norm_pre.weight": "pre_layrnorm.weight",
        "norm_pre.bias": "pre_layrnorm.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    state = _hf_clip_tower(body, "vision_model.", simple)
    state["vision_model.embeddings.class_embedding"] = image.cls_token.detach().reshape(-1)
    state["vision_model.embeddings.position_embedding.weight"] = full_pos_embed(image)[0]
    config = {
        "hidden_size": image.embed_dim,
        "intermediate_size": image.blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(image.blocks),
        "num_attention_heads": image.blocks[0].attn.num_heads,
        "image_size": h,
        "patch_size": ph,
        "num_channels": image.patch_embed.in_chans,
        "hidden_act": hf_hidden_act(args["act"]),
        "layer_norm_eps": args["norm_eps"],
    }
    return state, config


def _hf_clip_text(model: CLIP) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    text = model.text_encoder
    if not isinstance(text, TextTransformer):
        raise VitlabError(
            f"text model {model.init_kwargs['text_model']!r} has no HF CLIP counterpart (a causal text transformer has)"
        )
    args = dict(model.init_kwargs["text_args"])
    eos = HF_LEGACY_EOS if text.pool == "argmax" else text.eot_token_id
    if text.pool == "eot" and eos == HF_LEGACY_EOS:
        # vitlab's BPE puts [EOS] at id 2 (after padding and [SOS]); HF would pool the largest id there instead
        raise VitlabError(
            "the text tower's end-of-text token has id 2, which HF CLIP reads as its legacy argmax "
            "pooling; HF cannot express pooling at [EOS] with this vocabulary"
        )
    body = {k: v for k, v in text.state_dict().items() if k != "pos_embed"}
    simple = {
        "token_embed.weight": "embeddings.token_embedding.weight",
        "norm.weight": "final_layer_norm.weight",
        "norm.bias": "final_layer_norm.bias",
    }
    state = _hf_clip_tower(body, "text_model.", simple)
    state["text_model.embeddings.position_embedding.weight"] = text.pos_embed.detach()[0]
    tok = model.tokenizer
    config = {
        "vocab_size": text.token_embed.num_embeddings,
        "hidden_size": text.num_features,
        "intermediate_size": text.blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(text.blocks),
        "num_attention_heads": text.blocks[0].attn.num_heads,
        "max_position_embeddings": text.context_length,
        "hidden_act": hf_hidden_act(args.get("act", "gelu")),
        "layer_norm_eps": text.norm.eps,
        "eos_token_id": eos,
        "bos_token_id": tok.token_id(SOT) if tok is not None and tok.tokenizer.token_to_id(SOT) is not None else None,
        "pad_token_id": tok.pad_id if tok is not None else None,
    }
    return state, config


@register_hf_exporter("clip")
def export_hf_clip(model: nn.Module) -> Exported:
    """CLIP with a ViT image tower (CLIP's ``pre_norm``) and a causal `TextTransformer` -> HF ``CLIPModel``; the
    logit scale is written clipped, as ours applies it (HF does not clip)."""
    image_state, vision = _hf_clip_vision(model.image_encoder)
    text_state, text = _hf_clip_text(model)
    state = {
        **image_state,
        **text_state,
        "visual_projection.weight": model.image_proj.weight,
        "text_projection.weight": model.text_proj.weight,
        "logit_scale": model.logit_scale.detach().clamp(max=model.max_log_scale),
    }
    config = {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": float(state["logit_scale"]),
        "vision_config": {**vision, "projection_dim": model.embed_dim},
        "text_config": {**text, "projection_dim": model.embed_dim},
    }
    # our evaluation preprocessing (a resize to the input size), in the processor CLIPProcessor expects
    processor = {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False, "do_convert_rgb": True}
    return Exported(state, to_jsonable(config), processor, _compare_hf_clip)


@torch.no_grad()
def _compare_hf_clip(ours: nn.Module, theirs: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text logits of ours and HF's CLIPModel for 3 images and 4 texts, each with its end-of-text token at a
    different position."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, *ours.default_cfg["input_size"], generator=g)
    text = ours.text_encoder
    L = min(text.context_length, 8)
    ids = torch.randint(0, text.token_embed.num_embeddings, (4, L), generator=g)
    ids[torch.arange(4), torch.arange(4) % L] = text.eot_token_id  # (4, L)
    got = theirs(input_ids=ids, pixel_values=images).logits_per_image
    return ours(images, ids).logits_per_image, got
