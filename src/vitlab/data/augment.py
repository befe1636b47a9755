"""Batch augmentation on [0, 1] float images [B, C, H, W], and mixup / cutmix with soft targets.

- RandomResizedCrop, horizontal flip and RandomErasing (Zhong et al. 2017) are kornia's batched, per-sample ops.
- RandAugment (Cubuk et al. 2019): ``n`` ops drawn per batch, each at magnitude ``m`` on kornia's 0..30 scale.
- mixup (Zhang et al. 2017): ``x = lam * x_i + (1 - lam) * x_j``, the same mixture of the targets,
  ``lam ~ Beta(alpha, alpha)``.
- cutmix (Yun et al. 2019): a box of area ``(1 - lam) * H * W`` from x_j pasted into x_i; the targets are mixed
  by the area actually pasted, which differs from ``1 - lam`` once the box is clipped at the image border.

Every random draw comes from torch's global RNG (or the generator passed to `mixup_cutmix`), so saving and
restoring the RNG state in a checkpoint makes a resumed run augment exactly like an uninterrupted one.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from torch import Tensor, nn

from vitlab.errors import VitlabError

DEFAULT_CROP_SCALE = 0.35  # smallest crop area for random_resized_crop=True; small images lose too much below it


class _GrayRandAugment(nn.Module):
    """kornia's colour ops require 3 channels: run on the gray image repeated to RGB, then average back."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x.repeat(1, 3, 1, 1)).mean(dim=1, keepdim=True)  # (B, 1, H, W) -> (B, 3, H, W) -> (B, 1, H, W)


class Augment(nn.Module):
    """The enabled ops in order (crop, flip, RandAugment, erasing), with the result clamped to [0, 1]."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.ops = nn.Sequential(*ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x).clamp(0, 1)


def build_augment(
    *,
    img_size: tuple[int, int],
    in_chans: int,
    random_resized_crop: bool | float = False,
    hflip: bool = False,
    randaugment: tuple[int, int] | None = None,
    random_erasing: float = 0.0,
) -> nn.Module | None:
    """The augmentation module for [0, 1] float batches, or None when every op is off.

    ``random_resized_crop``: True, or the smallest crop area as a fraction (True means 0.35); the crop is resized
    to ``img_size``. ``randaugment``: ``(n ops, magnitude)`` with the magnitude in kornia's open range (0, 30).
    ``random_erasing``: the probability of erasing one box per image (filled with 0).
    """
    ops: list[nn.Module] = []
    if random_resized_crop is not False:
        scale = DEFAULT_CROP_SCALE if random_resized_crop is True else float(random_resized_crop)
        if not 0 < scale <= 1:
            raise VitlabError(f"random_resized_crop scale must be in (0, 1], got {scale}")
        ops.append(K.RandomResizedCrop(size=tuple(img_size), scale=(scale, 1.0)))
    if hflip:
        ops.append(K.RandomHorizontalFlip())
    if randaugment is not None:
        n, m = randaugment
        if not 1 <= n <= 15 or not 0 < m < 30:
            raise VitlabError(f"randaugment needs 1 <= n <= 15 ops and a magnitude 0 < m < 30, got n={n}, m={m}")
        if in_chans not in (1, 3):
            raise VitlabError(f"randaugment works on 1- or 3-channel images, not {in_chans}")
        op = RandAugment(n=n, m=m)
        ops.append(_GrayRandAugment(op) if in_chans == 1 else op)
    if random_erasing:
        if not 0 < random_erasing <= 1:
            raise VitlabError(f"random_erasing is a probability, got {random_erasing}")
        ops.append(K.RandomErasing(p=random_erasing))
    return Augment(ops) if ops else None


def _sample_gamma(k: float, generator: torch.Generator | None) -> float:
    """One draw from Gamma(k, 1) by Marsaglia & Tsang (2000), with torch's RNG (torch's own samplers take no
    generator)."""
    if k < 1:  # Gamma(k) = Gamma(k + 1) * U^(1/k)
        u = 1.0 - torch.rand((), generator=generator).item()  # in (0, 1]
        return _sample_gamma(k + 1, generator) * u ** (1 / k)
    d = k - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        z = torch.randn((), generator=generator).item()
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = 1.0 - torch.rand((), generator=generator).item()
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw from Beta(alpha, alpha) as G1 / (G1 + G2) with G1, G2 ~ Gamma(alpha)."""
    g1, g2 = _sample_gamma(alpha, generator), _sample_gamma(alpha, generator)
    # Both gammas underflow to 0 only for a tiny alpha, where Beta puts its mass at the ends anyway.
    return g1 / (g1 + g2) if g1 + g2 > 0 else float(g1 >= g2)


def smooth_one_hot(
    y: Tensor, num_classes: int, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Targets [B, num_classes]: ``1 - s + s / K`` on the true class and ``s / K`` elsewhere."""
    off = label_smoothing / num_classes
    targets = torch.full((y.shape[0], num_classes), off, dtype=dtype, device=y.device)
    return targets.scatter_(1, y[:, None], 1 - label_smoothing + off)


def cutmix_box(H: int, W: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A box ``(y0, y1, x0, x1)`` of area about ``(1 - lam) * H * W`` around a uniform centre, clipped to the image."""
    ratio = math.sqrt(1 - lam)
    h, w = round(H * ratio), round(W * ratio)
    cy = int(torch.randint(H, (), generator=generator))
    cx = int(torch.randint(W, (), generator=generator))
    y0, x0 = max(cy - h // 2, 0), max(cx - w // 2, 0)
    y1, x1 = min(cy - h // 2 + h, H), min(cx - w // 2 + w, W)
    return y0, y1, x0, x1


def mixup_cutmix(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mix a float batch x [B, C, H, W] with its reverse ``x.flip(0)``; return it and soft targets [B, num_classes].

    With both alphas 0, returns x itself and the smoothed one-hot targets. With both > 0, each call picks mixup
    or cutmix with probability 1/2. One ``lam`` per batch, as in the papers' reference code.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= label_smoothing < 1:
        raise VitlabError(
            f"need mixup_alpha, cutmix_alpha >= 0 and 0 <= label_smoothing < 1, got {mixup_alpha}, {cutmix_alpha},"
            f" {label_smoothing}"
        )
    dtype = x.dtype if x.is_floating_point() else torch.float32
    targets = smooth_one_hot(y, num_classes, label_smoothing, dtype)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand((), generator=generator).item() < 0.5)
    if use_cutmix:
        lam = sample_beta(cutmix_alpha, generator)
        H, W = x.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(H, W, lam, generator)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted, after clipping
    else:
        lam = sample_beta(mixup_alpha, generator)
        mixed = lam * x + (1 - lam) * x.flip(0)
    return mixed, lam * targets + (1 - lam) * targets.flip(0)
