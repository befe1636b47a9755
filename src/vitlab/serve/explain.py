"""The rollout overlay the server returns: the image with the attention-rollout relevance of each patch as a heat
map (Abnar & Zuidema 2020, `vitlab.analysis.attention_rollout`), drawn straight into PNG bytes.

Rollout needs self-attention over a grid of patch tokens. Swin's window attention is mapped back to image
positions by `attention_maps`, and rolled out over its last stage (the tokens its head pools). Models without
attention (ResNet, ConvNeXt) or with squeezed keys (CvT's strided key/value projections: no square maps) have
nothing to roll out; `explain_support` says why, and the server answers such requests with 422 and that reason.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitlab.analysis.attention import attention_maps, attention_rollout
from vitlab.analysis.run import _grid, _pooling
from vitlab.errors import VitlabError

MIN_SIDE = 224  # small inputs (28 x 28 digits) are enlarged so the overlay is visible on a page
ALPHA = 0.5  # weight of the heat map over the image


def relevance_map(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(rollout relevance ``[B, gh, gw]`` normalised to a maximum of 1, logits ``[B, classes]``) of normalised
    input ``x``; `VitlabError` when the model's attention cannot be rolled out onto its patch grid."""
    maps, logits = attention_maps(model, x, return_output=True)
    if any(m.shape[0] != x.shape[0] for m in maps):  # (B * windows, h, N, N): each map sees one window
        raise VitlabError(
            f"{type(model).__name__}'s attention maps cover windows, not the whole image; rollout needs global "
            "attention"
        )
    prefix, pool = _pooling(model)
    relevance = attention_rollout(maps, num_prefix_tokens=prefix, pool=pool)  # (B, n)
    gh, gw = _grid(model, relevance.shape[1])
    relevance = relevance.view(-1, gh, gw)  # (B, n) -> (B, gh, gw)
    return relevance / relevance.amax((1, 2), keepdim=True).clamp_min(1e-12), logits


def explain_support(model: nn.Module | None) -> str | None:
    """None when `relevance_map` works for ``model``, else the reason it does not (one line)."""
    if model is None:
        return "the server runs an ONNX file without its checkpoint: there are no attention maps to explain"
    x = torch.zeros(1, *model.default_cfg["input_size"])
    name = getattr(model, "model_name", type(model).__name__)
    try:
        relevance_map(model, x)
    except VitlabError as e:
        return f"{name} cannot be explained by attention rollout: {e}"
    except RuntimeError as e:  # a family whose maps do not fit rollout in a way not foreseen here: say so
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{name} cannot be explained by attention rollout: {first}"
    return None


def overlay_png(image: Tensor, relevance: Tensor) -> bytes:
    """uint8 ``[C, H, W]`` image and ``[gh, gw]`` relevance -> PNG of the image blended with the heat map."""
    import matplotlib

    C, H, W = image.shape
    scale = max(1, -(-MIN_SIDE // min(H, W)))
    size = (H * scale, W * scale)
    rgb = image.expand(3, H, W) if C == 1 else image[:3]
    rgb = F.interpolate(rgb[None].float(), size=size, mode="bicubic", align_corners=False)[0].clamp(0, 255) / 255
    heat = F.interpolate(relevance[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    # the colours span the map's own range (blue: least relevant patch, red: most), so a flat-ish map still shows
    # where it peaks; the absolute values are in `relevance_map`
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = matplotlib.colormaps["jet"](heat.numpy())[..., :3]  # (H, W, 3), no pyplot: thread-safe
    blend = (1 - ALPHA) * rgb.permute(1, 2, 0).numpy() + ALPHA * colour  # (C, H, W) -> (H, W, C)
    buf = io.BytesIO()
    Image.fromarray((blend * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
