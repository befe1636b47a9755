from __future__ import annotations

from typing import Any

import pytest
import torch

import vitlab
from vitlab._registry import get_variant


def tiny_overrides(name: str) -> dict[str, Any]:
    """Overrides that shrink any registered model to a few thousand parameters, keeping its structure
    (patch size, channels, pooling). Keyed by architecture, so a new family adds one entry here."""
    cls, kwargs, _ = get_variant(name)
    if cls.arch == "vit":
        p = kwargs["patch_size"]
        return {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 2 * p, "num_classes": 5}
    raise KeyError(f"add tiny overrides for architecture {cls.arch!r}")


def tiny_model(name: str, **extra: Any) -> torch.nn.Module:
    return vitlab.create_model(name, **{**tiny_overrides(name), **extra})


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.default_cfg["input_size"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
