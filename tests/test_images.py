"""Image decoding (`vitlab.data.images.decode_image`): every Pillow mode to the values the module docstring
promises, 16-bit files equal to their 8-bit copies through a folder dataset and a training run, and one-line errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import build_dataset
from vitlab.data.images import decode_image
from vitlab.errors import VitlabError


def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only): ``values`` uint16 (H, W) grey or (H, W, C) with
    C = 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."""
    H, W = values.shape[:2]
    C = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[C]
    rows = values.astype(">u2").reshape(H, W * C)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 (none) on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma as Pillow computes it (16-bit fixed point, rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(colour * a + 255 * (1 - a)).astype(np.uint8)


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


GREY = np.array([[0, 1, 127, 128], [200, 254, 255, 3]], dtype=np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: saved(Image.fromarray(GREY.astype(np.uint16) * 257)),  # I;16 PNG, bit-replicated
        lambda tmp: saved(Image.fromarray(GREY.astype(np.uint16) << 8)),  # I;16 PNG, shifted
        lambda tmp: saved(Image.frombytes("I;16B", (4, 2), (GREY.astype(">u2") * 257).tobytes()), "TIFF"),
        lambda tmp: b"P5 4 2 65535\n" + (GREY.astype(">u2") * 257).tobytes(),  # PGM: Pillow's mode "I"
        lambda tmp: png16(tmp / "rgb16.png", np.repeat(GREY[..., None].astype(np.uint16) * 257, 3, -1)).read_bytes(),
    ],
    ids=["I;16", "I;16-shifted", "I;16B-tiff", "I-pgm", "RGB-16bit"],
)
def test_sixteen_bit_decodes_to_its_eight_bit_values(make, tmp_path: Path) -> None:
    x = decode_image(make(tmp_path), in_chans=1)
    assert x.dtype == torch.uint8 and x.shape == (1, 2, 4)
    assert x[0].numpy().tolist() == GREY.tolist()  # not clipped to white above 255
    assert decode_image(make(tmp_path), in_chans=3).tolist() == [GREY.tolist()] * 3


def test_sixteen_bit_scales_the_whole_range() -> None:
    values = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    x = decode_image(saved(Image.fromarray(values)), in_chans=1)
    assert x[0, 0].tolist() == [0, 0, 1, 15, 128, 255]  # the high byte of each value


def test_eight_bit_modes_and_channel_conversion() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 200, 30]]], dtype=np.uint8)
    assert hwc(decode_image(saved(Image.fromarray(rgb)), in_chans=3)).tolist() == rgb.tolist()
    assert decode_image(saved(Image.fromarray(rgb)), in_chans=1)[0].numpy().tolist() == luma(rgb).tolist()
    grey = decode_image(saved(Image.fromarray(GREY)), in_chans=3)
    assert grey.tolist() == [GREY.tolist()] * 3
    bits = Image.fromarray(GREY > 100)  # mode "1"
    assert bits.mode == "1"
    assert decode_image(saved(bits), in_chans=1)[0].numpy().tolist() == np.where(GREY > 100, 255, 0).tolist()
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert hwc(decode_image(saved(cmyk, "TIFF"), in_chans=3)).reshape(-1, 3).tolist() == [[255, 0, 0]] * 2
    # in_chans=None: the image's own channels
    assert decode_image(saved(Image.fromarray(GREY))).shape == (1, 2, 4)
    assert decode_image(saved(Image.fromarray(rgb))).shape == (3, 2, 2)


def test_transparency_is_composited_on_white() -> None:
    rgba = np.array([[[200, 100, 0, 128], [0, 0, 0, 0]], [[9, 99, 199, 255], [255, 255, 255, 64]]], dtype=np.uint8)
    want = over_white(rgba[..., :3], rgba[..., 3])
    assert hwc(decode_image(saved(Image.fromarray(rgba)), in_chans=3)).tolist() == want.tolist()
    assert decode_image(saved(Image.fromarray(rgba)), in_chans=1)[0].numpy().tolist() == luma(want).tolist()
    la = np.stack([GREY, np.array([[0, 255, 128, 255], [255, 0, 10, 255]], dtype=np.uint8)], -1)
    want_la = over_white(la[..., :1], la[..., 1])[..., 0]
    assert decode_image(saved(Image.fromarray(la, "LA")), in_chans=1)[0].numpy().tolist() == want_la.tolist()
    # 16-bit RGBA: the high byte of colour and alpha
    rgba16 = png16_bytes(rgba.astype(np.uint16) * 257)
    assert hwc(decode_image(rgba16, in_chans=3)).tolist() == want.tolist()


