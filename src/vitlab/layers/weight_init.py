"""The weight initialisation the reference transformer codes share (ViT / DeiT, Swin, CvT, CaiT, CCT, ConvNeXt):
truncated-normal(0.02) weights with zero biases for the linear maps, unit weights and zero biases for the norms, and
a zero classifier, so that training starts from uniform predictions (the ViT paper's code)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def trunc_normal_init(
    root: nn.Module,
    *,
    std: float = 0.02,
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    norms: tuple[type[nn.Module], ...] = (nn.LayerNorm,),
    skip: nn.Module | None = None,
    other: Callable[[nn.Module], None] | None = None,
) -> None:
    """Every module of ``root`` (but ``skip``) in order: one of ``types`` gets truncated-normal(``std``) weights
    and a zero bias, one of ``norms`` a unit weight and a zero bias, any other goes to ``other`` (a family's own
    rule: Kaiming convolutions, relative-position tables). One pass, so the random draws come in module order."""
    for m in root.modules():
        if m is skip:
            continue
        if isinstance(m, types):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif other is not None:
            other(m)


@torch.no_grad()
def zero_init(head: nn.Module) -> None:
    """A linear classifier starts at zero (uniform predictions); anything else (an Identity) is left alone."""
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def no_weight_decay_names(**parts: nn.Module) -> set[str]:
    """The parameters each named part of a composite model keeps out of weight decay (its own ``no_weight_decay()``;
    none for a part without it), under the part's attribute name: what a CLIP pair or a captioner answers for its
    towers."""
    return {f"{prefix}.{name}" for prefix, part in parts.items() for name in getattr(part, "no_weight_decay", set)()}
