"""The ``default_cfg`` of a registered variant: the input it expects, its normalisation and its paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def image_cfg(
    img_size: int,
    in_chans: int,
    *,
    num_classes: int,
    paper: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Without ``mean`` / ``std``, 0.5 for every channel (data scaled to [-1, 1]), as vitlab's small variants."""
    return {
        "input_size": (in_chans, img_size, img_size),
        "mean": tuple(mean) if mean is not None else (0.5,) * in_chans,
        "std": tuple(std) if std is not None else (0.5,) * in_chans,
        "num_classes": num_classes,
        "interpolation": "bicubic",
        "paper": paper,
    }
