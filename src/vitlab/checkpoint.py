"""Saving and loading models: vitlab checkpoints, HF transformers ViT directories, timm ViT state dicts.

A vitlab checkpoint is a directory with ``model.safetensors`` (the state dict) and ``config.json`` (architecture,
constructor arguments, class names, normalisation, anything else the caller adds). Foreign checkpoints are mapped
to vitlab's parameter names here, in one converter per source; the model modules are never renamed to suit them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab._io import atomic_directory, to_jsonable, write_json
from vitlab._registry import build_model, create_model, get_architecture, get_variant
from vitlab.errors import VitlabError
from vitlab.layers import resample_pos_embed

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# --- saving --------------------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, directory: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` to ``directory`` atomically as model.safetensors + config.json.

    ``metadata`` goes into config.json; ``class_names``, ``mean`` and ``std`` are the ones `from_pretrained` and
    `vitlab predict` read back (they default to the model's own).
    """
    with atomic_directory(directory) as tmp:
        write_pretrained(model, tmp, **metadata)
    return Path(directory)


def write_pretrained(model: nn.Module, directory: Path, **metadata: Any) -> None:
    """Write the checkpoint files into an existing directory (callers make it atomic, see `save_pretrained`)."""
    from safetensors.torch import save_file

    if not hasattr(model, "init_kwargs"):
        raise VitlabError("save_pretrained needs a model built by vitlab.create_model or vitlab.from_pretrained")
    cfg = dict(model.default_cfg)
    pcfg = getattr(model, "pretrained_cfg", {})
    config = {
        "vitlab_version": _version(),
        "architecture": model.arch,
        "model_name": model.model_name,
        "model_args": to_jsonable(model.init_kwargs),
        "num_classes": getattr(model, "num_classes", cfg.get("num_classes")),
        "input_size": cfg.get("input_size"),
        "mean": pcfg.get("mean", cfg.get("mean")),
        "std": pcfg.get("std", cfg.get("std")),
        "class_names": pcfg.get("class_names"),
    }
    config.update(metadata)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config)


def _version() -> str:
    from vitlab import __version__

    return __version__


