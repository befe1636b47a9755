"""`build_dataset`: a dataset name to its train / val / test splits and normalisation statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab.data.base import (
    DatasetSplits,
    InMemoryDataset,
    channel_stats,
    files_hash,
    small_class_notes,
    stratified_split,
    tensors_hash,
)
from vitlab.data.cifar import load_cifar
from vitlab.data.fashion_mnist import CLASS_NAMES as FASHION_CLASS_NAMES
from vitlab.data.fashion_mnist import load_fashion_mnist
from vitlab.data.folder import TEST_SPLIT_SEED, build_folder_dataset, folder_facts
from vitlab.errors import VitlabError, closest

DATASET_NAMES = ["digits", "fashion-mnist", "cifar10", "cifar100", "folder:PATH", "captions:FILE"]


def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    # 8x8 pixels with values 0..16 -> uint8 0..255
    pixels = torch.from_numpy(digits.data).reshape(-1, 1, 8, 8)
    images = torch.round(pixels * 255 / 16).to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


def _in_memory_splits(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    class_names: list[str],
    *,
    seed: int,
    val_fraction: float,
    data_hash: str,
) -> DatasetSplits:
    """Carve a stratified val split (by ``seed``) out of ``train``; statistics come from what is left for training.
    ``data_hash``: the fingerprint of the arrays as loaded (`tensors_hash`)."""
    images, labels = train
    keep, val = stratified_split(labels, val_fraction, seed)
    train_set = InMemoryDataset(images[keep], labels[keep])
    mean, std = channel_stats(train_set.images)
    notes = small_class_notes(class_names, {"train": labels[keep], "val": labels[val], "test": test[1]})
    return DatasetSplits(
        name=name,
        train=train_set,
        val=InMemoryDataset(images[val], labels[val]),
        test=InMemoryDataset(*test),
        class_names=class_names,
        mean=mean,
        std=std,
        in_chans=images.shape[1],
        img_size=(images.shape[2], images.shape[3]),
        notes=notes,
        data_hash=data_hash,
    )


def _arrays_hash(d: dict[str, Tensor]) -> str:
    return tensors_hash(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"])


# stored size, channels, classes and images the train and val splits share (the rest is an official test set)
_BUILTIN_FACTS = {
    "digits": ((8, 8), 1, 10, 1797),
    "fashion-mnist": ((28, 28), 1, 10, 60000),
    "cifar10": ((32, 32), 3, 10, 50000),
    "cifar100": ((32, 32), 3, 100, 50000),
}


def describe_dataset(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.1) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of a dataset without loading it (a folder's files are
    counted and a few image headers read): what `vitlab.train.defaults` chooses a model and schedule from."""
    if spec.startswith("folder:"):
        return folder_facts(spec[len("folder:") :], val_fraction=val_fraction)
    name = spec.lower()
    if name not in _BUILTIN_FACTS:
        raise VitlabError(
            f"unknown dataset {spec!r}; choose from {', '.join(DATASET_NAMES)}.{closest(spec, DATASET_NAMES)}"
        )
    size, chans, classes, shared = _BUILTIN_FACTS[name]
    # digits carves test and val out of its images; the others carve val out of the official training set
    held = 2 * val_fraction if name == "digits" else val_fraction
    return {"train_images": round(shared * (1 - held)), "num_classes": classes, "img_size": size, "in_chans": chans}


def build_dataset(
    spec: str,
    *,
    data_dir: str | None = None,
    img_size: tuple[int, int] | None = None,
    in_chans: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    skip_bad_images: bool = False,
    download: bool = True,
) -> DatasetSplits:
    """Load a dataset by name (one of `DATASET_NAMES`) and split it into train / val / test.

    - ``digits``: scikit-learn's 1,797 8x8 digits, 1 channel. No official test set: ``val_fraction`` of each class
      goes to test (with a fixed seed, so every run is tested on the same images), as much again to val (``seed``).
    - ``fashion-mnist`` (28x28, 1 channel), ``cifar10`` / ``cifar100`` (32x32, 3 channels): the official test set
      is the test split; ``val_fraction`` of the official training set, stratified by class, is the val split.
      Files are looked up in ``data_dir`` and the usual places, and downloaded when ``download`` (see their modules).
    - ``folder:PATH``: images decoded on demand; see `vitlab.data.folder.build_folder_dataset`.
    - ``captions:FILE`` / ``captions:fashion-mnist``: images with captions, for CLIP; see `vitlab.data.captions`.

    ``img_size`` and ``in_chans`` are the size (default 224x224) and channels (default 3) a folder's images are
    decoded to. Built-in datasets keep their native size and channels in memory; `to_model_input` converts
    batches to what the model takes. ``skip_bad_images`` decodes every file of a folder up front and leaves out the
    unreadable ones, listed in ``DatasetSplits.skipped``.
    """
    if not 0 <= val_fraction < 0.5:
        raise VitlabError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if spec.startswith("captions:"):
        from vitlab.data.captions import build_caption_dataset

        return build_caption_dataset(
            spec,
            data_dir=data_dir,
            img_size=img_size,
            in_chans=in_chans,
            seed=seed,
            val_fraction=val_fraction,
            skip_bad_images=skip_bad_images,
            download=download,
        )
    if spec.startswith("folder:"):
        path = spec[len("folder:") :]
        if not path:
            raise VitlabError("folder dataset needs a path: folder:PATH")
        splits = build_folder_dataset(
            path,
            img_size=img_size,
            in_chans=in_chans,
            seed=seed,
            val_fraction=val_fraction,
            skip_bad_images=skip_bad_images,
        )
        root = str(Path(path).expanduser())
        found = [m for s in (splits.train, splits.val, splits.test) if s is not None for m in s.members()]
        return dataclasses.replace(splits, data_hash=files_hash(root, found + splits.skipped), root=root)
    name = spec.lower()
    if name == "digits":
        images, labels = _load_digits()
        rest, test = stratified_split(labels, val_fraction, TEST_SPLIT_SEED)
        # val_fraction of the whole set for val too: a larger share of what the test split left
        return _in_memory_splits(
            name,
            (images[rest], labels[rest]),
            (images[test], labels[test]),
            [str(i) for i in range(10)],
            seed=seed,
            val_fraction=val_fraction / (1 - val_fraction),
            data_hash=tensors_hash(images, labels),
        )
    if name == "fashion-mnist":
        d = load_fashion_mnist(data_dir, download_missing=download)
        return _in_memory_splits(
            name,
            (d["train_images"], d["train_labels"]),
            (d["test_images"], d["test_labels"]),
            list(FASHION_CLASS_NAMES),
            seed=seed,
            val_fraction=val_fraction,
            data_hash=_arrays_hash(d),
        )
    if name in ("cifar10", "cifar100"):
        d = load_cifar(name, data_dir, download_missing=download)
        return _in_memory_splits(
            name,
            (d["train_images"], d["train_labels"]),
            (d["test_images"], d["test_labels"]),
            d["class_names"],
            seed=seed,
            val_fraction=val_fraction,
            data_hash=_arrays_hash(d),
        )
    raise VitlabError(
        f"unknown dataset {spec!r}; choose from {', '.join(DATASET_NAMES)}.{closest(spec, DATASET_NAMES)}"
    )
