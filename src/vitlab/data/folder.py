"""Image-folder datasets: ``PATH/<class>/*.png`` or ``PATH/{train,val[,test]}/<class>/*.png``.

A folder whose decoded images fit in memory (`IN_MEMORY_BYTES`) is decoded once, by a pool of threads (Pillow
releases the GIL while it decodes and resizes), cached as one ``.npy`` file under ``$XDG_CACHE_HOME/vitlab/folders``
(``$VITLAB_FOLDER_CACHE`` when set) keyed by the files' paths, sizes and modification times and the decoded size and
channels, and then batched by indexing one tensor, as the built-in datasets are: a tiny folder otherwise spends its
run starting DataLoader workers.

A larger folder is decoded lazily by DataLoader workers, kept alive across epochs (``persistent_workers``). A worker
never raises on a bad file: it hands back a marker that the main process turns into a one-line `VitlabError`,
because an exception re-raised from a worker carries the worker's whole traceback in its message.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitlab._io import atomic_file
from vitlab.data.base import (
    Dataset,
    DatasetSplits,
    channel_histograms,
    small_class_notes,
    stats_from_histograms,
    stratified_split,
)
from vitlab.data.download import cache_dir
from vitlab.data.images import CHANNEL_MODES, decode_image, header_facts
from vitlab.errors import VitlabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_IMG_SIZE = (224, 224)
STATS_IMAGES = 500  # train images decoded to estimate mean / std
TEST_SPLIT_SEED = 0  # the test split is the same for every run seed, so runs are compared on the same images
# A folder is held in memory when its decoded images take at most this much, and at most 1/8 of the machine's RAM:
# 1 GiB is 1.3 M images of 28x28 grey, 110,000 of 56x56 RGB, 7,100 of 224x224 RGB.
IN_MEMORY_BYTES = 1 << 30
CACHE_VERSION = 1  # part of the cache key: a change to how files decode makes new entries
CACHE_ENV = "VITLAB_FOLDER_CACHE"  # where decoded folders are cached, instead of the user's cache directory


def load_image(path: str | Path, *, in_chans: int = 3, img_size: tuple[int, int] = DEFAULT_IMG_SIZE) -> Tensor:
    """Decode one image file of a dataset to uint8 [in_chans, H, W] (`vitlab.data.images.decode_image`); the
    `VitlabError` of an unreadable file says how to leave it out."""
    try:
        return decode_image(path, in_chans=in_chans, img_size=img_size)
    except VitlabError as e:
        raise VitlabError(f"{e}. Fix or delete it, or pass --skip-bad-images to leave out unreadable images") from e


class _Unreadable(NamedTuple):
    message: str


def _collate(items: list[tuple[Tensor, int] | _Unreadable]) -> tuple[Tensor, Tensor] | _Unreadable:
    for item in items:
        if isinstance(item, _Unreadable):
            return item
    images = torch.stack([image for image, _ in items])  # (b, C, H, W)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images, labels


class _Batches:
    """The batch sampler of a DataLoader that lives across epochs: each epoch sets its index batches."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderDataset(Dataset, torch.utils.data.Dataset):
    """Image files decoded to uint8 [in_chans, *img_size]: held in ``images`` (uint8 [N, C, H, W]) when the folder
    was decoded up front, else decoded on demand by `loader`'s DataLoader workers. ``unreadable`` (decoded up front):
    the error of each sample that failed to decode, raised when a batch holds it, as a lazy load would."""

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        *,
        in_chans: int = 3,
        img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
        images: Tensor | None = None,
        unreadable: dict[int, str] | None = None,
    ) -> None:
        if in_chans not in CHANNEL_MODES:
            raise VitlabError(f"images can be loaded with 1 or 3 channels, not {in_chans}")
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.labels = _labels(self.samples)
        self.in_chans = in_chans
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.images = images
        self.unreadable = unreadable or {}
        self._workers: dict[int, tuple[DataLoader, _Batches]] = {}  # num_workers -> a DataLoader kept across epochs

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_workers": {}}  # a worker process gets the files, not the DataLoader serving it

    def image(self, i: int) -> Tensor:
        """uint8 [in_chans, H, W] of sample ``i``."""
        if self.images is None:
            return load_image(self.samples[i][0], **self._decode_args())
        if i in self.unreadable:
            raise VitlabError(self.unreadable[i])
        return self.images[i]

    def __getitem__(self, i: int) -> tuple[Tensor, int] | _Unreadable:
        try:
            return self.image(i), self.samples[i][1]
        except VitlabError as e:
            return _Unreadable(str(e))

    def _decode_args(self) -> dict[str, Any]:
        return {"in_chans": self.in_chans, "img_size": self.img_size}

    def _load_batches(
        self, batches: list[Tensor], num_workers: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if self.images is not None:  # decoded up front: a batch is one tensor index, as in `InMemoryDataset`
            return (self._indexed(idx) for idx in batches)
        if num_workers == 0:
            return self._raise_unreadable(self._loader(0, generator, [b.tolist() for b in batches]))
        # Workers are started once and kept (persistent_workers): each epoch hands the same DataLoader its batches.
        # Their seeds come from the first epoch's generator; decoding draws no random number, so nothing depends on it.
        if num_workers not in self._workers:
            sampler = _Batches()
            self._workers[num_workers] = (self._loader(num_workers, generator, sampler), sampler)
        loader, sampler = self._workers[num_workers]
        sampler.batches = [batch.tolist() for batch in batches]
        return self._raise_unreadable(loader)

    def _indexed(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        for i in self.unreadable.keys() & idx.tolist() if self.unreadable else ():
            raise VitlabError(self.unreadable[i])
        return self.images[idx], self.labels[idx]

    def _loader(self, num_workers: int, generator: torch.Generator, batch_sampler: Any) -> DataLoader:
        # the DataLoader draws its worker seeds from `generator`; without one it would draw from the global generator
        return DataLoader(
            self, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate, generator=generator,
            persistent_workers=num_workers > 0,
        )  # fmt: skip

    def subset(self, indices: Tensor, labels: Tensor) -> FolderDataset:
        samples = [(self.samples[i][0], y) for i, y in zip(indices.tolist(), labels.tolist())]
        images = None if self.images is None else self.images[indices]
        bad = {new: self.unreadable[old] for new, old in enumerate(indices.tolist()) if old in self.unreadable}
        return FolderDataset(samples, in_chans=self.in_chans, img_size=self.img_size, images=images, unreadable=bad)

    def members(self) -> list[str]:
        return [path for path, _ in self.samples]

    @staticmethod
    def _raise_unreadable(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise VitlabError(batch.message)
            yield batch


def fits_in_memory(n: int, *, in_chans: int, img_size: tuple[int, int]) -> bool:
    """Whether ``n`` images decoded to uint8 [in_chans, *img_size] fit `IN_MEMORY_BYTES` and 1/8 of the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else IN_MEMORY_BYTES * 8
    return n * in_chans * img_size[0] * img_size[1] <= min(IN_MEMORY_BYTES, ram // 8)


def folder_cache_path(paths: Sequence[str], *, in_chans: int, img_size: tuple[int, int]) -> Path:
    """Where the decoded images of ``paths`` are cached: keyed by each file's absolute path, size and modification
    time (an edit that keeps the size is seen, unlike the split manifest's `files_hash`, which must survive a copy)
    and by what they are decoded to."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {in_chans} {img_size[0]}x{img_size[1]}\n".encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return Path(os.environ.get(CACHE_ENV) or cache_dir() / "folders") / f"{h.hexdigest()[:32]}.npy"


def decode_files(paths: Sequence[str], *, in_chans: int, img_size: tuple[int, int]) -> tuple[Tensor, dict[int, str]]:
    """uint8 [N, in_chans, *img_size] of image files, decoded by a pool of threads, with a progress bar on a
    terminal; and the error of each unreadable file, by index (its image is left zero)."""
    images = torch.zeros((len(paths), in_chans, *img_size), dtype=torch.uint8)
    unreadable: dict[int, str] = {}

    def decode(i: int) -> None:
        try:
            images[i] = load_image(paths[i], in_chans=in_chans, img_size=img_size)
        except VitlabError as e:
            unreadable[i] = str(e)

    from rich.progress import track  # the data layer cannot use train's Progress: imports run downwards

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        done = pool.map(decode, range(len(paths)))  # in order: an error re-raises as the loop reaches it
        quiet = not sys.stderr.isatty() or len(paths) < 1000
        for _ in track(done, total=len(paths), description="decoding images", transient=True, disable=quiet):
            pass
    return images, unreadable


def cached_decode(paths: Sequence[str], *, in_chans: int, img_size: tuple[int, int]) -> tuple[Tensor, dict[int, str]]:
    """`decode_files`, read from its cache when an entry for these files exists and is whole, written there
    (atomically) otherwise; a folder with unreadable files is not cached (its run fails or leaves them out). A
    corrupt or truncated entry is decoded again and replaced."""
    path = folder_cache_path(paths, in_chans=in_chans, img_size=img_size)
    shape = (len(paths), in_chans, *img_size)
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == shape and cached.dtype == np.uint8:
            return torch.from_numpy(cached), {}
    except (OSError, ValueError, EOFError):  # missing, unreadable or torn: decode again
        pass
    images, unreadable = decode_files(paths, in_chans=in_chans, img_size=img_size)
    if unreadable:
        return images, unreadable
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.save(f, images.numpy(), allow_pickle=False)
    except OSError:  # a read-only cache costs the next run a decode, never this one
        pass
    return images, unreadable


def decoded_in_memory(datasets: dict[str, FolderDataset]) -> dict[str, FolderDataset]:
    """The splits with their images decoded up front (one cache entry for the whole folder)."""
    first = next(iter(datasets.values()))
    args = first._decode_args()
    paths = [path for ds in datasets.values() for path in ds.members()]
    images, unreadable = cached_decode(paths, **args)
    out, start = {}, 0
    for split, ds in datasets.items():
        bad = {i - start: unreadable[i] for i in range(start, start + len(ds)) if i in unreadable}
        out[split] = FolderDataset(ds.samples, **args, images=images[start : start + len(ds)], unreadable=bad)
        start += len(ds)
    return out


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth, hidden files and folders left out), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` for the class folders directly under ``root``, sorted by name."""
    classes = {d.name: _list_images(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    for name, files in classes.items():
        if not files:
            raise VitlabError(
                f"class folder {root / name} has no images ({' '.join(IMAGE_EXTENSIONS)}); add some or remove it"
            )
    return classes


def _samples(classes: dict[str, list[Path]], class_names: list[str], root: Path) -> list[tuple[Path, int]]:
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for name, files in classes.items():
        if name not in index:
            raise VitlabError(f"{root / name} is a class that {root.parent / 'train'} does not have")
        samples += [(path, index[name]) for path in files]
    return samples


def _drop_unreadable(samples: list[tuple[Path, int]], in_chans: int) -> tuple[list[tuple[Path, int]], list[str]]:
    """Fully decode every file (``Image.verify`` misses truncated data) and leave out the ones that fail."""
    good, bad = [], []
    for path, label in samples:
        try:
            load_image(path, in_chans=in_chans, img_size=(8, 8))  # decoding is the test; the size does not matter
            good.append((path, label))
        except VitlabError:
            bad.append(str(path))
    return good, bad


def _labels(samples: list[tuple[Path, int]]) -> Tensor:
    return torch.tensor([label for _, label in samples], dtype=torch.int64)


def _subset(samples: list[tuple[Path, int]], idx: Tensor) -> list[tuple[Path, int]]:
    return [samples[i] for i in idx.tolist()]


def folder_facts(path: str, *, val_fraction: float, sample: int = 25) -> dict[str, Any]:
    """What choosing defaults needs to know of an image folder, without decoding it: the number of training images
    (what the split will leave), classes, and the typical stored size and channels (of up to ``sample`` images,
    read from their headers)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VitlabError(f"folder dataset {path!r} is not a directory")
    layout = root / "train" if (root / "train").is_dir() else root
    classes = _class_folders(layout)
    files = [f for fs in classes.values() for f in fs]
    if layout is root:  # test and val are carved from it
        n_train = round(len(files) * (1 - 2 * val_fraction))
    else:
        n_train = len(files) if (root / "val").is_dir() else round(len(files) * (1 - val_fraction))
    return {"train_images": n_train, "num_classes": len(classes), **header_facts(files, sample=sample)}


def build_folder_dataset(
    path: str,
    *,
    img_size: tuple[int, int] | None,
    in_chans: int | None,
    seed: int,
    val_fraction: float,
    skip_bad_images: bool,
    in_memory: bool | None = None,
) -> DatasetSplits:
    """Build the splits of an image folder (see `vitlab.data.build_dataset`).

    With ``PATH/train`` the splits are the folders (a missing ``val/`` is carved from train by ``val_fraction``; a
    missing ``test/`` gives no test split). Otherwise ``PATH/<class>`` is split per class: ``val_fraction`` for
    test with a fixed seed, the same fraction for val with ``seed``. Mean / std are measured on up to 500 train
    images at the stored size. ``in_memory`` decodes every split up front (see the module docstring); None: when
    it fits (`fits_in_memory`).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VitlabError(f"folder dataset {path!r} is not a directory")
    in_chans = 3 if in_chans is None else in_chans
    img_size = DEFAULT_IMG_SIZE if img_size is None else (int(img_size[0]), int(img_size[1]))
    if in_chans not in CHANNEL_MODES:
        raise VitlabError(f"images can be loaded with 1 or 3 channels, not {in_chans}")

    if (root / "train").is_dir():
        split_roots = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    else:
        split_roots = {"all": root}
    folders = {s: _class_folders(folder) for s, folder in split_roots.items()}
    class_names = list(folders["train"] if "train" in folders else folders["all"])
    splits = {s: _samples(folders[s], class_names, folder) for s, folder in split_roots.items()}
    if not class_names:
        raise VitlabError(
            f"no class folders in {root}: expected {root}/<class>/<image> or {root}/train/<class>/<image> with"
            f" {root}/val/<class>/<image>"
        )

    skipped: list[str] = []
    if skip_bad_images:  # before splitting, so that the splits only ever see readable files
        for s, samples in splits.items():
            splits[s], bad = _drop_unreadable(samples, in_chans)
            skipped += bad

    if "all" in splits:
        samples = splits.pop("all")
        labels = _labels(samples)
        rest, test = stratified_split(labels, val_fraction, TEST_SPLIT_SEED)
        train, val = stratified_split(labels[rest], val_fraction / (1 - val_fraction), seed)
        splits = {"train": _subset(samples, rest[train]), "val": _subset(samples, rest[val])}
        splits["test"] = _subset(samples, test)
    elif "val" not in splits:
        samples = splits["train"]
        train, val = stratified_split(_labels(samples), val_fraction, seed)
        splits["train"], splits["val"] = _subset(samples, train), _subset(samples, val)
    if not splits["train"]:
        raise VitlabError(f"folder dataset {root} has no readable training images")

    carved = "all" in split_roots or "val" not in split_roots
    notes = small_class_notes(class_names, {s: _labels(v) for s, v in splits.items()}) if carved else []
    datasets = {s: FolderDataset(samples, in_chans=in_chans, img_size=img_size) for s, samples in splits.items()}
    if in_memory is None:
        in_memory = fits_in_memory(sum(map(len, datasets.values())), in_chans=in_chans, img_size=img_size)
    if in_memory:
        datasets = decoded_in_memory(datasets)
    train = datasets["train"]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:STATS_IMAGES]
    hist = sum(channel_histograms(train.image(i)[None]) for i in pick.tolist())
    mean, std = stats_from_histograms(hist)
    return DatasetSplits(
        name=f"folder:{path}",
        train=train,
        val=datasets["val"],
        test=datasets.get("test"),
        class_names=class_names,
        mean=mean,
        std=std,
        in_chans=in_chans,
        img_size=img_size,
        skipped=skipped,
        notes=notes,
    )
