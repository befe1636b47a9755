"""Saving and loading models: vitlab checkpoints, HF transformers directories, timm state dicts.

A vitlab checkpoint is a directory with ``model.safetensors`` (the state dict) and ``config.json`` (architecture,
constructor arguments, class names, normalisation, anything else the caller adds). Foreign checkpoints are mapped
to vitlab's parameter names by the converter each model family registers beside its model (`register_hf_converter`,
`register_timm_converter`); this module only dispatches, and the model modules are never renamed to suit a source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab._io import atomic_directory, to_jsonable, write_json
from vitlab._registry import (
    Converted,
    build_model,
    create_model,
    get_architecture,
    get_variant,
    hf_converter,
    hf_model_types,
    timm_converter,
)
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
    """Build a model with weights from a vitlab checkpoint directory, a HF transformers ``save_pretrained``
    directory, or a timm state dict file (.pth / .bin / .safetensors), of any family that registers a converter.

    ``overrides`` change constructor arguments: ``img_size=384`` resamples the position embeddings,
    ``num_classes=10`` keeps the backbone and starts a new classifier. ``model_name`` picks the variant for a bare
    state dict (otherwise its sizes are read off the tensor shapes).
    """
    path = Path(path)
    if not path.exists():
        raise VitlabError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        config = _read_json(path / CONFIG_NAME)
        if "architecture" in config and "model_args" in config:
            return _load_vitlab(path, config, map_location, overrides)
        return _load_hf(path, config, map_location, overrides)
    state = _unwrap_state_dict(read_state_dict(path, map_location))
    return _load_timm(state, model_name, overrides, source=str(path))


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


def _build_converted(conv: Converted, overrides: dict[str, Any], model_name: str | None, source: str) -> nn.Module:
    """Build the model a converted foreign checkpoint fits (or the named variant) and load its weights."""
    if model_name is not None:
        model = create_model(model_name, **overrides)
    else:
        kwargs = {**conv.kwargs, **overrides}
        model = build_model(get_architecture(conv.arch), f"{conv.arch}_foreign", kwargs, conv.default_cfg)
    load_checkpoint_state(model, conv.state, old_img_size=conv.kwargs.get("img_size"), source=source)
    return model


def _load_hf(path: Path, config: dict[str, Any], map_location: Any, overrides: dict[str, Any]) -> nn.Module:
    """A HF transformers ``save_pretrained`` directory: the family's converter maps names and arguments; class
    names come from ``id2label``, normalisation and input size from ``preprocessor_config.json`` when present
    (every published checkpoint has one; DeiT's ImageNet statistics differ from ViT's 0.5)."""
    model_type = config.get("model_type")
    convert = hf_converter(model_type)
    if convert is None:
        raise VitlabError(
            f"{path / CONFIG_NAME} is neither a vitlab checkpoint nor a HF transformers config of a supported "
            f"family (model_type={model_type!r}; vitlab reads {', '.join(hf_model_types())})"
        )
    raw = read_state_dict(_find_weights(path, ("model.safetensors", "pytorch_model.bin")), map_location)
    try:
        conv = convert(config, raw)
    except VitlabError as e:
        raise VitlabError(f"{path}: {e}") from None
    prep = path / "preprocessor_config.json"
    pre = _read_json(prep) if prep.exists() else {}
    size = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
    if isinstance(size, int) or (isinstance(size, dict) and set(size) == {"shortest_edge"}):
        # ConvNeXt-style processors (CvT's published ones): one side, and the image comes out square
        side = size if isinstance(size, int) else size["shortest_edge"]
        size = {"height": side, "width": side}
    if isinstance(size, dict) and "height" in size and "width" in size and "img_size" not in overrides:
        conv.default_cfg["input_size"] = (conv.default_cfg["input_size"][0], size["height"], size["width"])
    model = _build_converted(conv, overrides, None, str(path))  # a fixed img_size argument wins over the above
    num_classes = getattr(model, "num_classes", 0)
    id2label = config.get("id2label") or {}
    names = [id2label[str(i)] for i in range(num_classes)] if num_classes and len(id2label) == num_classes else None
    if num_classes and conv.kwargs.get("num_classes") != num_classes:
        names = None  # a new head: the old class names no longer apply
    mean = pre.get("image_mean", config.get("image_mean"))
    std = pre.get("image_std", config.get("image_std"))
    return _finish(model, {"class_names": names, "mean": mean, "std": std})


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


def _load_timm(
    state: dict[str, torch.Tensor], model_name: str | None, overrides: dict[str, Any], source: str
) -> nn.Module:
    convert = timm_converter(state)
    if convert is None:
        raise VitlabError(
            f"{source}: not a state dict of a family vitlab reads (timm's parameter names for ViT, DeiT, CaiT, "
            "Swin, ResNet, ConvNeXt, ...)"
        )
    try:
        conv = convert(state)
    except VitlabError as e:
        raise VitlabError(f"{source}: {e}") from None
    return _finish(_build_converted(conv, overrides, model_name, source), {})


def load_checkpoint_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, old_img_size: Any = None, source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` strictly, adapting what a change of resolution or of classes needs.

    * position embeddings for another grid are resampled (2D bicubic, prefix tokens kept apart, in fp32);
    * a classifier with another number of classes is left at the model's fresh initialisation (the classifier is
      every parameter under the model's ``head_names``, default ``("head",)``);
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
    prefixes = tuple(f"{n}." for n in getattr(model, "head_names", ("head",)))
    head = {k for k in set(state) | set(own) if k.startswith(prefixes)}
    if any(k in state and (k not in own or state[k].shape != own[k].shape) for k in head) or any(
        k in own and k not in state for k in head
    ):
        for k in head:  # another number of classes, or no classifier: keep the model's fresh one
            state.pop(k, None)
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
