from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import vitlab
from vitlab._registry import get_variant


def _tiny_vit(kwargs: dict[str, Any]) -> dict[str, Any]:
    p = kwargs["patch_size"]
    return {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 2 * p, "num_classes": 5}


def _tiny_attention_cnn(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"widths": (4, 8, 8), "attn_dim": 8, "num_classes": 5}


# Overrides that shrink any registered model to a few thousand parameters, keeping its structure (patch size,
# channels, pooling). Keyed by architecture: a new family adds one entry, a function of the variant's kwargs.
TINY: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "vit": _tiny_vit,
    "attention_cnn": _tiny_attention_cnn,
}


def tiny_overrides(name: str) -> dict[str, Any]:
    cls, kwargs, _ = get_variant(name)
    if cls.arch not in TINY:
        raise KeyError(f"add tiny overrides for architecture {cls.arch!r} to tests/conftest.py")
    return TINY[cls.arch](kwargs)


def tiny_model(name: str, **extra: Any) -> torch.nn.Module:
    return vitlab.create_model(name, **{**tiny_overrides(name), **extra})


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.default_cfg["input_size"])


@torch.no_grad()
def move_off_init(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter and floating buffer (BatchNorm statistics included): zero-initialised
    classifiers, LayerScale and identity-at-init branches would otherwise hide mapping and gradient errors."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(b.abs() + 0.5 if name.endswith("running_var") else b + torch.randn_like(b) * std)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
