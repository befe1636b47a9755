"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of a model on a dataset split."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import to_model_input
from vitlab.train.distributed import DistInfo, all_reduce_sum
from vitlab.train.precision import resolve_precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast or nothing; ``auto`` resolves on ``device`` (see `vitlab.train.precision`)."""
    if resolve_precision(precision, device)[0] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Returns loss, accuracy, count, per-class accuracy and the confusion matrix (rows: true, cols: predicted).
    Under torchrun each process evaluates its shard and the sums are all-reduced."""
    device = torch.device(device)
    info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    in_chans, h, w = model.default_cfg["input_size"]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches = dataset.loader(
        batch_size, shuffle=False, rank=info.rank, world_size=info.world_size, num_workers=num_workers
    )
    for images, labels in batches:
        x = to_model_input(images.to(device), in_chans=in_chans, img_size=(h, w), mean=mean, std=std)
        y = labels.to(device)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        idx = y * num_classes + logits.argmax(-1)
        confusion += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)
    all_reduce_sum(confusion, info)
    all_reduce_sum(loss_sum, info)
    model.train(was_training)
    count = confusion.sum().item()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "loss": loss_sum.item() / max(count, 1),
        "accuracy": confusion.diag().sum().item() / max(count, 1),
        "count": int(count),
        "per_class_accuracy": per_class,
        "confusion": confusion.long().cpu(),
    }
