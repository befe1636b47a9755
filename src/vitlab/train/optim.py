"""Optimisation: AdamW parameter groups, warmup + cosine schedule, and an exponential moving average of weights.

* AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019. Weight decay is off for
  norms, biases, position embeddings and tokens (as DeiT and timm): decaying them only hurts.
* Schedule: linear warmup (Goyal et al., 2017) then cosine decay (Loshchilov & Hutter, SGDR, 2017) to min_lr.
* EMA of weights (Polyak averaging), as DeiT's "model EMA".
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: decay / no decay, and with ``layer_decay`` one pair per depth with ``lr_scale`` =
    layer_decay ** (depth of the head - depth of the parameter), as BEiT's and MAE's fine-tuning recipes."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    ids = layer_ids(model) if layer_decay is not None else {}
    top = max(ids.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip or name.endswith(".bias")
        layer = ids.get(name, top)
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (top - layer) if layer_decay is not None else 1.0,
            },
        )
        group["params"].append(p)
    if layer_decay is None:  # the two groups in a fixed order, even when one is empty
        return [
            groups.get((0, nd), {"params": [], "weight_decay": 0.0 if nd else weight_decay, "lr_scale": 1.0})
            for nd in (False, True)
        ]
    return [groups[k] for k in sorted(groups)]


_DEPTH_UNIT = re.compile(r"^(?:blocks|stages|layers|blocks_token_only|layer)\.?(\d+)\.")


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of every parameter for layer-wise learning-rate decay: the embedding (everything before the first
    block) is 0, block or stage i is i + 1 in the order the model registers them, and the rest (final norm,
    head) is the last depth. Block containers are found by name (``blocks.i``, ``stages.i``, ``layers.i``,
    ``layer1``...), so every family gets a sensible order without a table per model."""
    ids: dict[str, int] = {}
    units: dict[tuple[str, str], int] = {}
    seen_block = False
    pending_tail = []
    for name, _ in model.named_parameters():
        m = _DEPTH_UNIT.match(name)
        if m:
            key = (name.split(".")[0], m.group(1))
            units.setdefault(key, len(units) + 1)
            ids[name] = units[key]
            seen_block = True
        elif seen_block:
            pending_tail.append(name)
        else:
            ids[name] = 0
    for name in pending_tail:
        ids[name] = len(units) + 1
    return ids


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    layer_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; each group's learning rate is ``lr * group["lr_scale"]``.

    The fused kernel (one pass over each parameter instead of a chain of multi-tensor ops) where the parameters'
    device has one: on 2 CPU cores it takes the AdamW step from 17.5 to 6.0 ms for ViT-Ti's 5.4M parameters and
    from 59 to 25 ms for ViT-S/16's 22M (`benchmarks/levers.py`, docs/benchmarks.md). Its results differ from the
    foreach kernel's in the last bits.
    """
    groups = param_groups(model, weight_decay, layer_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


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
