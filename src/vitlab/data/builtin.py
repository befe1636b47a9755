"""The built-in datasets, held in memory: scikit-learn's digits, Fashion-MNIST, CIFAR-10 and CIFAR-100.

`vitlab.data.build_dataset` dispatches here for their names, and the built-in caption sets
(`vitlab.data.captions`, ``captions:fashion-mnist``) caption them; both import this module, never each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitlab.data.base import (
    DatasetSplits,
    InMemoryDataset,
    channel_stats,
    small_class_notes,
    stratified_split,
    tensors_hash,
)
from vitlab.data.cifar import load_cifar
from vitlab.data.fashion_mnist import CLASS_NAMES as FASHION_CLASS_NAMES
from vitlab.data.fashion_mnist import load_fashion_mnist
from vitlab.data.folder import TEST_SPLIT_SEED

# stored size, channels, classes and images the train and val splits share (the rest is an official test set)
BUILTIN_FACTS = {
    "digits": ((8, 8), 1, 10, 1797),
    "fashion-mnist": ((28, 28), 1, 10, 60000),
    "cifar10": ((32, 32), 3, 10, 50000),
    "cifar100": ((32, 32), 3, 100, 50000),
}


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits: uint8 images [N, 1, 8, 8] and int64 labels [N]."""
    from sklearn.datasets import load_digits as sklearn_digits  # ships with scikit-learn: no download

    digits = sklearn_digits()
    # 8x8 pixels with values 0..16 -> uint8 0..255
    pixels = torch.from_numpy(digits.data).reshape(-1, 1, 8, 8)
    images = torch.round(pixels * 255 / 16).to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


def builtin_facts(name: str, *, val_fraction: float) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of a built-in dataset, without loading it."""
    size, chans, classes, shared = BUILTIN_FACTS[name]
    # digits carves test and val out of its images; the others carve val out of the official training set
    held = 2 * val_fraction if name == "digits" else val_fraction
    return {"train_images": round(shared * (1 - held)), "num_classes": classes, "img_size": size, "in_chans": chans}


def build_builtin(name: str, *, data_dir: str | None, seed: int, val_fraction: float, download: bool) -> DatasetSplits:
    """The splits of a built-in dataset (``name`` in `BUILTIN_FACTS`; see `vitlab.data.build_dataset`)."""
    if name == "digits":
        images, labels = load_digits()
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
        class_names = list(FASHION_CLASS_NAMES)
    else:
        d = load_cifar(name, data_dir, download_missing=download)
        class_names = d["class_names"]
    return _in_memory_splits(
        name,
        (d["train_images"], d["train_labels"]),
        (d["test_images"], d["test_labels"]),
        class_names,
        seed=seed,
        val_fraction=val_fraction,
        data_hash=tensors_hash(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"]),
    )


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
