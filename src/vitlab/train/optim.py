"""Optimisation: AdamW parameter groups, warmup + cosine schedule, and an exponential moving average of weights.

* AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019. Weight decay is off for
  norms, biases, position embeddings and tokens (as DeiT and timm): decaying them only hurts.
* Schedule: linear warmup (Goyal et al., 2017) then cosine decay (Loshchilov & Hutter, SGDR, 2017) to min_lr.
* EMA of weights (Polyak averaging), as DeiT's "model EMA".
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class ModelEma:
    """Keeps ema = decay * ema + (1 - decay) * model after every optimizer step, in fp32."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)
        # Pair the tensors once: the update runs after every optimizer step. Parameters and buffers keep their
        # identity through training and in-place loads, so the pairs stay valid.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._source = model
        self._float_ema = [e for e, _ in pairs if e.is_floating_point()]
        self._float_new = [n for e, n in pairs if e.is_floating_point()]
        self._other = [(e, n) for e, n in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if model is not self._source:
            raise ValueError("ModelEma.update must be given the model it was created from")
        torch._foreach_lerp_(self._float_ema, self._float_new, 1.0 - self.decay)
        for e, n in self._other:
            e.copy_(n)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
