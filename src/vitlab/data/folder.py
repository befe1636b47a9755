"""Image-folder datasets: ``PATH/<class>/*.png`` or ``PATH/{train,val[,test]}/<class>/*.png``.

Files are decoded lazily by DataLoader workers, so the dataset can be larger than memory. A worker never raises on a
bad file: it hands back a marker that the main process turns into a one-line `VitlabError`, because an exception
re-raised from a worker carries the worker's whole traceback in its message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitlab.data.base import (
    Dataset,
    DatasetSplits,
    channel_histograms,
    small_class_notes,
    stats_from_histograms,
    stratified_split,
)
from vitlab.data.images import CHANNEL_MODES, decode_image, header_facts
from vitlab.errors import VitlabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_IMG_SIZE = (224, 224)
STATS_IMAGES = 500  # train images decoded to estimate mean / std
TEST_SPLIT_SEED = 0  # the test split is the same for every run seed, so runs are compared on the same images


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


class FolderDataset(Dataset, torch.utils.data.Dataset):
    """Image files decoded on demand to uint8 [in_chans, *img_size]; `loader` batches them with a DataLoader."""

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        *,
        in_chans: int = 3,
        img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
    ) -> None:
        if in_chans not in CHANNEL_MODES:
            raise VitlabError(f"images can be loaded with 1 or 3 channels, not {in_chans}")
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.labels = _labels(self.samples)
        self.in_chans = in_chans
        self.img_size = (int(img_size[0]), int(img_size[1]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | _Unreadable:
        path, label = self.samples[i]
        try:
            return load_image(path, in_chans=self.in_chans, img_size=self.img_size), label
        except VitlabError as e:
            return _Unreadable(str(e))

    def _load_batches(
        self, batches: list[Tensor], num_workers: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        # A list of index lists is a valid batch sampler: the DataLoader only iterates it.
        batch_sampler = [batch.tolist() for batch in batches]
        # the DataLoader draws its worker seeds from `generator`; without one it would draw from the global generator
        loader = DataLoader(
            self, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate, generator=generator
        )
        return self._raise_unreadable(loader)

    def subset(self, indices: Tensor, labels: Tensor) -> FolderDataset:
        samples = [(self.samples[i][0], y) for i, y in zip(indices.tolist(), labels.tolist())]
        return FolderDataset(samples, in_chans=self.in_chans, img_size=self.img_size)

    def members(self) -> list[str]:
        return [path for path, _ in self.samples]

    @staticmethod
    def _raise_unreadable(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise VitlabError(batch.message)
            yield batch


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
) -> DatasetSplits:
    """Build the splits of an image folder (see `vitlab.data.build_dataset`).

    With ``PATH/train`` the splits are the folders (a missing ``val/`` is carved from train by ``val_fraction``; a
    missing ``test/`` gives no test split). Otherwise ``PATH/<class>`` is split per class: ``val_fraction`` for
    test with a fixed seed, the same fraction for val with ``seed``. Mean / std are measured on up to 500 train
    images at the stored size.
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
    train = datasets["train"]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:STATS_IMAGES]
    hist = sum(
        channel_histograms(load_image(train.samples[i][0], in_chans=in_chans, img_size=img_size)[None])
        for i in pick.tolist()
    )
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
