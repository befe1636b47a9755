"""Export to other libraries' layouts: a directory that HF transformers' ``from_pretrained`` loads (`export_hf`),
and one in the layout timm's Hub repositories have (`export_timm`).

Each family writes its own names and config through the exporter it registers next to its converters
(`vitlab._registry.register_hf_exporter` / `register_timm_exporter`, the inverses of the converters); this module
adds what every family shares and makes the export safe:

* HF: ``config.json`` (the family's ``model_type``, ``architectures`` and sizes, plus ``id2label`` / ``label2id``
  from the run's class names), ``model.safetensors`` under HF's saved names, ``preprocessor_config.json`` with the
  run's mean and std as ``image_mean`` / ``image_std`` and its input size, and the files a model keeps beside its
  weights (CLIP's ``tokenizer.json``).
* timm: ``model.safetensors`` under timm's names and ``config.json`` as timm's ``push_to_hf_hub`` writes it:
  ``architecture`` (a timm model of the family), ``num_classes``, ``num_features``, ``model_args`` (every size, so
  that ``timm.create_model("local-dir:DIR", pretrained=True)`` builds this model), ``pretrained_cfg`` (input size,
  mean, std, ...) and ``label_names``.

The directory is written beside its destination and checked before it moves into place in one rename
(`vitlab._io.atomic_directory`): the HF export is loaded by transformers (when it is importable) under the class
its config names, which must find every weight, and its outputs compared with vitlab's to ``atol``; the timm
export is read back by vitlab's own timm converter and compared the same way (timm itself cannot be imported here,
so it is not run). An export that fails leaves the previous one as it was and the failed one as ``OUT.failed``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab._io import atomic_directory, write_json
from vitlab._registry import Exported, export_formats, exporter
from vitlab.errors import VitlabError

WEIGHTS_NAME = "model.safetensors"
LIBRARY = {"hf": "HF transformers", "timm": "timm"}
PARITY_BATCH = 3
PIL_BICUBIC = 3  # HF image processors name the resampling filter by its PIL number


def default_export_dir(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Where `vitlab export --format FMT` writes by default: ``DIR/FMT`` for a checkpoint directory, ``NAME.FMT``
    beside a checkpoint file, ``REPO.FMT`` in the working directory for ``hf-hub:ORG/REPO``."""
    from vitlab.checkpoint import HUB_PREFIX

    if str(checkpoint).startswith(HUB_PREFIX):
        return Path(f"{str(checkpoint).rstrip('/').rsplit('/', 1)[-1]}.{fmt}")
    path = Path(checkpoint)
    return path / fmt if path.is_dir() else path.with_suffix(f".{fmt}")


def export_hf(model: nn.Module | str | os.PathLike, out: str | os.PathLike | None = None, *, atol: float = 1e-4):
    """Write ``model`` (a module, or anything `from_pretrained` reads) as a HF transformers directory at ``out``
    and check it in transformers. Returns ``{"path", "format", "max_abs_diff", "checked_with"}``; without
    transformers the export is written unchecked (``max_abs_diff`` None, ``checked_with`` saying why)."""
    return _export("hf", model, out, atol, _write_hf, _check_hf)


def export_timm(model: nn.Module | str | os.PathLike, out: str | os.PathLike | None = None, *, atol: float = 1e-4):
    """Write ``model`` (a module, or anything `from_pretrained` reads) in timm's Hub layout at ``out`` and check it
    through vitlab's timm converter. Returns ``{"path", "format", "max_abs_diff", "checked_with"}``."""
    return _export("timm", model, out, atol, _write_timm, _check_timm)


Writer = Callable[[nn.Module, Exported, Path], None]
Checker = Callable[[nn.Module, Exported, Path], tuple[float | None, str]]


def _export(fmt: str, model: Any, out: Any, atol: float, write: Writer, check: Checker) -> dict[str, Any]:
    model, out = _resolve(model, out, fmt)
    exported = family_export(model, fmt)
    with atomic_directory(out) as tmp:
        write(model, exported, tmp)
        try:
            diff, how = check(model, exported, tmp)
        except Exception:
            _keep_failed(tmp, out)
            raise
        if diff is not None and not diff <= atol:  # also catches NaN
            failed = _keep_failed(tmp, out)
            raise VitlabError(
                f"{how} gives outputs that differ from vitlab's by {diff:.3g} (> {atol:g}); {out} was not written "
                f"(the failed export is {failed})"
            )
    return {"path": str(out), "format": fmt, "max_abs_diff": diff, "checked_with": how}


def _resolve(model: Any, out: Any, fmt: str) -> tuple[nn.Module, Path]:
    if not isinstance(model, nn.Module):
        from vitlab.checkpoint import from_pretrained

        out = out if out is not None else default_export_dir(model, fmt)
        model = from_pretrained(model)
    if out is None:
        raise VitlabError(f"exporting a module to {LIBRARY[fmt]} needs an output directory")
    return model.eval(), Path(out)


