"""`create_model`: a registered variant with fresh weights, or with its published ones (``pretrained=True``).

It lives a floor above both the registry (`vitlab._registry`, which knows the variants) and the checkpoint loaders
(`vitlab.checkpoint`, which know the weights), so that neither of those imports the other.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitlab._registry import build_variant, get_variant
from vitlab.checkpoint import load_for_finetuning
from vitlab.errors import VitlabError


def create_model(name: str, *, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("vit_tiny_patch4_28", num_classes=10, drop_path_rate=0.1)``.

    ``pretrained=True`` loads the variant's published weights (``default_cfg["hf_hub_id"]``, through
    huggingface_hub's cache); ``num_classes``, ``img_size`` and ``in_chans`` then adapt them as for fine-tuning.
    """
    if not pretrained:
        return build_variant(name, **overrides)
    _, kwargs, cfg = get_variant(name)
    classes = overrides.pop("num_classes", kwargs.get("num_classes", cfg["num_classes"]))
    size = {k: overrides.pop(k) for k in ("img_size", "in_chans") if k in overrides}
    if overrides:
        raise VitlabError(f"pretrained=True takes num_classes, img_size and in_chans, not {sorted(overrides)}")
    return load_for_finetuning(name, num_classes=classes, **size)
