"""What every family shares around its classifier: a zero-initialised linear head (or Identity for
``num_classes=0``, so that forward returns pre-logits), the bookkeeping `reset_classifier` owes the checkpoint
metadata that `vitlab.create_model` attached, and the ``default_cfg`` of a registered variant (the input it expects,
its normalisation, its paper)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitlab.layers import to_2tuple

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def zero_classifier(in_features: int, num_classes: int, device: torch.device | None = None) -> nn.Module:
    """Linear(in_features, num_classes) with zero weight and bias: the head starts from uniform predictions, as in
    the ViT paper's code, and a new head for fine-tuning does not disturb the backbone's first steps."""
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(in_features, num_classes, device=device)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    return fc


def record_num_classes(model: nn.Module, num_classes: int) -> None:
    """Keep ``default_cfg`` and ``init_kwargs`` (what save_pretrained writes) in step with a new classifier."""
    model.num_classes = num_classes
    if hasattr(model, "default_cfg"):
        model.default_cfg["num_classes"] = num_classes
    if hasattr(model, "init_kwargs"):
        model.init_kwargs["num_classes"] = num_classes


def record_img_size(model: nn.Module, img_size: int | tuple[int, int]) -> None:
    """Keep ``default_cfg`` and ``init_kwargs`` in step with a new input resolution (`set_input_size`)."""
    h, w = to_2tuple(img_size)
    if hasattr(model, "default_cfg"):
        model.default_cfg["input_size"] = (model.default_cfg["input_size"][0], h, w)
    if hasattr(model, "init_kwargs"):
        model.init_kwargs["img_size"] = [h, w]


def imagenet_cfg(img_size: int, in_chans: int, paper: str, **extra: Any) -> dict[str, Any]:
    """default_cfg of a model trained with ImageNet's mean and std (grayscale and other inputs: 0.5 and 0.5)."""
    rgb = in_chans == 3
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if rgb else (None, None)
    return image_cfg(img_size, in_chans, paper=paper, mean=mean, std=std, **extra)


def image_cfg(
    img_size: int | tuple[int, int],
    in_chans: int,
    *,
    paper: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int = 1000,
    interpolation: str = "bicubic",
    **extra: Any,
) -> dict[str, Any]:
    """The default_cfg of an image model, the one place its keys are written. Without ``mean`` / ``std``, 0.5 for
    every channel (data scaled to [-1, 1]), as vitlab's small variants."""
    h, w = to_2tuple(img_size)
    return {
        "input_size": (in_chans, h, w),
        "mean": tuple(mean) if mean is not None else (0.5,) * in_chans,
        "std": tuple(std) if std is not None else (0.5,) * in_chans,
        "num_classes": num_classes,
        "interpolation": interpolation,
        "paper": paper,
        **extra,
    }
