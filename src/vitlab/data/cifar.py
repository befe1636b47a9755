"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): 32x32 RGB.

Read from the official "python version" archives: the unpacked folder (``cifar-10-batches-py`` /
``cifar-100-python``) or the .tar.gz under ``--data-dir`` or the vitlab cache, else downloaded into the cache. An
archive is checked against its published MD5 before it is unpacked beside itself (or into the cache where that
folder is read-only). CIFAR-100 uses the 100 fine labels.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitlab._io import atomic_directory
from vitlab.data.download import cache_dir, download, verify_md5
from vitlab.errors import VitlabError


@dataclass(frozen=True)
class CifarSource:
    title: str
    url: str
    md5: str
    folder: str  # the folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]


SOURCES = {
    "cifar10": CifarSource(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": CifarSource(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 moved numpy.core to numpy._core
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a pickle can run arbitrary code, and these files may come from
    anywhere. The CIFAR batches were written by Python 2 with numpy 1 (``numpy.core``)."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise VitlabError(f"{path} is not a CIFAR batch file ({e}); delete it and get the archive again") from e
    if not isinstance(obj, dict):
        raise VitlabError(f"{path} is not a CIFAR batch file (holds a {type(obj).__name__}, not a dict)")
    return obj


def _extract(archive: Path, source: CifarSource) -> Path:
    """Unpack the dataset folder of ``archive`` beside it, or into the cache if that fails; return the folder."""
    for parent in (archive.parent, cache_dir()):
        try:
            with tarfile.open(archive, "r:gz") as tar, atomic_directory(parent / source.folder) as tmp:
                for member in tar.getmembers():
                    parts = PurePosixPath(member.name).parts
                    # Only the flat files of the dataset folder: no member can write outside ``tmp``.
                    if member.isfile() and len(parts) == 2 and parts[0] == source.folder:
                        with tar.extractfile(member) as src, open(tmp / parts[1], "wb") as dst:
                            shutil.copyfileobj(src, dst)
            return parent / source.folder
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise VitlabError(f"{archive} is a corrupt archive ({e}); delete it and get it again") from e
        except PermissionError:
            continue  # a read-only data folder: unpack into the cache instead
    raise VitlabError(f"cannot unpack {archive}: neither {archive.parent} nor {cache_dir()} is writable")


def locate(source: CifarSource, data_dir: str | None, *, download_missing: bool) -> Path:
    """The unpacked dataset folder: found, unpacked from a found archive, or downloaded and unpacked."""
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    dirs.append(cache_dir())
    for folder in dirs:
        if (folder / source.folder).is_dir():
            return folder / source.folder
    for folder in dirs:
        if (folder / source.archive).is_file():
            verify_md5(folder / source.archive, source.md5)
            return _extract(folder / source.archive, source)
    how = f"put {source.folder}/ or {source.archive} (from {source.url}) in --data-dir"
    if not download_missing:
        raise VitlabError(f"{source.title} not found in {', '.join(map(str, dirs))}: {how}")
    try:
        archive = download([source.url], cache_dir() / source.archive, md5=source.md5, timeout=120)
    except VitlabError as e:
        raise VitlabError(f"{source.title} not found locally and {e}: {how}") from e
    return _extract(archive, source)


def _read_batches(folder: Path, files: tuple[str, ...], source: CifarSource) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise VitlabError(f"{path} is missing; delete {folder} and unpack {source.archive} again")
        batch = _unpickle(path)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are R, G, B planes of 32x32
            labels.append(torch.as_tensor(batch[source.label_key], dtype=torch.int64))
        except (KeyError, ValueError) as e:
            raise VitlabError(f"{path} is not a {source.title} batch file (no usable {e})") from e
        if len(images[-1]) != len(labels[-1]):
            raise VitlabError(f"{path} holds {len(images[-1])} images but {len(labels[-1])} labels")
    return torch.cat(images), torch.cat(labels)


def load_cifar(name: str, data_dir: str | None = None, *, download_missing: bool = True) -> dict[str, Any]:
    """``{"train_images": uint8 [N, 3, 32, 32], "train_labels": int64 [N], "test_images", "test_labels",
    "class_names": list[str]}`` for ``name`` in ``SOURCES``."""
    source = SOURCES[name]
    folder = locate(source, data_dir, download_missing=download_missing)
    meta = _unpickle(folder / source.meta_file) if (folder / source.meta_file).is_file() else {}
    if source.names_key not in meta:
        raise VitlabError(f"{folder / source.meta_file} is missing or has no {source.names_key.decode()}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[source.names_key]]
    train_images, train_labels = _read_batches(folder, source.train_files, source)
    test_images, test_labels = _read_batches(folder, source.test_files, source)
    for labels in (train_labels, test_labels):
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
            raise VitlabError(f"{folder} has labels outside 0..{len(class_names) - 1}")
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "class_names": class_names,
    }
