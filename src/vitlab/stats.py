"""Model statistics: parameter counts and FLOPs, computed on the meta device so that even ViT-H costs no memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitlab.factory import create_model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2, so ViT-B/16 at 224 is 35.1 GFLOPs;
    papers that quote 17.6 count multiply-adds)."""
    device = next(model.parameters()).device
    x = torch.empty(1, *input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def model_stats(name: str, **overrides: Any) -> dict[str, Any]:
    """Parameters, GFLOPs and input size of a registered model, without allocating its weights."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    input_size = tuple(model.default_cfg["input_size"])
    return {
        "name": name,
        "params": count_params(model),
        "gflops": count_flops(model, input_size) / 1e9,
        "input_size": input_size,
        "num_classes": model.default_cfg.get("num_classes"),
        "paper": model.default_cfg.get("paper", ""),
        "kwargs": model.init_kwargs,
    }
