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
    check_model_name,
    get_architecture,
    get_variant,
    hf_converter,
    hf_model_types,
    is_architecture,
    list_models,
    timm_converter,
)
from vitlab._version import __version__
from vitlab.errors import VitlabError
from vitlab.layers import resample_pos_embed, to_2tuple

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TIMM_ARG_NAMES = {"act_layer": "act", "kernel_sizes": "kernel_size"}


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
        "vitlab_version": __version__,
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
    if hasattr(model, "save_files"):  # what a model needs beside its weights (CLIP: its tokenizer)
        model.save_files(directory)


# --- loading -------------------------------------------------------------------------------------------------
HUB_PREFIX = "hf-hub:"


def from_pretrained(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    map_location: str | torch.device = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Build a model with weights from a vitlab checkpoint directory, a HF transformers ``save_pretrained``
    directory, a timm state dict file (.pth / .bin / .safetensors), the directory timm's ``push_to_hf_hub`` writes
    (config.json beside the weights), or ``hf-hub:ORG/REPO`` (a HF transformers or timm repository on the Hugging
    Face Hub, through huggingface_hub's cache), of any family that registers a converter.

    ``overrides`` change constructor arguments: ``img_size=384`` resamples the position embeddings,
    ``num_classes=10`` keeps the backbone and starts a new classifier (a pre-training head or HF's pooler goes with
    the old one). ``model_name`` names the variant the weights are (for a bare state dict, whose tensor shapes
    cannot say everything: a ViT's head count); what neither the checkpoint nor the name says is refused, not
    guessed.
    """
    conv, name, meta = read_checkpoint(path, model_name=model_name, map_location=map_location)
    check_known(conv, overrides, str(path))
    cls = get_architecture(conv.arch)
    kwargs = {**conv.kwargs, **_new_classifier(cls, conv.kwargs, overrides), **overrides}
    model = build_model(cls, name or f"{conv.arch}_foreign", kwargs, conv.default_cfg)
    load_checkpoint_state(model, conv.state, old_img_size=conv.source_img_size, source=str(path))
    return _finish(model, meta)


def _new_classifier(cls: type[nn.Module], kwargs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The arguments that another number of classes resets: the family's ``finetune_overrides`` (ViT: the
    pre-training MLP head, HF's pooler) belong to the old classifier, as in the paper's fine-tuning (section 3.1)
    and HF's ``ViTForImageClassification``, which classifies the class token without the pooler."""
    if "num_classes" not in overrides or overrides["num_classes"] == kwargs.get("num_classes"):
        return {}
    return dict(getattr(cls, "finetune_overrides", {}))


def check_known(conv: Converted, given: dict[str, Any], source: str) -> None:
    """Refuse, in one line saying how to name them, the constructor arguments that the checkpoint leaves open
    (``conv.unknown``) and the caller did not give."""
    missing = [k for k in conv.unknown if k not in given]
    if not missing:
        return
    like = _variants_like(conv, missing)
    hint = f" (registered variants of these sizes: {'; '.join(like)})" if like else ""
    raise VitlabError(
        f"{source}: the weights do not say {' or '.join(missing)}{hint}; name the model with model_name= "
        f"(`vitlab models` lists them), pass {missing[0]}=, or load the directory timm writes (config.json "
        "naming the architecture beside the weights)"
    )


def _variants_like(conv: Converted, missing: list[str]) -> list[str]:
    """Registered variants of the checkpoint's architecture and sizes, with their values of ``missing``."""

    def size(key: str, value: Any) -> Any:  # one spelling: patch 16 is [16, 16], depths a list
        if value is None:
            return None
        return list(to_2tuple(value)) if key == "patch_size" else list(value) if key == "depths" else value

    sizes = [k for k in ("embed_dim", "depth", "depths", "patch_size") if k in conv.kwargs]
    found = []
    for name in list_models():
        cls, kwargs, _ = get_variant(name)
        if cls.arch == conv.arch and all(size(k, kwargs.get(k)) == size(k, conv.kwargs[k]) for k in sizes):
            found.append(f"{name}: " + ", ".join(f"{k}={kwargs.get(k)}" for k in missing))
    return found[:4]


def load_for_finetuning(
    source: str | os.PathLike,
    *,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    model_name: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Start a new task from a pretrained model, as the ViT paper fine-tunes (section 3.2 and appendix B.1.1).

    ``source`` is anything `from_pretrained` reads, or a registered model name whose ``default_cfg`` names its
    published weights (``hf_hub_id``). The classifier (a pre-training MLP head included: the family's
    ``head_names``) is replaced by a fresh zero-initialised linear head for ``num_classes``; position embeddings
    are resampled to ``img_size``; the stem adapts to ``in_chans`` (grayscale from RGB weights by summing the
    filters over the input channels). The model's ``pretrained_cfg["init"]`` records where it came from.
    ``model_name`` names the variant of a bare state dict, as for `from_pretrained`.
    """
    conv, name, meta = read_checkpoint(_named_weights(source), model_name=model_name, map_location=map_location)
    check_known(conv, {"img_size": img_size} if img_size is not None else {}, str(source))
    cls = get_architecture(conv.arch)
    # arguments that fine-tuning resets, declared by the family (ViT: the pre-training MLP head goes)
    kwargs = {**conv.kwargs, **getattr(cls, "finetune_overrides", {}), "num_classes": num_classes}
    old_chans = conv.kwargs.get("in_chans", conv.default_cfg["input_size"][0])
    if img_size is not None and ("img_size" in conv.kwargs or "img_size" in conv.unknown):
        kwargs["img_size"] = list(to_2tuple(img_size))
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = build_model(cls, name or f"{conv.arch}_foreign", kwargs, conv.default_cfg)
    state = adapt_input_channels(model, conv.state, old_chans)
    load_checkpoint_state(model, state, old_img_size=conv.source_img_size, source=str(source))
    model.pretrained_cfg = {"init": str(source)}
    if in_chans is None or in_chans == old_chans:  # the checkpoint's normalisation still describes the inputs
        for k in ("mean", "std"):
            if meta.get(k) is not None:
                model.default_cfg[k] = tuple(meta[k])
    return model


def read_checkpoint(
    path: str | os.PathLike, *, model_name: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[Converted, str | None, dict[str, Any]]:
    """Any checkpoint in vitlab's terms: (state and constructor arguments under our names, the variant name when
    known, metadata: class names and normalisation)."""
    if str(path).startswith(HUB_PREFIX):
        path = hub_download(str(path)[len(HUB_PREFIX) :])
    path = Path(path)
    if not path.exists():
        raise VitlabError(f"checkpoint {str(path)!r} does not exist")
    if model_name is not None:
        check_model_name(model_name)
    if not path.is_dir():
        # a bare state dict: the named variant declares what its tensor shapes cannot say
        state = _unwrap_state_dict(read_state_dict(path, map_location))
        return _read_timm(state, str(path), name=model_name), model_name, {}
    config = _read_json(path / CONFIG_NAME)
    if _is_vitlab_config(config):
        conv, name, meta = _read_vitlab(path, config, map_location)
        return conv, name, {**meta, "directory": str(path)}
    if "model_type" in config or "architecture" not in config:
        conv, name, meta = _read_hf(path, config, map_location)
        return conv, name, {**meta, "directory": str(path)}
    return _read_timm_directory(path, config, model_name, map_location)


def _is_vitlab_config(config: dict[str, Any]) -> bool:
    """vitlab's config.json, not timm's (both have ``architecture`` and may have ``model_args``; timm's names a
    model, vitlab's an architecture)."""
    return "model_args" in config and ("vitlab_version" in config or is_architecture(str(config["architecture"])))


def _read_timm_directory(
    path: Path, config: dict[str, Any], model_name: str | None, map_location: Any
) -> tuple[Converted, str | None, dict[str, Any]]:
    """The directory timm's ``push_to_hf_hub`` / ``save_for_hf`` writes: config.json names the timm architecture,
    its ``model_args`` and ``pretrained_cfg`` (input size, normalisation, class names) beside the weights. The
    architecture (or ``model_name`` in its place) is read as the vitlab variant of that name when there is one."""
    # timm's older single-level config holds the pretrained_cfg fields beside "architecture"
    pre = config.get("pretrained_cfg", config)
    name = model_name or (config["architecture"] if config["architecture"] in list_models() else None)
    declared: dict[str, Any] = {}
    classes = config.get("num_classes", pre.get("num_classes"))
    if classes is not None:
        declared["num_classes"] = classes
    if pre.get("input_size"):
        declared["img_size"] = list(pre["input_size"][1:])
    # timm's argument names where they differ from ours (its act_layer / kernel_sizes take our names' values)
    declared.update({TIMM_ARG_NAMES.get(k, k): v for k, v in (config.get("model_args") or {}).items()})
    weights = _find_weights(path, ("model.safetensors", "pytorch_model.bin"))
    state = _unwrap_state_dict(read_state_dict(weights, map_location))
    conv = _read_timm(state, str(path), name=name, declared=declared)
    if pre.get("input_size"):  # the input the weights expect, also for a model without an img_size argument
        conv.default_cfg["input_size"] = tuple(pre["input_size"])
    names = config.get("label_names", pre.get("label_names"))
    meta = {"mean": pre.get("mean"), "std": pre.get("std"), "class_names": names, "directory": str(path)}
    return conv, name, meta


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


def _finish(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """Attach class names and normalisation from a checkpoint's metadata to the model."""
    pcfg = {k: meta[k] for k in ("class_names", "mean", "std") if meta.get(k) is not None}
    if len(pcfg.get("class_names", ())) != getattr(model, "num_classes", None):
        pcfg.pop("class_names", None)  # a new head: the old class names no longer apply
    model.pretrained_cfg = pcfg
    for k in ("mean", "std"):
        if k in pcfg:
            model.default_cfg[k] = tuple(pcfg[k])
    if meta.get("directory") and hasattr(model, "load_files"):  # files beside the weights (CLIP: its tokenizer)
        model.load_files(meta["directory"])
    return model.eval()


def _read_vitlab(path: Path, config: dict[str, Any], map_location: Any) -> tuple[Converted, str, dict[str, Any]]:
    name = config.get("model_name", config["architecture"])
    try:
        _, _, default_cfg = get_variant(name)
    except VitlabError:  # saved from a model built from a foreign checkpoint: no registered variant
        default_cfg = {"input_size": config.get("input_size"), "mean": config.get("mean"), "std": config.get("std")}
    state = read_state_dict(_find_weights(path, (WEIGHTS_NAME,)), map_location)
    conv = Converted(config["architecture"], state, dict(config["model_args"]), default_cfg)
    return conv, name, config


def _read_hf(path: Path, config: dict[str, Any], map_location: Any) -> tuple[Converted, None, dict[str, Any]]:
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
    if isinstance(size, dict) and "height" in size and "width" in size:
        # the input size of a model without a fixed one (a fixed img_size argument wins in build_model)
        conv.default_cfg["input_size"] = (conv.default_cfg["input_size"][0], size["height"], size["width"])
    classes = conv.kwargs.get("num_classes") or 0
    id2label = config.get("id2label") or {}
    names = [id2label[str(i)] for i in range(classes)] if classes and len(id2label) == classes else None
    mean = pre.get("image_mean", config.get("image_mean"))
    std = pre.get("image_std", config.get("image_std"))
    return conv, None, {"class_names": names, "mean": mean, "std": std}


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


def _read_timm(
    state: dict[str, torch.Tensor], source: str, *, name: str | None = None, declared: dict[str, Any] | None = None
) -> Converted:
    """A timm-named state dict in vitlab's terms. The variant ``name`` and ``declared`` (a timm config's
    arguments, which win) state constructor arguments; the family's converter reads the rest off the tensor
    shapes and names what stays unknown."""
    convert = timm_converter(state)
    if convert is None:
        raise VitlabError(
            f"{source}: not a state dict of a family vitlab reads (timm's parameter names for ViT, DeiT, CaiT, "
            "Swin, ResNet, ConvNeXt, ...)"
        )
    said: dict[str, Any] = {}
    variant = None
    if name is not None:
        variant = get_variant(name)
        said = variant[1]
    said.update(declared or {})
    try:
        conv = convert(state, said)
    except VitlabError as e:
        raise VitlabError(f"{source}: {e}") from None
    if variant is not None and variant[0].arch != conv.arch:
        raise VitlabError(f"{source}: the checkpoint holds a {conv.arch!r} model, not a {name!r}")
    kwargs = {**conv.kwargs, **said}
    if "img_size" not in conv.kwargs and "img_size" not in conv.unknown:
        kwargs.pop("img_size", None)  # a family without an img_size argument (a CNN): the size is default_cfg's
    unknown = tuple(k for k in conv.unknown if k not in said)
    default_cfg = variant[2] if variant is not None else conv.default_cfg
    return conv._replace(kwargs=kwargs, default_cfg=default_cfg, unknown=unknown)


# --- the Hugging Face Hub --------------------------------------------------------------------------------------
HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",  # CLIP's tokenizer, with the next two for its special tokens
    "special_tokens_map.json",
    "tokenizer_config.json",
]


def hub_download(repo_id: str) -> Path:
    """The local snapshot of a Hub repository, downloaded into huggingface_hub's cache if it is not there yet.
    ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` are honoured (huggingface_hub reads them); with no network and no
    cached copy the error says how to get the files."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise VitlabError("loading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        # read at call time (huggingface_hub reads its variables once, at import)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        cache = os.environ.get("HF_HUB_CACHE") or None
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache, local_files_only=offline))
    except Exception as e:  # offline, unknown repository, network errors: huggingface_hub raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(
            f"cannot get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {first}); on a machine that is "
            f"online run `huggingface-cli download {repo_id}` (or pass a local directory / file instead)"
        ) from None
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        raise VitlabError(f"the Hub repository {repo_id!r} has no model.safetensors or pytorch_model.bin")
    return path


def _named_weights(source: str | os.PathLike) -> str | os.PathLike:
    """A registered model name stands for its published weights (``default_cfg["hf_hub_id"]``); anything else is
    a path or ``hf-hub:`` address as it is."""
    text = str(source)
    if text.startswith(HUB_PREFIX) or Path(text).exists() or text not in list_models():
        return source
    hub_id = get_variant(text)[2].get("hf_hub_id")
    if not hub_id:
        raise VitlabError(f"{text!r} has no published weights vitlab knows of; pass a checkpoint path instead")
    return HUB_PREFIX + hub_id


def adapt_input_channels(model: nn.Module, state: dict[str, torch.Tensor], old_chans: int) -> dict[str, torch.Tensor]:
    """Fit the stem's filters to the model's input channels: summed over channels for one channel (a grayscale
    image seen as equal R, G and B gives the same response), otherwise tiled and rescaled by old / new channels,
    as timm adapts pretrained stems."""
    new_chans = model.default_cfg["input_size"][0]
    if new_chans == old_chans:
        return state
    for name, p in model.state_dict().items():
        w = state.get(name)
        if w is None or p.ndim != 4 or w.ndim != 4 or p.shape[1] != new_chans or w.shape[1] != old_chans:
            continue
        if new_chans == 1:
            adapted = w.float().sum(dim=1, keepdim=True)
        else:
            reps = -(-new_chans // old_chans)
            adapted = w.float().repeat(1, reps, 1, 1)[:, :new_chans] * (old_chans / new_chans)
        return {**state, name: adapted.to(w.dtype)}  # the stem is the first conv: the only one to adapt
    raise VitlabError(f"cannot adapt the checkpoint's {old_chans}-channel stem to {new_chans} input channels")


def load_checkpoint_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, old_img_size: Any = None, source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` strictly, adapting what a change of resolution or of classes needs.

    * position embeddings for another grid are resampled (2D bicubic, prefix tokens kept apart, in fp32);
    * a classifier layer with another number of classes (or one that only one side has) is left at the model's
      fresh initialisation: the classifier layers are the modules named in the model's ``head_names``, default
      ``("head",)``;
    * any other mismatch is an error naming the parameter and both shapes.
    """
    state = dict(state)
    own = model.state_dict()
    pe = state.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        prefix = getattr(model, "num_pos_prefix_tokens", model.num_prefix_tokens)  # the rows before the grid
        old_grid = None
        if old_img_size is not None:
            h, w = (old_img_size, old_img_size) if isinstance(old_img_size, int) else old_img_size
            ph, pw = model.patch_embed.patch_size
            old_grid = (h // ph, w // pw)
        state["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, old_grid, prefix)
    fresh = set()
    for head_name in getattr(model, "head_names", ("head",)):
        keys = {k for k in set(state) | set(own) if k.startswith(f"{head_name}.")}
        if any(k not in state or k not in own or state[k].shape != own[k].shape for k in keys):
            for k in keys:  # another number of classes, or no such layer: keep the model's fresh one
                state.pop(k, None)
            fresh |= {k for k in keys if k in own}
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
