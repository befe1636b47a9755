"""Image decoding: one function from a file, its bytes or an opened image to the uint8 pixels a model takes.

Every reader of images (folder datasets, caption sets, `vitlab predict`, the server, the analysis tools, NL-means)
goes through `decode_image`, so an image decodes the same way wherever it is read. What each Pillow mode becomes:

* 8-bit grey ``L`` and colour ``RGB`` are taken as stored; 1-bit ``1`` is 0 or 255.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, and ``I``, which Pillow gives 16-bit PGM files) keeps the high byte
  of each value: the whole 16-bit range maps onto 0..255, as Pillow itself reads 16-bit colour PNGs, so a 16-bit grey
  image and its 16-bit RGB copy decode alike, and an 8-bit image stored in 16 bits (v * 257, or v << 8) decodes back
  exactly. PNG samples always span the full range (the PNG spec scales them; sBIT only records the original depth).
  Pillow's ``convert("L")`` instead clips every value above 255 to white.
* Transparency (``RGBA``, ``LA``, ``PA``, or a palette / grey / RGB image with a transparent colour) is composited
  on white, as a browser shows the image on a page: the colour stored under a transparent pixel is arbitrary (black
  in most files, garbage in some), and dropping the alpha channel would train on it.
* Palette ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB (CMYK without a colour profile).
* 32-bit float ``F``: Pillow's conversion to ``L`` (values read as 0..255, clipped); no common format stores it.

The result then takes the channels asked for: grey to RGB repeats the channel, RGB to grey is the ITU-R 601-2 luma
of Pillow's ``convert("L")``. EXIF rotation is applied (phone photos store it there) before any resize.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from vitlab.errors import VitlabError

CHANNEL_MODES = {1: "L", 3: "RGB"}  # the channels a model can take, as the Pillow mode that holds them
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow raises on a file it cannot decode: unknown format and truncation are OSError, some plugins raise
# SyntaxError or ValueError on a broken header, and an absurdly large image raises DecompressionBombError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_image(
    source: str | Path | bytes | Image.Image,
    *,
    in_chans: int | None = None,
    img_size: tuple[int, int] | None = None,
    name: str | None = None,
) -> Tensor:
    """uint8 ``[in_chans, H, W]`` of an image file (a path), its bytes or an opened Pillow image.

    ``in_chans`` 1 or 3 (None: the image's own, 1 for a grey mode); ``img_size`` (H, W) resizes (bicubic), None
    keeps the stored size. An image that cannot be decoded is a one-line `VitlabError` naming ``name`` (default:
    the path, or "the image")."""
    if in_chans is not None and in_chans not in CHANNEL_MODES:
        raise VitlabError(f"images can be decoded to 1 or 3 channels, not {in_chans}")
    label = name or (str(source) if isinstance(source, str | Path) else "the image")
    try:
        if isinstance(source, Image.Image):
            return _decode(source, in_chans, img_size)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return _decode(img, in_chans, img_size)
    except DECODE_ERRORS as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(f"cannot read image {label}: {reason}") from e


def header_facts(files: Sequence[str | Path], *, sample: int = 25, default_side: int = 224) -> dict[str, Any]:
    """The typical stored size and channels of image files, read from the headers of up to ``sample`` of them
    (evenly spaced; unreadable ones passed over): ``{"img_size": (side, side), "in_chans": 1 or 3}``, side the median
    longer side, 1 channel when most are grey."""
    sides, chans = [], []
    for f in files[:: max(1, len(files) // sample)][:sample]:
        try:
            with Image.open(f) as img:
                sides.append(max(img.size))
                chans.append(stored_channels(img))
        except DECODE_ERRORS:
            continue  # an unreadable file is the split's business (--skip-bad-images)
    side = sorted(sides)[len(sides) // 2] if sides else default_side
    return {"img_size": (side, side), "in_chans": 1 if chans and chans.count(1) > len(chans) // 2 else 3}


def stored_channels(img: Image.Image) -> int:
    """1 for an image stored in a grey mode, else 3 (read from the header: nothing is decoded)."""
    return 1 if img.mode in GREY_MODES else 3


def _decode(img: Image.Image, in_chans: int | None, img_size: tuple[int, int] | None) -> Tensor:
    mode = CHANNEL_MODES[in_chans or stored_channels(img)]
    if img_size is not None:
        H, W = img_size
        # A JPEG can decode at 1/2, 1/4 or 1/8 scale directly, much faster for large photos. Asking for max(H, W)
        # on both sides keeps the draft at least as large as the target in either orientation.
        img.draft(None, (max(H, W), max(H, W)))
    img = _eight_bit(ImageOps.exif_transpose(img)).convert(mode)
    if img_size is not None and img.size != (img_size[1], img_size[0]):
        img = img.resize((img_size[1], img_size[0]), Image.Resampling.BICUBIC)
    image = torch.from_numpy(np.array(img, dtype=np.uint8))
    return image[None] if image.ndim == 2 else image.permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def _eight_bit(img: Image.Image) -> Image.Image:
    """The image as 8-bit ``L`` or ``RGB`` (grey stays grey), every mode read as the module docstring says."""
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64).clip(0, 65535)  # "I" is 32-bit; a 16-bit source fits
        return Image.fromarray((values >> 8).astype(np.uint8), "L")
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255
        rgb = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)  # over white
        flat = Image.fromarray(rgb, "RGB")
        return flat.convert("L") if img.mode in GREY_MODES else flat
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode in GREY_MODES else "RGB")


def _has_alpha(img: Image.Image) -> bool:
    palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return img.mode in _ALPHA_MODES or "transparency" in img.info or palette_alpha
