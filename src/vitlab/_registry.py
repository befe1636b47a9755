"""Model registry, the ground floor: `@register_model` on variant functions, `list_models(pattern)`, and the
checkpoint converters each family registers next to its model (`register_hf_converter`, `register_timm_converter`),
so that `vitlab.checkpoint` dispatches without a branch per family, and their inverses, the exporters
(`register_hf_exporter`, `register_timm_exporter`), through which `vitlab.export.layouts` writes HF and timm layouts.

It imports no model file and no checkpoint loader: the families register themselves when ``vitlab`` is imported
(its ``__init__`` imports `vitlab.models`), and `vitlab.factory.create_model`, which may load published weights,
lives a floor above both.

A variant function returns ``(model_class, kwargs, default_cfg)``; `build_model` builds one and records on it what
is needed to rebuild it from a checkpoint: ``model.model_name``, ``model.init_kwargs`` (the full constructor
arguments) and ``model.default_cfg``.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from vitlab.errors import VitlabError, closest

VariantFn = Callable[[], tuple[type[nn.Module], dict[str, Any], dict[str, Any]]]

_variants: dict[str, VariantFn] = {}
_architectures: dict[str, type[nn.Module]] = {}


def register_model(fn: VariantFn) -> VariantFn:
    if fn.__name__ in _variants:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _variants[fn.__name__] = fn
    return fn


def register_variant(
    name: str, cls: type[nn.Module], kwargs: dict[str, Any], default_cfg: dict[str, Any], doc: str = ""
) -> None:
    """Register a variant given as data: ``create_model(name)`` builds ``cls(**kwargs)``. For families whose
    variants are a table of sizes, in place of one decorated function each."""

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return cls, kwargs, default_cfg

    variant.__name__ = name
    variant.__doc__ = doc
    register_model(variant)


def register_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a model class under its ``arch`` name, so a checkpoint with custom arguments can be rebuilt."""
    _architectures[cls.arch] = cls  # type: ignore[attr-defined]
    return cls


class Converted(NamedTuple):
    """A foreign checkpoint in vitlab's terms: the state dict under our parameter names, the constructor arguments
    of the registered architecture ``arch`` that it fits, and the default_cfg of a model built from it.

    ``unknown`` names the constructor arguments that neither the weights nor what the source declared can tell
    (a ViT's head count: the weights hold only the heads' concatenation); the caller must supply them, never
    guess them."""

    arch: str
    state: dict[str, torch.Tensor]
    kwargs: dict[str, Any]
    default_cfg: dict[str, Any]
    ckpt_img_size: Any = None  # the size the weights were trained at, when ``kwargs`` says another
    unknown: tuple[str, ...] = ()

    @property
    def source_img_size(self) -> Any:
        """The input size the checkpoint's position embeddings were made for."""
        return self.ckpt_img_size if self.ckpt_img_size is not None else self.kwargs.get("img_size")


HFConverter = Callable[[dict[str, Any], dict[str, torch.Tensor]], Converted]
# fn(state, declared): ``declared`` holds the constructor arguments the source states (the variant the caller
# named, a timm config.json's architecture, model_args and input size); the converter reads what they leave open
# off the tensor shapes, and lists in ``Converted.unknown`` what neither tells
TimmConverter = Callable[[dict[str, torch.Tensor], dict[str, Any]], Converted]
_hf_converters: dict[str, HFConverter] = {}
_timm_converters: list[tuple[int, Callable[[dict[str, torch.Tensor]], bool], TimmConverter]] = []


def register_hf_converter(*model_types: str) -> Callable[[HFConverter], HFConverter]:
    """Register ``fn(config_json, raw_state) -> Converted`` for HF transformers directories whose config.json has
    one of these ``model_type`` values."""

    def wrap(fn: HFConverter) -> HFConverter:
        for t in model_types:
            _hf_converters[t] = fn
        return fn

    return wrap


def register_timm_converter(
    matches: Callable[[dict[str, torch.Tensor]], bool], *, priority: int = 0
) -> Callable[[TimmConverter], TimmConverter]:
    """Register ``fn(state, declared) -> Converted`` for timm state dicts that ``matches(state)`` recognises. When
    several families match, the highest ``priority`` wins (a family whose state dict extends another's, such as
    DeiT's distillation token over ViT, registers a higher one)."""

    def wrap(fn: TimmConverter) -> TimmConverter:
        _timm_converters.append((priority, matches, fn))
        return fn

    return wrap


