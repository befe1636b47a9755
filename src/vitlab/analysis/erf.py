"""Effective receptive fields.

Luo, Li, Urtasun & Zemel, "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks",
NeurIPS 2016 (arXiv:1701.04128). Set the gradient of the centre unit of a layer's output to 1 and every other
output to 0, back-propagate to the input, and average the absolute input gradient over random initialisations and
inputs. The paper finds the result Gaussian-like, occupying a fraction of the theoretical receptive field that
shrinks with depth (as 1/sqrt(n) for n layers) and grows with training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitlab.errors import VitlabError


@dataclass
class ErfResult:
    grad: Tensor  # [H, W] mean |d centre / d input|, summed over input channels, normalised to sum 1
    radius95: float  # radius (pixels, from the centre) that holds 95% of the gradient mass
    theoretical_radius: float  # radius of the support: the pixels with any gradient at all
    ratio: float  # radius95 / theoretical_radius
    support: Tensor  # [H, W] bool: the pixels with a nonzero gradient in any sample


def conv_stack(depth: int, channels: int = 16, *, in_chans: int = 1, kernel: int = 3, act: bool = True) -> nn.Module:
    """``depth`` k x k convolutions (stride 1, same padding), optionally with ReLU, as in the ERF paper's study of
    depth."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Conv2d(in_chans if i == 0 else channels, channels, kernel, padding=kernel // 2))
        if act and i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _centre_output(model: nn.Module, x: Tensor, layer: int | None) -> Tensor:
    """The chosen layer's output: maps [B, C, H, W] -> the centre position; tokens [B, N, D] -> the centre patch
    token (prefix tokens skipped)."""
    if layer is not None:
        if not hasattr(model, "forward_intermediates"):
            raise VitlabError("layer= needs a vitlab model (forward_intermediates); pass the sub-network instead")
        out = model.forward_intermediates(x, indices=[layer], intermediates_only=True)[0]
    else:  # a vitlab model's last tokens or maps (the logits have no centre), or a plain module's output
        out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if out.ndim == 4:
        return out[:, :, out.shape[2] // 2, out.shape[3] // 2]
    if out.ndim == 3:
        prefix = getattr(model, "num_prefix_tokens", 0)
        n = out.shape[1] - prefix
        gh, gw = getattr(getattr(model, "patch_embed", None), "grid_size", (int(n**0.5), int(n**0.5)))
        return out[:, prefix + (gh // 2) * gw + gw // 2]
    raise VitlabError(f"cannot find a centre unit in an output of shape {tuple(out.shape)}")


def effective_receptive_field(
    model: nn.Module | Callable[[], nn.Module],
    input_size: tuple[int, int, int],
    *,
    layer: int | None = None,
    inits: int = 4,
    batch: int = 8,
    seed: int = 0,
) -> ErfResult:
    """The ERF of ``model`` (or of fresh models from a factory, one per initialisation) at ``input_size``.

    ``layer`` picks a block or stage through `forward_intermediates` (default: the model's output, or for a
    plain module its output). A trained model is one initialisation: pass it directly (``inits`` then only
    repeats the random inputs).
    """
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(input_size[1:])
    support = torch.zeros(input_size[1:], dtype=torch.bool)
    for i in range(inits):
        torch.manual_seed(seed + i)
        m = model() if callable(model) and not isinstance(model, nn.Module) else model
        was = m.training
        m.eval()
        x = torch.randn(batch, *input_size, generator=g).requires_grad_(True)
        centre = _centre_output(m, x, layer)
        centre.backward(torch.ones_like(centre))  # gradient 1 at the centre unit (all channels), 0 elsewhere
        m.train(was)
        grad = x.grad.abs().sum(dim=(0, 1))  # (H, W)
        total += grad
        support |= grad > 0
    total = total / total.sum().clamp_min(1e-30)
    H, W = total.shape
    ys, xs = torch.meshgrid(torch.arange(H) - (H // 2), torch.arange(W) - (W // 2), indexing="ij")
    r = torch.sqrt(ys.float() ** 2 + xs.float() ** 2).flatten()
    order = torch.argsort(r)
    mass = total.flatten()[order].cumsum(0)
    radius95 = r[order][int(torch.searchsorted(mass, torch.tensor(0.95)).clamp(max=len(r) - 1))].item()
    theoretical = r[support.flatten()].max().item() if support.any() else 0.0
    ratio = radius95 / theoretical if theoretical else float("nan")
    return ErfResult(total, radius95, theoretical, ratio, support)
