"""Non-local means is attention: the same computation written with vitlab's shared attention core.

Buades, Coll and Morel (CVPR 2005) average the pixels of a search window with weights exp(-f(x1, x2) / h^2),
normalised over the window; that is a softmax over the window. Wang, Girshick, Gupta and He ("Non-local Neural
Networks", CVPR 2018, section 3) made this reading explicit, and self-attention (Vaswani et al., 2017) is its
learned form. Here, for the plain formula (``subtract_noise=False, center_weight="one"``):

* query and key of a pixel: its patch, each value multiplied by sqrt(k(u) / channels), so that
  f(x1, x2) = ||q_x1 - k_x2||^2 exactly (k the patch kernel of `vitlab.classic.nl_means`);
* value: the pixel itself;
* logits -||q - k||^2 / h^2 = (2 q.k - |q|^2 - |k|^2) / h^2. The |q|^2 term is the same for every key of a query
  and cancels in the softmax; 2 q.k / h^2 is the attention product (queries scaled by 2 / h^2); -|k|^2 / h^2 is an
  additive bias per key, which also carries the window as -inf outside it.

`nl_means_attention` runs exactly that through `vitlab.layers.AttentionBase.attend` on its explicit path, so the
maps come out of the same ``attn_probs`` point that vitlab's attention tools record for transformers. The bridge
test checks that it equals `nl_means`. It holds an [N, N] map, N the pixel count: use small images or a few
query pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._plot import pyplot
from vitlab.classic.nl_means import H_PER_SIGMA, ArrayLike, _as_tensor, nl_means_weights, patch_kernel, reflect_pad
from vitlab.errors import VitlabError
from vitlab.layers import AttentionBase, record_attention


def nl_means_attention(
    image: ArrayLike,
    sigma: float,
    patch_size: int = 7,
    search_size: int | None = 21,
    h: float | None = None,
    *,
    pixels: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NL-means with ``subtract_noise=False`` as one head of softmax attention over the search window.

    Returns ``(output, probs)``: for every pixel (``pixels=None``) the denoised image (H, W) or (H, W, C) and the
    attention probabilities [N, N] (query pixel -> key pixel, row-major); for the listed ``pixels`` (row, col) their
    values [Q, C] and probabilities [Q, N]. Computed in float64.
    """
    h = H_PER_SIGMA * sigma if h is None else h
    if not h > 0:
        raise VitlabError(f"h must be > 0 (got {h}); give sigma > 0 or h > 0")
    y = _as_tensor(image).double()
    z = y[None] if y.ndim == 2 else y.permute(2, 0, 1)  # (C, H, W)
    C, H, W = z.shape
    N = H * W
    g = patch_kernel(patch_size)
    k_weight = (g[:, None] * g[None, :]).flatten().repeat(C) / C  # (C p p,), unfold's channel-major order
    patches = F.unfold(reflect_pad(z, patch_size // 2)[None], patch_size)[0].T  # (N, C p p)
    keys = patches * k_weight.sqrt()  # f(x1, x2) = ||keys[x1] - keys[x2]||^2
    values = z.flatten(1).T  # (N, C)

    rows, cols = torch.arange(N) // W, torch.arange(N) % W
    query_idx = torch.arange(N) if pixels is None else torch.tensor([i * W + j for i, j in pixels])
    if pixels is not None and any(not (0 <= i < H and 0 <= j < W) for i, j in pixels):
        raise VitlabError(f"pixels {list(pixels)} must lie inside the {H}x{W} image")
    if search_size is None:
        window = torch.ones(len(query_idx), N, dtype=torch.bool)
    else:
        r = search_size // 2
        window = ((rows[query_idx, None] - rows[None]).abs() <= r) & ((cols[query_idx, None] - cols[None]).abs() <= r)
    bias = (-(keys**2).sum(-1) / h**2).expand(len(query_idx), N).masked_fill(~window, float("-inf"))  # (Q, N)

    attn = AttentionBase(C, num_heads=1).double()
    attn.proj = nn.Identity()  # the output is the weighted mean of the values itself
    q = keys[query_idx] * (2 / h**2) / attn.scale  # attend multiplies by scale: logits = 2 q.k / h^2
    with torch.no_grad(), record_attention(attn) as maps:
        out = attn.attend(q[None, None], keys[None, None], values[None, None], bias[None, None])[0]  # (Q, C)
    probs = maps[""][0][0, 0]  # (Q, N)
    if pixels is not None:
        return out, probs
    out = out.T.reshape(C, H, W)
    return (out[0] if y.ndim == 2 else out.permute(1, 2, 0)), probs


def plot_nl_means_bridge(
    image: ArrayLike,
    sigma: float,
    pixel: tuple[int, int],
    out: str,
    patch_size: int = 7,
    search_size: int = 21,
    h: float | None = None,
) -> str:
    """Draw one pixel's NL-means weights over its search window beside the attention probabilities of that pixel's
    query over the same window (they are equal). Writes ``out`` (PNG) and returns its path."""
    plt = pyplot()

    weights = nl_means_weights(image, sigma, pixel, patch_size, search_size, h, subtract_noise=False)
    _, probs = nl_means_attention(image, sigma, patch_size, search_size, h, pixels=[pixel])
    y = _as_tensor(image)
    H, W = y.shape[:2]
    # the query's row of the [N, N] map, cut to its window (NaN outside the image, as the weights)
    r, (i, j) = search_size // 2, pixel
    full = torch.full((H + 2 * r, W + 2 * r), float("nan"), dtype=torch.float64)
    full[r : r + H, r : r + W] = probs[0].reshape(H, W)
    attn_window = full[i : i + 2 * r + 1, j : j + 2 * r + 1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    # without the noise subtraction the pixel's own weight exp(0) dwarfs the others: the scale stops at the largest
    # other weight, so the structure of the window stays visible (the centre saturates)
    others = torch.nan_to_num(weights).clone()
    others[r, r] = 0
    vmax = float(others.max())
    for ax, m, title in (
        (axes[0], weights, "NL-means weights w(x1, x2)"),
        (axes[1], attn_window, "attention softmax(-||q - k||² / h²)"),
    ):
        im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax)
        ax.plot([r], [r], "c+", ms=12)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.046)
    fig.suptitle(f"pixel {pixel}, {search_size}x{search_size} search window, patch {patch_size}")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