def family_export(model: nn.Module, fmt: str) -> Exported:
    """The family's exporter applied to ``model``, or a one-line error naming the layouts its family has."""
    arch = getattr(model, "arch", None)
    fn = exporter(fmt, arch)
    if fn is None:
        has = (["onnx"] if getattr(model, "num_classes", 0) > 0 else []) + export_formats(arch)
        raise VitlabError(
            f"{arch or type(model).__name__!r} models cannot be exported to the {LIBRARY[fmt]} layout: that library "
            f"has no model of this family; it exports to {', '.join(has) or 'no other format'} "
            "(docs/export.md lists the families)"
        )
    if getattr(model, "num_classes", None) == 0:
        raise VitlabError("the model has no classifier (num_classes=0); export a model with a head")
    return fn(model)


def _keep_failed(tmp: Path, out: Path) -> Path:
    """Keep an export that failed its check as ``OUT.failed`` beside ``out``, which stays untouched."""
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    tmp.rename(failed)
    return failed


def _save_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file

    # cloned: split views of one fused tensor (q, k, v) would share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})  # "pt": what transformers checks


def class_names(model: nn.Module) -> list[str]:
    names = getattr(model, "pretrained_cfg", {}).get("class_names")
    return list(names) if names else [str(i) for i in range(getattr(model, "num_classes", 0))]


def normalisation(model: nn.Module) -> tuple[list[float], list[float]]:
    """The mean and std the model's inputs were normalised with (the run's, else the variant's)."""
    cfg, pcfg = model.default_cfg, getattr(model, "pretrained_cfg", {})
    return [float(v) for v in pcfg.get("mean", cfg["mean"])], [float(v) for v in pcfg.get("std", cfg["std"])]


# --- HF transformers -------------------------------------------------------------------------------------------
def _write_hf(model: nn.Module, exported: Exported, directory: Path) -> None:
    config = dict(exported.config)
    if getattr(model, "num_classes", 0) > 0:
        names = class_names(model)
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    _save_weights(exported.state, directory)
    write_json(directory / "config.json", config)
    write_json(directory / "preprocessor_config.json", _hf_processor(model, exported))
    if hasattr(model, "save_files"):  # what a model needs beside its weights (CLIP: its tokenizer)
        model.save_files(directory)


def _hf_processor(model: nn.Module, exported: Exported) -> dict[str, Any]:
    """preprocessor_config.json: vitlab's evaluation preprocessing (a bicubic resize to the input size, pixels / 255,
    the run's mean and std) as a ViTImageProcessor, unless the family names another (CLIP's)."""
    _, H, W = model.default_cfg["input_size"]
    mean, std = normalisation(model)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": H, "width": W},
        "resample": PIL_BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }
    return {**processor, **(exported.processor or {})}


def _check_hf(model: nn.Module, exported: Exported, directory: Path) -> tuple[float | None, str]:
    """Load the export in transformers under the class its config names, requiring every weight to be found, and
    compare the outputs with ours."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed, so nothing could load the export"
    name = exported.config["architectures"][0]
    how = f"transformers {transformers.__version__} ({name})"
    try:
        with _no_progress_bars(transformers):
            theirs, info = getattr(transformers, name).from_pretrained(str(directory), output_loading_info=True)
        for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(problem):
                keys = sorted(map(str, info[problem]))
                raise VitlabError(f"{len(keys)} {problem.replace('_', ' ')} in the export, e.g. {keys[0]}")
        ours, got = (exported.compare or _compare_logits)(model, theirs.eval())
    except VitlabError as e:
        raise VitlabError(f"{how}: {e}") from None
    except Exception as e:  # transformers raises many types for a config or weights it cannot take
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(f"{how} cannot load or run the export: {type(e).__name__}: {first}") from e
    return float((ours.float() - got.float()).abs().max()), how


class _no_progress_bars:
    """transformers' progress bars off inside the block (loading draws one per file), as they were after it."""

    def __init__(self, transformers: Any) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.was = self.logging.is_progress_bar_enabled()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            self.logging.enable_progress_bar()


@torch.no_grad()
def _compare_logits(ours: nn.Module, theirs: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(PARITY_BATCH, *ours.default_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    return ours(x), theirs(pixel_values=x).logits


# --- timm ------------------------------------------------------------------------------------------------------
def _write_timm(model: nn.Module, exported: Exported, directory: Path) -> None:
    mean, std = normalisation(model)
    cfg = model.default_cfg
    pretrained_cfg = {
        "tag": "vitlab",
        "custom_load": False,
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": 1.0,  # vitlab evaluates on the whole image resized to the input size
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": model.num_classes,
        **exported.config.get("pretrained_cfg", {}),
    }
    config = {
        "architecture": exported.config["architecture"],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        **({"global_pool": model.global_pool} if isinstance(getattr(model, "global_pool", None), str) else {}),
        "label_names": class_names(model),
        "model_args": exported.config["model_args"],
        "pretrained_cfg": pretrained_cfg,
    }
    _save_weights(exported.state, directory)
    write_json(directory / "config.json", config)


@torch.no_grad()
def _check_timm(model: nn.Module, exported: Exported, directory: Path) -> tuple[float, str]:
    """Read the export back through vitlab's timm converter (the directory reader timm Hub repositories go through)
    and compare the logits with ours."""
    from vitlab.checkpoint import from_pretrained

    back = from_pretrained(directory)
    x = torch.randn(PARITY_BATCH, *model.default_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    return float((model(x) - back(x)).abs().max()), "vitlab's timm converter (timm itself is not run)"