class Exported(NamedTuple):
    """A vitlab model in another library's layout: its state dict under that library's names, and what the config
    file says of the architecture (HF: config.json's ``model_type``, ``architectures`` and sizes; timm:
    ``architecture``, ``model_args`` and the ``pretrained_cfg`` keys naming its layers). `vitlab.export.layouts`
    adds what every family shares: class names, normalisation, input size.

    ``processor`` (HF): preprocessor_config.json keys over the default ViTImageProcessor; ``compare`` (HF):
    ``fn(ours, theirs) -> (our output, theirs)`` on the same inputs, for a model whose output is not the logits of
    ``pixel_values`` (CLIP)."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    processor: dict[str, Any] | None = None
    compare: Callable[[nn.Module, nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None


# fn(model) -> Exported, raising a one-line VitlabError naming an option the other library cannot express
Exporter = Callable[[nn.Module], Exported]
EXPORT_FORMATS = ("hf", "timm")
_exporters: dict[str, dict[str, Exporter]] = {fmt: {} for fmt in EXPORT_FORMATS}


def _register_exporter(fmt: str, archs: tuple[str, ...]) -> Callable[[Exporter], Exporter]:
    def wrap(fn: Exporter) -> Exporter:
        for arch in archs:
            _exporters[fmt][arch] = fn
        return fn

    return wrap


def register_hf_exporter(*archs: str) -> Callable[[Exporter], Exporter]:
    """Register ``fn(model) -> Exported`` writing models of these architectures in HF transformers' layout (the
    inverse of the family's `register_hf_converter`)."""
    return _register_exporter("hf", archs)


def register_timm_exporter(*archs: str) -> Callable[[Exporter], Exporter]:
    """Register ``fn(model) -> Exported`` writing models of these architectures in timm's layout (the inverse of
    the family's `register_timm_converter`)."""
    return _register_exporter("timm", archs)


def exporter(fmt: str, arch: str | None) -> Exporter | None:
    return _exporters[fmt].get(arch or "")


def export_formats(arch: str | None) -> list[str]:
    """The other libraries' layouts that models of ``arch`` export to."""
    return [fmt for fmt in EXPORT_FORMATS if (arch or "") in _exporters[fmt]]


def constructor_args(model: nn.Module) -> dict[str, Any]:
    """Every constructor argument of a model built by `build_model`: what it was built with (``init_kwargs``) over
    the keyword defaults of its class and of the parents an ``__init__(**kwargs)`` passes them on to."""
    if not hasattr(model, "init_kwargs"):
        raise VitlabError("exporting needs a model built by vitlab.create_model or vitlab.from_pretrained")
    args: dict[str, Any] = {}
    for cls in reversed(type(model).__mro__):  # a subclass's defaults over its parents'
        init = cls.__dict__.get("__init__")
        if init is None or cls is nn.Module:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                args[p.name] = p.default
    return {**args, **model.init_kwargs}


def hf_converter(model_type: str | None) -> HFConverter | None:
    return _hf_converters.get(model_type or "")


def hf_model_types() -> list[str]:
    return sorted(_hf_converters)


def timm_converter(state: dict[str, torch.Tensor]) -> TimmConverter | None:
    found = [(p, fn) for p, match, fn in _timm_converters if match(state)]
    return max(found, key=lambda t: t[0])[1] if found else None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _variants if fnmatch.fnmatchcase(n, pattern))


def check_model_name(name: str) -> None:
    if name not in _variants:
        raise VitlabError(f"unknown model {name!r}.{closest(name, _variants)} 'vitlab models' lists them all")


def get_variant(name: str) -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
    """The class, default constructor arguments and default_cfg of a registered variant."""
    check_model_name(name)
    cls, kwargs, cfg = _variants[name]()
    return cls, dict(kwargs), dict(cfg)


def is_architecture(arch: str) -> bool:
    return arch in _architectures


def get_architecture(arch: str) -> type[nn.Module]:
    if arch not in _architectures:
        raise VitlabError(f"unknown architecture {arch!r}.{closest(arch, _architectures)}")
    return _architectures[arch]


def build_model(cls: type[nn.Module], name: str, kwargs: dict[str, Any], default_cfg: dict[str, Any]) -> nn.Module:
    """Construct ``cls(**kwargs)`` and attach the metadata that `save_pretrained` stores."""
    try:
        model = cls(**kwargs)
    except TypeError as e:  # an unknown or misspelt keyword argument
        raise VitlabError(f"cannot build {name!r}: {e}") from None
    cfg = dict(default_cfg)
    img = kwargs.get("img_size")
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else img
        cfg["input_size"] = (kwargs.get("in_chans", cfg["input_size"][0]), h, w)
    elif "in_chans" in kwargs:
        cfg["input_size"] = (kwargs["in_chans"], *cfg["input_size"][1:])
    if "num_classes" in kwargs:
        cfg["num_classes"] = kwargs["num_classes"]
    model.model_name = name
    model.init_kwargs = dict(kwargs)
    model.default_cfg = cfg
    return model


def build_variant(name: str, **overrides: Any) -> nn.Module:
    """A registered variant with fresh weights, its arguments updated by ``overrides`` (`vitlab.create_model`
    adds published weights on top)."""
    cls, kwargs, cfg = get_variant(name)
    return build_model(cls, name, {**kwargs, **overrides}, cfg)
