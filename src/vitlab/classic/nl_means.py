"""Non-local means denoising.

Buades, Coll and Morel, "A non-local algorithm for image denoising", CVPR 2005, and "Non-Local Means Denoising",
Image Processing On Line 1 (2011), doi:10.5201/ipol.2011.bcm_nlm.

The observation is z = y + n, a clean image y in [0, 1] plus white Gaussian noise of known standard deviation sigma
(clipped back to [0, 1]: `add_noise`). Each pixel is replaced by a weighted mean of the pixels x2 in its search
window S(x1) (a square of side ``search_size`` around x1, inside the image, or the whole image):

    y_hat(x1) = sum_{x2 in S(x1)} w(x1, x2) z(x2),     w(x1, x2) = exp(-f(x1, x2) / h^2) / C(x1)
    f(x1, x2) = (1 / channels) sum_c sum_u k(u) (z_c(x1 + u) - z_c(x2 + u))^2

with C(x1) the sum of the unnormalised weights over the window and k a Gaussian over the ``patch_size`` x
``patch_size`` patch offsets u, of standard deviation (patch_size - 1) / 4 and sum 1 (so f is a weighted mean of
squared differences and h is on the scale of sigma). Patches that cross the border are completed by mirror
reflection.

Two noisy copies of the same patch are 2 sigma^2 apart on average, so a distance below that says nothing about the
patches' difference. Buades et al. (IPOL 2011) therefore use max(f - 2 sigma^2, 0) in place of f
(``subtract_noise=True``, the default, as scikit-image's ``denoise_nl_means(sigma=...)``): every patch within the
noise's reach counts as much as the pixel's own. With ``subtract_noise=False`` the weights are exp(-f / h^2) as
written above, which is exactly softmax attention over the window with logits -f / h^2 (`vitlab.classic.bridge`).
``center_weight="max"`` gives the pixel itself the largest weight of the other pixels of its window instead of
exp(0) = 1, the other remedy of the same paper, which matters without the subtraction.

The implementation loops over the search offsets d, never over pixels: for one offset, f(x, x + d) for every x is
the squared-difference image (z - z shifted by d)^2 filtered by k, a separable Gaussian (two 1-D passes). Since
f(x, x + d) = f(x + d, x), the offsets d and -d share one filtered image, which halves the work. Rows are processed
in chunks, so that memory beyond the image and its accumulators is bounded by ``chunk_pixels`` whatever the image
size.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitlab._plot import pyplot
from vitlab.errors import VitlabError

# h = H_PER_SIGMA * sigma when h is not given: chosen by measurement on scikit-image's sample images (camera,
# astronaut in gray, coins, moon) at sigma 10, 20 and 30 out of 255, patch 7, search 21, with the default
# subtract_noise=True. The best multiple runs from 0.7 (sigma 30) to 1.0 (sigma 10, smooth images); 0.8 beat
# scikit-image's exact mode at its recommended h on every one, by 0.15 to 1.2 dB on 256 x 256 crops
# (`benchmarks/nl_means.py` measures the whole images; docs/classic.md).
H_PER_SIGMA = 0.8
DEFAULT_CHUNK_PIXELS = 1 << 18  # output pixels per chunk: a 512 x 512 image in one piece

ArrayLike = np.ndarray | torch.Tensor


def add_noise(image: ArrayLike, sigma: float, *, seed: int = 0) -> ArrayLike:
    """The observation z = clip(y + n, 0, 1), n white Gaussian noise of standard deviation ``sigma`` (on the
    [0, 1] scale of ``image``), drawn from ``seed``. Returns the type it was given (float32)."""
    _check_sigma(sigma)
    y = _as_tensor(image)
    g = torch.Generator().manual_seed(seed)
    z = (y + sigma * torch.randn(y.shape, generator=g)).clamp_(0, 1)
    return z.numpy() if isinstance(image, np.ndarray) else z


def patch_kernel(patch_size: int) -> torch.Tensor:
    """The 1-D factor g of the patch kernel k(u) = g(u_row) g(u_col): Gaussian of standard deviation
    (patch_size - 1) / 4 (as Buades et al. and scikit-image), summing to 1 (float64 [patch_size])."""
    u = torch.arange(patch_size, dtype=torch.float64) - patch_size // 2
    s = max((patch_size - 1) / 4, 1e-3)  # patch_size 1: a single tap
    g = torch.exp(-(u**2) / (2 * s * s))
    return g / g.sum()


def nl_means(
    image: ArrayLike,
    sigma: float,
    patch_size: int = 7,
    search_size: int | None = 21,
    h: float | None = None,
    *,
    subtract_noise: bool = True,
    center_weight: Literal["one", "max"] = "one",
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
) -> ArrayLike:
    """Non-local means of ``image`` (see the module docstring for the definition).

    ``image``: (H, W) grayscale or (H, W, C) colour, numpy or torch, float in [0, 1] (uint8 is divided by 255).
    ``sigma``: the noise standard deviation on that [0, 1] scale (20 / 255 for "sigma 20"). ``h`` defaults to
    ``H_PER_SIGMA * sigma``. ``search_size``: side of the square search window (odd), or None for the whole image
    (cost grows as the square of the pixel count). Returns float32 of the input's type and shape.
    """
    _check_sigma(sigma)
    _check_odd("patch_size", patch_size)
    if search_size is not None:
        _check_odd("search_size", search_size)
    if h is None:
        h = H_PER_SIGMA * sigma
    if not h > 0:
        raise VitlabError(f"h must be > 0 (got {h}); give sigma > 0 or h > 0")
    if center_weight not in ("max", "one"):
        raise VitlabError(f"center_weight must be 'max' or 'one', got {center_weight!r}")
    y = _as_tensor(image)
    z = y[None] if y.ndim == 2 else y.permute(2, 0, 1)  # (C, H, W)
    floor = 2 * sigma**2 if subtract_noise else 0.0
    out = _nl_means_chw(z.contiguous(), h, floor, patch_size, search_size, center_weight, max(chunk_pixels, 1))
    out = out[0] if y.ndim == 2 else out.permute(1, 2, 0).contiguous()
    return out.numpy() if isinstance(image, np.ndarray) else out


def _nl_means_chw(
    z: torch.Tensor,
    h: float,
    floor: float,
    patch_size: int,
    search_size: int | None,
    center_weight: str,
    chunk_pixels: int,
) -> torch.Tensor:
    C, H, W = z.shape
    pr = patch_size // 2
    g = patch_kernel(patch_size).tolist()
    zp = reflect_pad(z, pr)  # (C, H + 2 pr, W + 2 pr): patches of border pixels
    ry = H - 1 if search_size is None else min(search_size // 2, H - 1)
    rx = W - 1 if search_size is None else min(search_size // 2, W - 1)
    neg_inv_h2 = -1.0 / (h * h)
    num = torch.zeros_like(z)  # sum of w z over the window, the pixel itself left for the end
    den = torch.zeros(H, W)
    wmax = torch.zeros(H, W)
    rows = max(1, chunk_pixels // W)
    # one of each pair {d, -d}: dy > 0, or dy == 0 and dx > 0
    offsets = [(dy, dx) for dy in range(ry + 1) for dx in range(-rx, rx + 1) if dy > 0 or dx > 0]
    for r0 in range(0, H, rows):
        for dy, dx in offsets:
            # x1 = (i, j) pairs with x2 = (i + dy, j + dx): both inside the image, i in this chunk
            i0, i1 = r0, min(r0 + rows, H - dy)
            j0, j1 = max(0, -dx), min(W, W - dx)
            if i1 <= i0 or j1 <= j0:
                continue
            n, m = i1 - i0, j1 - j0
            a = zp[:, i0 : i1 + 2 * pr, j0 : j1 + 2 * pr]
            b = zp[:, i0 + dy : i1 + dy + 2 * pr, j0 + dx : j1 + dx + 2 * pr]
            sq = (a - b).square_().mean(0)  # (n + 2 pr, m + 2 pr): the mean over channels
            # the separable kernel: a pass along rows, then along columns
            t = sq[:, 0:m] * g[0]
            for k in range(1, patch_size):
                t.add_(sq[:, k : k + m], alpha=g[k])
            f = t[0:n] * g[0]
            for k in range(1, patch_size):
                f.add_(t[k : k + n], alpha=g[k])
            if floor:
                f.sub_(floor).clamp_(min=0)
            w = f.mul_(neg_inv_h2).exp_()  # (n, m): w(x1, x2) = w(x2, x1), unnormalised
            x1, x2 = (slice(i0, i1), slice(j0, j1)), (slice(i0 + dy, i1 + dy), slice(j0 + dx, j1 + dx))
            for p, q in ((x1, x2), (x2, x1)):  # p receives the vote of q
                den[p] += w
                num[(slice(None), *p)].addcmul_(w, z[(slice(None), *q)])
                if center_weight == "max":
                    torch.maximum(wmax[p], w, out=wmax[p])
    if center_weight == "max":
        # a window whose other weights all underflowed: any positive self-weight returns z itself
        self_w = torch.where(wmax > 0, wmax, torch.ones_like(wmax))
    else:
        self_w = torch.ones_like(wmax)
    return (num + self_w * z) / (den + self_w)


def nl_means_weights(
    image: ArrayLike,
    sigma: float,
    pixel: tuple[int, int],
    patch_size: int = 7,
    search_size: int | None = 21,
    h: float | None = None,
    *,
    subtract_noise: bool = True,
    center_weight: Literal["one", "max"] = "one",
) -> torch.Tensor:
    """The normalised weights w(x1, .) of ``pixel`` = x1 = (row, col) over its search window, float64
    [S, S] centred on x1 (S = search_size, or 2 max(H, W) - 1 for the whole image); positions outside the image
    are NaN. Computed directly for the one pixel: ``(weights * window of z).sum()`` is ``nl_means(...)[x1]``."""
    _check_sigma(sigma)
    _check_odd("patch_size", patch_size)
    y = _as_tensor(image).double()
    z = y[None] if y.ndim == 2 else y.permute(2, 0, 1)  # (C, H, W)
    C, H, W = z.shape
    i, j = pixel
    if not (0 <= i < H and 0 <= j < W):
        raise VitlabError(f"pixel {pixel} is outside the {H}x{W} image")
    if search_size is None:
        search_size = 2 * max(H, W) - 1
    _check_odd("search_size", search_size)
    h = H_PER_SIGMA * sigma if h is None else h
    pr, r = patch_size // 2, search_size // 2
    g = patch_kernel(patch_size)
    k = g[:, None] * g[None, :]  # (p, p)
    zp = reflect_pad(z, pr)
    patches = zp.unfold(1, patch_size, 1).unfold(2, patch_size, 1)  # (C, H, W, p, p): the patch at each pixel
    ref = patches[:, i, j]  # (C, p, p)
    rows, cols = torch.arange(i - r, i + r + 1), torch.arange(j - r, j + r + 1)
    inside = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]  # (S, S)
    rr, cc = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    cand = patches[:, rr][:, :, cc]  # (C, S, S, p, p)
    f = ((cand - ref[:, None, None]) ** 2 * k).sum((-1, -2)).mean(0)  # (S, S)
    if subtract_noise:
        f = (f - 2 * sigma**2).clamp(min=0)
    w = torch.exp(-f / (h * h)).masked_fill(~inside, 0.0)
    if center_weight == "max":
        others = w.clone()
        others[r, r] = 0.0
        w[r, r] = others.max() if others.max() > 0 else 1.0
    w = w / w.sum()
    return w.masked_fill(~inside, float("nan"))


def plot_nl_means_weights(
    image: ArrayLike,
    sigma: float,
    pixel: tuple[int, int],
    out: str,
    patch_size: int = 7,
    search_size: int = 21,
    h: float | None = None,
) -> str:
    """Draw, as the lecture slides do, the image with ``pixel``'s search window and patch outlined, beside the
    weights w(pixel, .) over that window. Writes ``out`` (PNG) and returns its path."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    w = nl_means_weights(image, sigma, pixel, patch_size, search_size, h).numpy()
    arr = _as_tensor(image).numpy()
    i, j = pixel
    r, pr = search_size // 2, patch_size // 2
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 4.5))
    ax0.imshow(arr, cmap="gray", vmin=0, vmax=1)
    ax0.add_patch(Rectangle((j - r - 0.5, i - r - 0.5), 2 * r + 1, 2 * r + 1, fill=False, ec="tab:orange", lw=1.5))
    ax0.add_patch(Rectangle((j - pr - 0.5, i - pr - 0.5), 2 * pr + 1, 2 * pr + 1, fill=False, ec="tab:red", lw=1))
    ax0.set_title(f"noisy image, pixel {pixel}: search window and patch")
    im = ax1.imshow(w, cmap="magma")
    ax1.plot([r], [r], "c+", ms=12)
    ax1.set_title(f"NL-means weights over the {search_size}x{search_size} window")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for ax in (ax0, ax1):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --- helpers -------------------------------------------------------------------------------------------------
