"""Fashion-MNIST (Xiao et al. 2017, https://github.com/zalandoresearch/fashion-mnist): 28x28 grayscale, 10 classes.

The four IDX files are taken from the first of: ``--data-dir`` (or its ``fashion-mnist/`` folder), the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), the vitlab cache; else they are
downloaded into the cache.

Two checksums per file. A download is checked against the MD5 of the official .gz published in the upstream
README. Every file, wherever it comes from, is then checked by the SHA256 of its *decompressed* content: the
Debian package recompressed the files (its .gz lack the original name field, 23-24 bytes shorter), so their MD5s
differ from the official ones while the data is the same, and a user may have unpacked them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from vitlab.data.download import cache_dir, download
from vitlab.data.idx import parse_idx, read_maybe_gzip
from vitlab.errors import VitlabError

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# The S3 website endpoint is the one the README links to and serves plain HTTP only; the MD5 check guards the
# content. GitHub holds the same files in the repository.
MIRRORS = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
]
# file stem: (MD5 of the official .gz, SHA256 of the decompressed IDX data)
FILES = {
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _search_dirs(data_dir: str | None) -> list[Path]:
    dirs = [Path(data_dir).expanduser(), Path(data_dir).expanduser() / "fashion-mnist"] if data_dir else []
    return [*dirs, SYSTEM_DIR, cache_dir() / "fashion-mnist"]


def locate(data_dir: str | None, *, download_missing: bool) -> dict[str, Path]:
    """The four files from the first folder that holds all of them, downloading into the cache if allowed."""
    dirs = _search_dirs(data_dir)
    for folder in dirs:
        found = {stem: _find(folder, stem) for stem in FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    how = (
        "install it with `apt-get install dataset-fashion-mnist`, or put the four files"
        f" ({', '.join(f'{stem}.gz' for stem in FILES)}) in --data-dir"
    )
    if not download_missing:
        raise VitlabError(f"Fashion-MNIST not found in {', '.join(map(str, dirs))}: {how}")
    target = cache_dir() / "fashion-mnist"
    try:
        for stem, (md5, _) in FILES.items():
            if _find(target, stem) is None:
                download([f"{mirror}{stem}.gz" for mirror in MIRRORS], target / f"{stem}.gz", md5=md5)
    except VitlabError as e:
        raise VitlabError(f"Fashion-MNIST not found locally and {e}: {how}") from e
    return {stem: target / f"{stem}.gz" for stem in FILES}


def _read(path: Path, sha256: str) -> Tensor:
    data = read_maybe_gzip(path)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise VitlabError(
            f"checksum mismatch for {path}: its content has sha256 {got}, expected {sha256}; the file is corrupt or"
            " not Fashion-MNIST, delete it and get it again"
        )
    return parse_idx(data, source=str(path))


def load_fashion_mnist(data_dir: str | None = None, *, download_missing: bool = True) -> dict[str, Tensor]:
    """``{"train_images": uint8 [60000, 1, 28, 28], "train_labels": int64 [60000], "test_images", "test_labels"}``."""
    paths = locate(data_dir, download_missing=download_missing)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read(paths[f"{prefix}-images-idx3-ubyte"], FILES[f"{prefix}-images-idx3-ubyte"][1])
        labels = _read(paths[f"{prefix}-labels-idx1-ubyte"], FILES[f"{prefix}-labels-idx1-ubyte"][1])
        if (
            images.ndim != 3
            or images.dtype != torch.uint8
            or labels.shape != images.shape[:1]
            or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASS_NAMES))
        ):
            raise VitlabError(
                f"Fashion-MNIST {split} files are inconsistent: images {tuple(images.shape)} {images.dtype}, labels"
                f" {tuple(labels.shape)}; delete them and get them again"
            )
        out[f"{split}_images"] = images[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
        out[f"{split}_labels"] = labels.long()
    return out