# --- loading -------------------------------------------------------------------------------------------------
def from_pretrained(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    map_location: str | torch.device = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Build a model with weights from a vitlab checkpoint directory, a HF transformers ViT directory, or a timm
    ViT state dict file (.pth / .bin / .safetensors).

    ``overrides`` change constructor arguments: ``img_size=384`` resamples the position embeddings,
    ``num_classes=10`` keeps the backbone and starts a new classifier. ``model_name`` picks the variant for a bare
    state dict (otherwise its sizes are read off the tensor shapes, assuming 64-dimensional heads).
    """
    path = Path(path)
    if not path.exists():
        raise VitlabError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        config = _read_json(path / CONFIG_NAME)
        if "architecture" in config and "model_args" in config:
            return _load_vitlab(path, config, map_location, overrides)
        if config.get("model_type") == "vit":
            return _load_hf_vit(path, config, map_location, overrides)
        raise VitlabError(
            f"{path / CONFIG_NAME} is neither a vitlab checkpoint nor a HF transformers ViT config "
            f"(model_type={config.get('model_type')!r})"
        )
    state = _unwrap_state_dict(read_state_dict(path, map_location))
    return _load_timm_vit(state, model_name, overrides, source=str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VitlabError(f"{str(path)!r} is missing: a checkpoint directory needs one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitlabError(f"cannot read {str(path)!r}: {e}") from None


def read_state_dict(file: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch pickle file, with a one-line error naming the file when it is unreadable."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device=str(map_location))
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise VitlabError(f"checkpoint file {str(file)!r} is missing") from None
    except Exception as e:  # safetensors, pickle and zip raise many types for a truncated or corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(f"checkpoint file {str(file)!r} is corrupt or unreadable ({first})") from None


def _find_weights(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).exists():
            return directory / name
    raise VitlabError(f"no weights in {str(directory)!r}: expected one of {', '.join(names)}")


def _finish(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Attach class names and normalisation from a checkpoint's config to the model."""
    pcfg = {k: config[k] for k in ("class_names", "mean", "std") if config.get(k) is not None}
    model.pretrained_cfg = pcfg
    for k in ("mean", "std"):
        if k in pcfg:
            model.default_cfg[k] = tuple(pcfg[k])
    return model.eval()


def _load_vitlab(path: Path, config: dict[str, Any], map_location: Any, overrides: dict[str, Any]) -> nn.Module:
    cls = get_architecture(config["architecture"])
    name = config.get("model_name", config["architecture"])
    try:
        _, _, default_cfg = get_variant(name)
    except VitlabError:
        default_cfg = {"input_size": config.get("input_size"), "mean": config.get("mean"), "std": config.get("std")}
    kwargs = dict(config["model_args"])
    ckpt_kwargs = dict(kwargs)
    kwargs.update(overrides)
    model = build_model(cls, name, kwargs, default_cfg)
    state = read_state_dict(_find_weights(path, (WEIGHTS_NAME,)), map_location)
    load_checkpoint_state(model, state, old_img_size=ckpt_kwargs.get("img_size"), source=str(path))
    classes = config.get("class_names")
    if classes is not None and getattr(model, "num_classes", None) != len(classes):
        config = {**config, "class_names": None}  # a new head: the old class names no longer apply
    return _finish(model, config)


def load_checkpoint_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, old_img_size: Any = None, source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` strictly, adapting what a change of resolution or of classes needs.

    * position embeddings for another grid are resampled (2D bicubic, prefix tokens kept apart, in fp32);
    * a classifier with another number of classes is left at the model's fresh initialisation;
    * any other mismatch is an error naming the parameter and both shapes.
    """
    state = dict(state)
    own = model.state_dict()
    pe = state.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        prefix = model.num_prefix_tokens
        old_grid = None
        if old_img_size is not None:
            h, w = (old_img_size, old_img_size) if isinstance(old_img_size, int) else old_img_size
            ph, pw = model.patch_embed.patch_size
            old_grid = (h // ph, w // pw)
        state["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, old_grid, prefix)
    head = ("head.weight", "head.bias")
    for k in head:
        if k in state and k in own and state[k].shape != own[k].shape:
            del state[k]  # another number of classes: keep the model's fresh classifier
    fresh = {k for k in head if k in own and k not in state}
    missing = [k for k in own if k not in state and k not in fresh]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise VitlabError(f"{source}: parameter {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise VitlabError(
            f"{source}: parameter {unexpected[0]!r} does not exist in {type(model).__name__} "
            f"({len(unexpected)} unexpected in all)"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise VitlabError(
                f"{source}: parameter {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                f"{tuple(own[k].shape)} in the model"
            )
    model.load_state_dict(state, strict=not fresh)


# --- HF transformers ViT -------------------------------------------------------------------------------------
_HF_ACT = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _load_hf_vit(path: Path, config: dict[str, Any], map_location: Any, overrides: dict[str, Any]) -> nn.Module:
    raw = read_state_dict(_find_weights(path, ("model.safetensors", "pytorch_model.bin")), map_location)
    state, has_classifier, has_pooler = convert_hf_vit_state(raw)
    act = config.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise VitlabError(f"{path}: hidden_act {act!r} is not supported; vitlab knows {sorted(_HF_ACT)}")
    id2label = config.get("id2label") or {}
    num_classes = state["head.weight"].shape[0] if has_classifier else 0
    hidden = config["hidden_size"]
    img = config.get("image_size", 224)
    patch = config.get("patch_size", 16)
    kwargs = {
        "img_size": list(img) if isinstance(img, (list, tuple)) else img,
        "patch_size": list(patch) if isinstance(patch, (list, tuple)) else patch,
        "in_chans": config.get("num_channels", 3),
        "num_classes": num_classes,
        "embed_dim": hidden,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
        "qkv_bias": config.get("qkv_bias", True),
        "norm_eps": config.get("layer_norm_eps", 1e-12),
        "act": _HF_ACT[act],
        "head_hidden_dim": state["pre_logits.fc.weight"].shape[0] if has_pooler else None,
        "pos_drop_rate": config.get("hidden_dropout_prob", 0.0),
        "proj_drop_rate": config.get("hidden_dropout_prob", 0.0),
        "attn_drop_rate": config.get("attention_probs_dropout_prob", 0.0),
    }
    ckpt_img = kwargs["img_size"]
    kwargs.update(overrides)
    model = build_model(get_architecture("vit"), "vit_hf", kwargs, _default_cfg_for(kwargs))
    load_checkpoint_state(model, state, old_img_size=ckpt_img, source=str(path))
    names = [id2label[str(i)] for i in range(len(id2label))] if len(id2label) == num_classes and num_classes else None
    if getattr(model, "num_classes", 0) != num_classes:
        names = None
    return _finish(model, {"class_names": names, "mean": config.get("image_mean"), "std": config.get("image_std")})


def convert_hf_vit_state(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """Map HF ``ViTModel`` / ``ViTForImageClassification`` parameter names to vitlab's.

    HF keeps separate query / key / value projections; vitlab's fused ``qkv`` is their concatenation along the
    output dimension, in that order.
    """
    sd = {k.removeprefix("vit."): v for k, v in raw.items()}
    out: dict[str, torch.Tensor] = {}
    simple = {
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
    # per-layer names in saved files (all transformers versions) and in transformers 5's in-memory modules
    per_layer = {
        "attention.output.dense": "attn.proj",
        "attention.o_proj": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    qkv_part = {
        "attention.attention.query": "q",
        "attention.attention.key": "k",
        "attention.attention.value": "v",
        "attention.q_proj": "q",
        "attention.k_proj": "k",
        "attention.v_proj": "v",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer_re = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        if k == "embeddings.mask_token":
            continue  # only used by masked-image-modelling heads
        m = layer_re.match(k)
        if not m:
            raise VitlabError(f"HF checkpoint parameter {k!r} has no vitlab counterpart")
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        if mod in qkv_part:
            qkv.setdefault((i, kind), {})[qkv_part[mod]] = v
        elif mod in per_layer:
            out[f"blocks.{i}.{per_layer[mod]}.{kind}"] = v
        else:
            raise VitlabError(f"HF checkpoint parameter {k!r} has no vitlab counterpart")
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, "head.weight" in out, "pre_logits.fc.weight" in out


# --- timm ViT state dicts ------------------------------------------------------------------------------------
def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept {'model': sd}, {'state_dict': sd}, {'state_dict_ema': sd} and DDP's 'module.' prefix."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "state_dict_ema", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitlabError("the checkpoint file does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_timm_vit(
    state: dict[str, torch.Tensor], model_name: str | None, overrides: dict[str, Any], source: str
) -> nn.Module:
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise VitlabError(f"{source}: not a timm ViT state dict (no patch_embed.proj / blocks.0.attn.qkv weights)")
    for key in ("reg_token", "norm_pre.weight", "blocks.0.attn.proj.weight_g"):
        if key in state:
            raise VitlabError(f"{source}: timm ViT option with parameter {key!r} is not supported by vitlab yet")
    kwargs = infer_vit_args(state)
    ckpt_img = kwargs["img_size"]
    if model_name is not None:
        model = create_model(model_name, **overrides)
    else:
        kwargs.update(overrides)
        model = build_model(get_architecture("vit"), "vit_timm", kwargs, _default_cfg_for(kwargs))
    load_checkpoint_state(model, state, old_img_size=ckpt_img, source=source)
    return _finish(model, {})


def infer_vit_args(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read ViT constructor arguments off a timm-named state dict's tensor shapes."""
    w = state["patch_embed.proj.weight"]  # (D, C, P, P)
    D, C, ph, pw = w.shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    class_token = "cls_token" in state
    prefix = 1 if class_token else 0
    if "pos_embed" in state:
        n = state["pos_embed"].shape[1] - prefix
        side = math.isqrt(n)
        if side * side != n:
            raise VitlabError(f"cannot infer the image size from {n} position embeddings; pass model_name=")
        img = [side * ph, side * pw]
    else:
        img = [224, 224]
    fc_norm = "fc_norm.weight" in state
    return {
        "img_size": img,
        "patch_size": [ph, pw],
        "in_chans": C,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "global_pool": "avg" if fc_norm or not class_token else "token",
        "embed_dim": D,
        "depth": depth,
        "num_heads": max(D // 64, 1),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in state else None,
        "class_token": class_token,
        "pos_embed": "learn" if "pos_embed" in state else "none",
        "fc_norm": fc_norm,
        "head_hidden_dim": state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
    }


def _default_cfg_for(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The default_cfg of a ViT built from foreign arguments (build_model fills in input size and classes)."""
    from vitlab.models.vit import _cfg

    return _cfg(224, kwargs.get("in_chans", 3))
