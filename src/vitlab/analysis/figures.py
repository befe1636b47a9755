"""Pictures of what the analysis functions compute, each readable without a legend hunt: titles say what is
drawn, axes are labelled, colour bars carry units."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitlab._plot import pyplot


def _image(img: Tensor) -> np.ndarray:
    """uint8 or float [C, H, W] -> float [H, W, 3] in [0, 1] for imshow."""
    x = img.float()
    x = x / 255 if img.dtype == torch.uint8 else (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return x.permute(1, 2, 0).numpy()


def _upsample(grid_map: Tensor, size: tuple[int, int]) -> np.ndarray:
    return torch.nn.functional.interpolate(grid_map[None, None].float(), size=size, mode="bilinear")[0, 0].numpy()


def explain_figure(image: Tensor, relevance: Tensor, title: str, out: Path) -> None:
    """The image, and the image with the rollout relevance ``[gh, gw]`` overlaid as a heat map."""
    plt = pyplot()
    rgb = _image(image)
    # stretched from the least to the most relevant patch: rollout spreads relevance thinly, so max-scaling alone
    # would paint the whole image in the top colours
    lo, hi = relevance.min(), relevance.max()
    heat = _upsample((relevance - lo) / (hi - lo).clamp_min(1e-12), rgb.shape[:2])
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    axes[1].imshow(rgb)
    im = axes[1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title("attention rollout")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046, label="relevance (least to most)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def head_grid_figure(rows: Sequence[Tensor], grid: tuple[int, int], title: str, out: Path) -> None:
    """One small map per layer (rows) and head (columns): the class token's (or the mean token's) attention over
    the patches. ``rows[l]`` is ``[heads, gh * gw]``."""
    plt = pyplot()
    L, H = len(rows), max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(L, H, figsize=(1.3 * H + 0.6, 1.3 * L + 0.6), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(H):
            ax = axes[i][j]
            ax.axis("off")
            if j < r.shape[0]:
                ax.imshow(r[j].view(*grid).numpy(), cmap="viridis")
            if j == 0:
                ax.text(-0.1, 0.5, f"layer {i + 1}", transform=ax.transAxes, ha="right", va="center", fontsize=7)
            if i == 0:
                ax.set_title(f"head {j + 1}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def distance_figure(
    dist: Tensor,
    out: Path,
    title: str = "mean attention distance",
    *,
    init: Tensor | None = None,
    uniform: float | None = None,
) -> None:
    """ViT paper Figure 7 right: one dot per head at each layer; ``init`` (the same heads freshly initialised)
    as hollow dots beside them, and ``uniform`` (the distance of a head attending to every patch alike) as a line."""
    plt = pyplot()
    L, H = dist.shape
    fig, ax = plt.subplots(figsize=(5.5, 4))
    layers = np.arange(1, L + 1)
    for h in range(H):
        colour = f"C{h % 10}"
        ax.scatter(layers, dist[:, h].numpy(), s=16, color=colour, label=f"head {h + 1}" if H <= 12 else None)
        if init is not None:
            ax.scatter(layers - 0.25, init[:, h].numpy(), s=16, facecolors="none", edgecolors=colour)
    if init is not None:  # legend entries for the two kinds of dot
        ax.scatter([], [], s=16, color="gray", label="trained")
        ax.scatter([], [], s=16, facecolors="none", edgecolors="gray", label="at initialisation (left)")
    if uniform is not None:
        ax.axhline(uniform, color="k", ls=":", lw=1, label=f"uniform attention ({uniform:.1f} px)")
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)")
    ax.set_title(title, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _tiled(sim: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[N, N] similarity -> one image of gh x gw small maps (row r, column c: patch (r, c)'s similarity with every
    patch), a blank line between maps."""
    gh, gw = grid
    tiles = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
    for i in range(gh):
        for j in range(gw):
            r, c = i * (gh + 1), j * (gw + 1)
            tiles[r : r + gh, c : c + gw] = sim[i * gw + j].view(gh, gw).numpy()
    return tiles


def pos_embed_figure(panels: Sequence[tuple[str, Tensor]], grid: tuple[int, int], out: Path, title: str) -> None:
    """ViT paper Figure 7 centre, one panel per table: at each patch position, that patch's cosine similarity
    with every patch."""
    plt = pyplot()
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # the blank lines between maps
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.8, 3.3), squeeze=False)
    im = None
    for ax, (label, sim) in zip(axes[0], panels):
        im = ax.imshow(_tiled(sim, grid), cmap=cmap, vmin=-1, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.03, label="cosine similarity")
    # growing upwards from above the panels' own two-line titles (the tight bounding box makes room)
    fig.suptitle(title, fontsize=8, y=0.99, va="bottom")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def erf_figure(panels: Sequence[tuple[str, Tensor]], out: Path, title: str) -> None:
    """Effective receptive fields side by side, each normalised to its own maximum; the figure grows with the
    lines of its title and of the panels' labels, so that long run labels leave the maps their size."""
    plt = pyplot()
    title_lines = title.count("\n") + 1
    label_lines = max(label.count("\n") for label, _ in panels) + 1
    height = 2.4 + 0.16 * label_lines + 0.2 * title_lines  # inches: the maps, their labels, the title
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), height), squeeze=False)
    for ax, (label, grad) in zip(axes[0], panels):
        ax.imshow((grad / grad.max().clamp_min(1e-30)).numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 * title_lines + 0.05) / height))  # room for the title only
    fig.savefig(out, dpi=100)
    plt.close(fig)


def histogram_figure(
    known: Tensor, unknown: Tensor, name: str, metrics: dict[str, float], out: Path, model: str = ""
) -> None:
    """Score histograms of known-class and unknown-class test images; ``model`` says whose (see `describe`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(min(known.min(), unknown.min()).item(), max(known.max(), unknown.max()).item(), 40)
    ax.hist(known.numpy(), bins=bins, alpha=0.6, density=True, label=f"known classes ({len(known)})")
    ax.hist(unknown.numpy(), bins=bins, alpha=0.6, density=True, label=f"unknown classes ({len(unknown)})")
    ax.set(xlabel=name.replace("_", " "), ylabel="density")
    scores = f"{name}: AUROC {metrics['auroc']:.3f}, FPR@95%TPR {metrics['fpr95']:.3f}"
    ax.set_title(f"{model}\n{scores}" if model else scores, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
