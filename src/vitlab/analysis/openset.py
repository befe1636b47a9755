"""Open-set recognition, the baseline: score each image by how confident the closed-set classifier is.

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks",
ICLR 2017 (arXiv:1610.02136): the maximum softmax probability (MSP); Vaze et al., "Open-Set Recognition: a Good
Closed-Set Classifier is All You Need?", ICLR 2022 (arXiv:2110.06207): the maximum logit (MLS). An image of a
known class should score high, one of an unknown class low; AUROC and the false-positive rate at 95% true
positives measure how well the score separates them (known = positive).
"""

from __future__ import annotations

from math import comb

import torch
from torch import Tensor

from vitlab.errors import VitlabError


def openset_scores(logits: Tensor) -> dict[str, Tensor]:
    """Per-image scores from closed-set logits ``[B, K]``: ``max_logit`` and ``max_softmax``."""
    logits = logits.float()
    return {"max_logit": logits.amax(-1), "max_softmax": logits.softmax(-1).amax(-1)}


def auroc(known: Tensor, unknown: Tensor) -> float:
    """Area under the ROC curve of a score where known images should score higher: the probability that a random
    known image outscores a random unknown one, ties counted half (the Mann-Whitney U statistic)."""
    scores = torch.cat([known, unknown]).double()
    ranks = _average_ranks(scores)
    n_k, n_u = len(known), len(unknown)
    u = ranks[:n_k].sum() - n_k * (n_k + 1) / 2
    return float(u / (n_k * n_u))


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    uniq, inverse, counts = torch.unique(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inverse, torch.arange(1, len(x) + 1, dtype=x.dtype))
    ranks[order] = (sums / counts)[inverse]
    return ranks


def fpr_at_tpr(known: Tensor, unknown: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate (unknown images accepted) at the threshold that accepts ``tpr`` of the known ones."""
    threshold = torch.quantile(known.double(), 1 - tpr)
    return float((unknown.double() >= threshold).double().mean())


def random_known_splits(num_classes: int, num_known: int, count: int, *, seed: int = 0) -> list[list[int]]:
    """``count`` different draws of ``num_known`` known classes out of ``num_classes`` (sorted; the rest unknown).

    One split says as much about which classes look alike as about the model (on Fashion-MNIST, known sandals
    against unknown sneakers and boots); Vaze et al. average over several random splits for that reason.
    """
    if not 0 < num_known < num_classes:
        raise VitlabError(f"the known classes must be 1 to {num_classes - 1} of {num_classes}, got {num_known}")
    if count > comb(num_classes, num_known):
        raise VitlabError(f"only {comb(num_classes, num_known)} different splits of {num_known} known classes exist")
    g = torch.Generator().manual_seed(seed)
    splits: list[list[int]] = []
    while len(splits) < count:
        known = sorted(torch.randperm(num_classes, generator=g)[:num_known].tolist())
        if known not in splits:
            splits.append(known)
    return splits
