"""From stored uint8 batches to model input: `to_float` (channels, size, [0, 1]), then `normalize`.

They are two steps because augmentation runs between them, on [0, 1] floats. Both work on whole batches on any
device, so the conversion can run on the GPU after the uint8 batch (4x smaller than float) has been copied there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma, the weights Pillow uses for RGB -> L, so a folder loaded as grayscale and an RGB dataset
# converted here agree.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def to_float(images: Tensor, in_chans: int, img_size: tuple[int, int]) -> Tensor:
    """uint8 [B, C, H, W] -> float32 [B, in_chans, *img_size] in [0, 1] (a float input is taken as already [0, 1]).

    Channels: 1 -> 3 repeats, 3 -> 1 takes the luma. Size: bilinear with antialiasing, so that shrinking does not
    alias; antialiased bilinear weights are non-negative and sum to 1, so the result stays in [0, 1].
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    B, C, H, W = x.shape
    if C != in_chans:
        if C == 1 and in_chans == 3:
            x = x.expand(B, 3, H, W)
        elif C == 3 and in_chans == 1:
            weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
            x = torch.einsum("bchw,c->bhw", x, weights)[:, None]  # (B, 3, H, W) -> (B, 1, H, W)
        else:
            raise ValueError(f"cannot convert {C}-channel images to {in_chans} channels")
    if (H, W) != tuple(img_size):
        x = F.interpolate(x, size=tuple(img_size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        # Statistics of RGB data for a grayscale model: the luma-weighted mean is exact; for std it is an
        # approximation (exact when the channels are perfectly correlated, as in gray images stored as RGB).
        return [sum(w * v for w, v in zip(LUMA_WEIGHTS, values))]
    raise ValueError(f"{what} has {len(values)} values for {channels}-channel input")


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of x [B, C, H, W]; one value is used for every channel."""
    C = x.shape[1]
    mean_t = torch.tensor(_per_channel(mean, C, "mean"), dtype=x.dtype, device=x.device)
    std_t = torch.tensor(_per_channel(std, C, "std"), dtype=x.dtype, device=x.device)
    return (x - mean_t[:, None, None]) / std_t[:, None, None]


def to_model_input(
    images: Tensor, *, in_chans: int, img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """`to_float` then `normalize`: the input of a model that takes ``in_chans`` x ``img_size`` images."""
    return normalize(to_float(images, in_chans, img_size), mean, std)