def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror-pad the last two dimensions of ``x`` by ``pad`` (reflection without repeating the edge, as
    numpy's 'reflect'), for any pad, also one wider than the image (the reflection then folds back)."""
    if pad == 0:
        return x
    iy, ix = _reflect_index(x.shape[-2], pad), _reflect_index(x.shape[-1], pad)
    return x[..., iy, :][..., ix]


def _reflect_index(n: int, pad: int) -> torch.Tensor:
    i = torch.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _as_tensor(image: ArrayLike) -> torch.Tensor:
    """float32 (H, W) or (H, W, C) tensor on the CPU, in [0, 1] for uint8 input."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image.detach().cpu()
    if t.ndim not in (2, 3):
        raise VitlabError(f"image must be (H, W) or (H, W, C), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float() / 255
    if not t.is_floating_point():
        raise VitlabError(f"image must be float in [0, 1] or uint8, got {t.dtype}")
    return t.float()


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise VitlabError(f"sigma must be a noise standard deviation >= 0, got {sigma}")


def _check_odd(name: str, size: int) -> None:
    if not (isinstance(size, int) and size >= 1 and size % 2 == 1):
        raise VitlabError(f"{name} must be an odd number of pixels >= 1, got {size}")


# --- files -----------------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> np.ndarray:
    """An image file at its own size as float32 in [0, 1]: (H, W) for grayscale, (H, W, 3) for anything in
    colour, decoded as everywhere else (`vitlab.data.images.decode_image`: 16-bit values keep their high byte,
    transparency is composited on white). `VitlabError` if it is missing or cannot be decoded."""
    from vitlab.data.images import decode_image

    if not Path(path).is_file():
        raise VitlabError(f"image {path} does not exist")
    image = decode_image(path).numpy().astype(np.float32) / 255  # (C, H, W), C the image's own channels
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def write_png(image: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, format="PNG")


def quality(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``image`` against ``reference``, both in [0, 1] (scikit-image's metrics)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if image.shape != reference.shape:
        size = lambda a: "x".join(map(str, a.shape)) + (" (grayscale)" if a.ndim == 2 else "")
        raise VitlabError(f"the reference is {size(reference)}, the image {size(image)}: they must match")
    ssim = structural_similarity(image, reference, data_range=1.0, channel_axis=-1 if image.ndim == 3 else None)
    return {"psnr": float(peak_signal_noise_ratio(reference, image, data_range=1.0)), "ssim": float(ssim)}


def denoise_file(
    path: str | Path,
    sigma255: float,
    out: str | Path,
    *,
    reference: str | Path | None = None,
    add_noise_first: bool = False,
    seed: int = 0,
    patch_size: int = 7,
    search_size: int | None = 21,
    h255: float | None = None,
    weights_at: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """`vitlab denoise`: read ``path`` (the noisy observation, or with ``add_noise_first`` a clean image that
    noise of ``sigma255`` / 255 is added to, which then serves as the reference), denoise it with `nl_means`,
    write ``out`` as PNG, and measure PSNR / SSIM against the reference when there is one. Sigma and h are given
    out of 255. Returns the facts printed."""
    _check_sigma(sigma255)
    if sigma255 == 0 and not h255:
        raise VitlabError("sigma must be > 0 (the noise level out of 255, e.g. 20), or give --h")
    image = read_image(path)
    clean = read_image(reference) if reference else None
    if add_noise_first:
        clean = image if clean is None else clean
        image = add_noise(image, sigma255 / 255, seed=seed)
        write_png(image, Path(out).with_name(Path(out).stem + "-noisy.png"))
    start = time.perf_counter()
    result = nl_means(image, sigma255 / 255, patch_size, search_size, None if h255 is None else h255 / 255)
    elapsed = time.perf_counter() - start
    write_png(result, out)
    facts: dict[str, Any] = {"out": str(out), "shape": list(image.shape), "time_s": elapsed}
    if clean is not None:
        facts["noisy"] = quality(image, clean)
        facts["denoised"] = quality(result, clean)
    if weights_at is not None:
        pic = Path(out).with_name(Path(out).stem + "-weights.png")
        facts["weights_png"] = plot_nl_means_weights(
            image,
            sigma255 / 255,
            weights_at,
            str(pic),
            patch_size,
            search_size or 21,
            None if h255 is None else h255 / 255,
        )
    return facts