def png16_bytes(values: np.ndarray) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return png16(Path(d) / "x.png", values).read_bytes()


def test_palette_with_and_without_transparency() -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9)  # 0 red, 1 green, 2 black
    index = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette)
    assert hwc(decode_image(saved(img), in_chans=3)).tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 0]] * 2]
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=2)  # index 2 (black) transparent
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("transparency") == 2
    out = hwc(decode_image(buf.getvalue(), in_chans=3))
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0]], [[255, 255, 255]] * 2]  # transparent black: white
    img.info["transparency"] = 2
    gif = saved(img, "GIF")
    assert hwc(decode_image(gif, in_chans=3)).tolist() == out.tolist()


def test_unreadable_input_is_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(saved(Image.fromarray(GREY))[:40])  # truncated
    for source, name in ((bad, str(bad)), (b"not an image", "the image"), (tmp_path / "missing.png", "missing.png")):
        with pytest.raises(VitlabError) as e:
            decode_image(source, in_chans=1)
        assert "\n" not in str(e.value) and name in str(e.value) and str(e.value).startswith("cannot read image")
    with pytest.raises(VitlabError, match="1 or 3 channels"):
        decode_image(saved(Image.fromarray(GREY)), in_chans=2)


# --- a folder of 16-bit files is its 8-bit copy -------------------------------------------------------------------
def two_class_folders(root: Path, n: int = 24, side: int = 8) -> tuple[Path, Path]:
    """The same images twice: 8-bit grey PNGs under root/8bit and 16-bit ones (grey and RGB) under root/16bit.
    Class 'bright' has a bright left half; values span the whole 8-bit range, so clipping would show."""
    rng = np.random.default_rng(0)
    for k in range(n):
        for cls in ("bright", "dark"):
            img = rng.integers(0, 256, (side, side)).astype(np.uint8)
            img[:, : side // 2] = np.maximum(img[:, : side // 2], 160) if cls == "bright" else img[:, : side // 2] // 4
            (root / "8bit" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "8bit" / cls / f"{k}.png")
            wide = img.astype(np.uint16) * 257
            if k % 2:
                png16(root / "16bit" / cls / f"{k}.png", np.repeat(wide[..., None], 3, -1))
            else:
                (root / "16bit" / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(wide).save(root / "16bit" / cls / f"{k}.png")
    return root / "8bit", root / "16bit"


def test_a_folder_of_16_bit_pngs_decodes_as_its_8_bit_copy(tmp_path: Path) -> None:
    eight, sixteen = two_class_folders(tmp_path)
    assert Image.open(sixteen / "dark" / "0.png").mode == "I;16"
    for in_chans, size in ((1, (8, 8)), (3, (11, 6))):  # resizing too
        a, b = (
            build_dataset(f"folder:{d}", in_chans=in_chans, img_size=size, val_fraction=0.2) for d in (eight, sixteen)
        )
        assert (a.mean, a.std) == (b.mean, b.std)
        for split in ("train", "val", "test"):
            (xa, ya), (xb, yb) = (next(iter(getattr(s, split).loader(100, shuffle=False))) for s in (a, b))
            assert torch.equal(ya, yb) and torch.equal(xa, xb), split


@pytest.mark.slow
def test_a_16_bit_folder_trains_as_its_8_bit_copy(tmp_path: Path) -> None:
    from vitlab.train import TrainConfig, train

    eight, sixteen = two_class_folders(tmp_path)
    model_args = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}
    runs = {d: dict(data=f"folder:{d}", out=str(tmp_path / f"run-{d.name}")) for d in (eight, sixteen)}
    common = dict(model="vit_tiny_patch4_28", model_args=model_args, val_fraction=0.2, epochs=3, batch_size=8, lr=3e-3)
    summaries = [
        train(TrainConfig(**common, **run, precision="fp32", threads=1, num_workers=0)) for run in runs.values()
    ]
    a, b = summaries
    assert a["test_accuracy"] > 0.75  # the classes are easy: the run learned them
    assert a["test_accuracy"] == b["test_accuracy"]
