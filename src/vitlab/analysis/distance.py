"""What ViT's attention and position embeddings learn: the ViT paper's Figure 7.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv:2010.11929), Figure 7:

* centre, position-embedding similarity: the cosine similarity of each patch's position embedding with every
  other patch's, drawn as a grid of small maps (nearby patches, and patches in the same row or column, end up
  alike);
* (our addition, to read the trained table against) the same similarity of a random table (what training starts
  from: no structure beyond chance) and of the fixed 2-D sine-cosine table (structure by construction);
* right, mean attention distance: per head and layer, "the average distance in image space across which
  information is integrated, based on the attention weights", i.e. sum_j a_ij * ||p_i - p_j|| over key patches j,
  averaged over query patches i and images; it is the analogue of a CNN's receptive field size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitlab.errors import VitlabError
from vitlab.layers import sincos_pos_embed_2d, to_2tuple


def patch_distances(grid: tuple[int, int], patch_size: int | tuple[int, int] = 1) -> Tensor:
    """Euclidean distances ``[N, N]`` in pixels between the centres of the patches of a ``grid`` (rows first)."""
    gh, gw = grid
    ph, pw = to_2tuple(patch_size)
    ys, xs = torch.meshgrid(torch.arange(gh) * ph, torch.arange(gw) * pw, indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # (N, 2)
    return torch.cdist(pos, pos).float()


def mean_attention_distance(
    maps: list[Tensor], grid: tuple[int, int], patch_size: int | tuple[int, int] = 1, num_prefix_tokens: int = 1
) -> Tensor:
    """``[layers, heads]`` mean attention distance in pixels of the square maps of a ``grid`` of patches.

    The weights to prefix tokens (class, distillation) are left out and each query's weights over the patches
    renormalised, so that a head attending uniformly to all patches scores the mean pairwise patch distance.
    """
    n = grid[0] * grid[1]
    dist = patch_distances(grid, patch_size)
    rows = []
    for m in maps:
        if m.shape[-1] != n + num_prefix_tokens or m.shape[-2] != n + num_prefix_tokens:
            continue  # another stage's or a class-attention map
        a = m[:, :, num_prefix_tokens:, num_prefix_tokens:].float()  # (B, h, N, N)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        rows.append((a * dist.to(a.device)).sum(-1).mean(dim=(0, 2)))  # (h,)
    if not rows:
        raise VitlabError(f"no attention map over a {grid[0]}x{grid[1]} grid with {num_prefix_tokens} prefix tokens")
    return torch.stack(rows)


@torch.no_grad()
def pos_embed_similarity(model: nn.Module) -> tuple[Tensor, tuple[int, int]]:
    """Cosine similarity ``[N, N]`` between the learned position embeddings of the patches (prefix tokens left
    out), with the patch grid."""
    pe = getattr(model, "pos_embed", None)
    if not isinstance(pe, Tensor):
        raise VitlabError(f"{type(model).__name__} has no position embedding table to compare")
    prefix = getattr(model, "num_pos_prefix_tokens", getattr(model, "num_prefix_tokens", 0))  # rows before the grid
    grid = tuple(model.patch_embed.grid_size)
    table = pe[0, prefix:].float()
    if table.shape[0] != grid[0] * grid[1]:
        raise VitlabError(f"the position embedding has {table.shape[0]} patch entries for a {grid} grid")
    return _cosine(table), grid


def _cosine(table: Tensor) -> Tensor:
    """[N, D] -> [N, N] cosine similarity of the rows."""
    table = torch.nn.functional.normalize(table.float(), dim=-1)
    return table @ table.T


def reference_similarities(grid: tuple[int, int], dim: int, *, seed: int = 0) -> dict[str, Tensor]:
    """The similarity ``[N, N]`` of two tables a learned one is read against: ``random`` (Gaussian, as ViT's table
    starts, so any structure in it is chance) and ``sincos 2-D`` (the fixed table of MoCo v3 / big_vision: nearby
    patches alike by construction). ``dim`` is rounded down to a multiple of 4 for the sine-cosine table."""
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(grid[0] * grid[1], dim, generator=g)
    return {"random": _cosine(random), "sincos 2-D": _cosine(sincos_pos_embed_2d(grid, max(4, dim - dim % 4)))}


def neighbour_contrast(sim: Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """Mean similarity of each patch with its 8 neighbours (``near``) and with the patches two or more steps away
    (``far``, Chebyshev distance): one pair of numbers that says whether a table has learned 2-D locality."""
    gh, gw = grid
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    step = torch.maximum((rows[:, None] - rows).abs(), (cols[:, None] - cols).abs())  # (N, N)
    return {"near": sim[step == 1].mean().item(), "far": sim[step >= 2].mean().item()}
