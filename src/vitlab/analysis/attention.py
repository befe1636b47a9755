"""Attention maps of any vitlab model, and attention rollout.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (arXiv:2005.00928), attention rollout:
with the residual connection modelled as an identity, each layer's attention becomes A_hat = 0.5 (A + I), rows
renormalised, and the flow from the output back to the input tokens is the product A_hat_L ... A_hat_1. Head fusion
(mean, max or min over heads) and discarding the weakest fraction of weights follow the common implementations
used to draw ViT saliency (the class token's row gives each patch's relevance to the prediction).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.errors import VitlabError
from vitlab.layers import attention_modules, explicit_attention


@torch.no_grad()
def attention_maps(
    model: nn.Module, x: Tensor, *, image_positions: bool = True, return_output: bool = False
) -> list[Tensor] | tuple:
    """Every attention map ``[B, heads, N_query, N_key]`` the model computes on ``x``, in the order they are
    computed (depth order), as fp32.

    Attention that runs over windows (Swin) is mapped back to image positions with ``image_positions`` (the
    default): one ``[B, heads, HW, HW]`` map per layer over the padded grid, zero across windows, instead of one
    map per window.

    The model runs in eval mode on its explicit attention path, whatever path it uses by default (the fused
    kernel never forms the maps), and is left as it was: mode, attention paths and hooks. The explicit path
    computes the same function, so the output is the default path's up to float rounding.
    """
    if not attention_modules(model):
        raise VitlabError(f"{type(model).__name__} has no attention layers to record")
    maps: list[Tensor] = []
    was_training = model.training
    with explicit_attention(model) as mods:

        def hook(module: nn.Module):
            to_image = getattr(module, "to_image_attention", None) if image_positions else None
            return lambda _m, _i, out: maps.append(to_image(out.float()) if to_image else out.float())

        handles = [m.attn_probs.register_forward_hook(hook(m)) for _, m in mods]
        try:
            model.eval()
            out = model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return (maps, out) if return_output else maps


def _fuse(a: Tensor, head_fusion: str) -> Tensor:
    """[B, h, Nq, Nk] -> [B, Nq, Nk]."""
    if head_fusion == "mean":
        return a.mean(1)
    if head_fusion == "max":
        return a.amax(1)
    if head_fusion == "min":
        return a.amin(1)
    raise VitlabError(f"head_fusion must be mean, max or min, got {head_fusion!r}")


def _discard(a: Tensor, ratio: float, keep_first: int) -> Tensor:
    """Zero the ``ratio`` weakest weights of each map, never the weights to the first ``keep_first`` keys (the
    class token), as the reference implementations do."""
    if ratio <= 0:
        return a
    B, Nq, Nk = a.shape
    flat = a[:, :, keep_first:].reshape(B, -1)
    k = int(flat.shape[1] * ratio)
    if k == 0:
        return a
    idx = flat.topk(k, dim=1, largest=False).indices
    flat = flat.scatter(1, idx, 0.0)
    return torch.cat([a[:, :, :keep_first], flat.view(B, Nq, Nk - keep_first)], dim=2)


def attention_rollout(
    maps: list[Tensor],
    *,
    num_prefix_tokens: int = 1,
    pool: Literal["token", "avg"] = "token",
    head_fusion: Literal["mean", "max", "min"] = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """Relevance of each patch token ``[B, N_patches]`` for the pooled output, normalised to sum to 1.

    ``maps`` are `attention_maps` output. Square maps of the final sequence length are rolled out together;
    maps whose query is a single token (CaiT's class attention) come after them and update only the class
    token. With ``pool="token"`` the class token's row is read out; with ``"avg"`` (models pooled by averaging,
    or with no class token) the mean of the patch tokens' rows.
    """
    if not maps:
        raise VitlabError("no attention maps to roll out")
    class_attn = [m for m in maps if m.shape[-2] == 1]
    square = [m for m in maps if m.shape[-2] == m.shape[-1]]
    if not square:
        raise VitlabError("rollout needs self-attention maps (square [B, h, N, N])")
    n = square[-1].shape[-1]
    # hierarchical models change N between stages: roll out the last stage, whose tokens the head pools
    run = []
    for m in reversed(square):
        if m.shape[-1] != n:
            break
        run.append(m)
    run.reverse()
    B = run[0].shape[0]
    eye = torch.eye(n, device=run[0].device)
    flow = eye.expand(B, n, n)
    keep = num_prefix_tokens if pool == "token" else 0
    for m in run:
        a = _discard(_fuse(m, head_fusion), discard_ratio, keep)
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        flow = a @ flow  # (B, N, N): output token i <- input token j
    if class_attn:
        # class attention: cls_{l+1} = cls_l + CA(cls_l, [cls_l; patches]); the patches are the rolled-out tokens
        patches = torch.zeros(B, n, device=flow.device)
        weight_cls = torch.ones(B, 1, device=flow.device)
        for m in reversed(class_attn):
            row = _fuse(m, head_fusion)[:, 0]  # (B, 1 + n)
            row = row + torch.nn.functional.one_hot(torch.tensor(0), row.shape[-1]).to(row)
            row = row / row.sum(-1, keepdim=True)
            patches = patches + weight_cls * row[:, 1:]
            weight_cls = weight_cls * row[:, :1]
        relevance = (patches.unsqueeze(1) @ flow).squeeze(1)  # (B, n)
        start = 0
    elif pool == "token":
        relevance, start = flow[:, 0], num_prefix_tokens
    else:
        relevance, start = flow[:, num_prefix_tokens:].mean(1), num_prefix_tokens
    relevance = relevance[:, start:]
    return relevance / relevance.sum(-1, keepdim=True).clamp_min(1e-12)
