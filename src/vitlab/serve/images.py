"""Uploads to model input, refusing what could hurt the server before it is decoded.

Only the formats a browser or camera sends are opened (no EPS, which Pillow hands to Ghostscript); the image's
declared size is checked against a pixel limit before its pixels are decoded (a decompression bomb is a small file
that decodes to gigabytes); truncated and corrupt files are errors, not half-grey images. Each refusal is an
`UploadError` carrying an HTTP status and a one-line message.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vitlab.data.images import decode_image
from vitlab.errors import VitlabError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class UploadError(VitlabError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, *, in_chans: int, img_size: tuple[int, int], max_pixels: int) -> Tensor:
    """Image file bytes -> uint8 ``[in_chans, H, W]`` at the model's size, or an `UploadError`."""
    if not data:
        raise UploadError(400, "the uploaded file is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise UploadError(415, f"the upload is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:  # Pillow's own limit (179 megapixels), far above ours, checked in open
        raise UploadError(413, f"the image has too many pixels; the limit is {max_pixels / 1e6:g} megapixels") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UploadError(400, f"the image header is corrupt: {_first_line(e)}") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise UploadError(
                413, f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:g}"
            )
        if w == 0 or h == 0:
            raise UploadError(400, f"the image is {w}x{h} pixels")
        try:
            return decode_image(img, in_chans=in_chans, img_size=img_size)  # the decoder training used
        except VitlabError as e:  # what Pillow raised on the pixels, in one line
            raise UploadError(400, f"the image is truncated or corrupt: {_first_line(e.__cause__ or e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
