"""Sharpness-aware minimisation (SAM).

Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021 (arXiv:2010.01412), section 2, eq. 2 and Algorithm 1. SAM minimises the loss at the worst point of a
rho-ball around the weights, max_{||e|| <= rho} L(w + e), whose first-order solution is the normalised gradient:

    e(w) = rho g / ||g||_2,      g = grad L(w)                                   (first_step: w <- w + e(w))
    w   <- base_step(w, grad L(w + e(w)))                                        (second_step: w <- w - e(w), then
                                                                                  the base optimizer's step)

so every update costs two forward-backward passes. Chen, Hsieh and Gong ("When Vision Transformers Outperform
ResNets without Pretraining or Strong Data Augmentations", ICLR 2022) found it lifts ViTs trained from scratch.
``adaptive=True`` is ASAM (Kwon et al., ICML 2021, eq. 9-10 with T_w = |w|): e(w) = rho T_w^2 g / ||T_w g||, a
ball scaled by each weight's magnitude, which makes the sharpness invariant to rescaling the weights (use a larger
rho, e.g. 2.0, as that paper does).

`SAM` wraps a built optimizer (AdamW with its parameter groups, layer-wise lr scales and the trainer's learning
rate schedule all stay as they are): its ``param_groups`` are the base optimizer's, and its state is the base
optimizer's (e(w) lives only between the two steps of one update), so checkpoints and resume are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vitlab.errors import VitlabError


class SAM:
    def __init__(self, base_optimizer: torch.optim.Optimizer, *, rho: float = 0.05, adaptive: bool = False) -> None:
        if rho <= 0:
            raise VitlabError(f"SAM's neighbourhood radius rho must be positive, got {rho}")
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive
        self._saved: dict[torch.Tensor, torch.Tensor] = {}  # w before the ascent step, between the two steps

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + e(w), from the gradients now in ``.grad`` (the loss at w)."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step")
        params = self._params_with_grad()
        if not params:
            return
        # ||T_w g||_2 over all parameters together (T_w = |w| for ASAM, the identity for SAM)
        scaled = [p.grad * p.abs() if self.adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        factor = self.rho / (norm + 1e-12)  # the epsilon keeps a zero gradient from dividing by zero
        for p, s in zip(params, scaled):
            self._saved[p] = p.detach().clone()
            e_w = s * p.abs() * factor if self.adaptive else s * factor  # T_w^2 g rho / ||T_w g||, or rho g / ||g||
            p.add_(e_w.to(p.dtype))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w (restored exactly, not by subtracting e(w) in floating point), then the base optimizer's step
        with the gradients now in ``.grad`` (the loss at w + e(w))."""
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One SAM update. ``.grad`` holds the gradients at w; ``closure`` recomputes the loss with gradients
        enabled and calls backward (it runs at w + e(w)). Returns the closure's loss."""
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state)
