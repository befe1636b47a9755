"""Subsets of a dataset: classes, for open-set experiments (train on some classes, test on all), and a smaller
training split, for small-data studies.

``subset_classes(splits, "0-5")`` keeps classes 0 to 5 in every split, relabelled 0..k-1 in their original order,
with their names; ``subset_classes(splits, "0-5", exclude=True)`` keeps the others (the unknown classes whose test
images an open-set evaluation scores). Both keep the full training split's normalisation statistics, so that known
and unknown images go through the same input pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vitlab.data.base import Dataset, DatasetSplits, small_class_notes, stratified_split
from vitlab.errors import VitlabError, closest

ClassSpec = str | int | Sequence[str | int]


def parse_classes(spec: ClassSpec, class_names: Sequence[str]) -> list[int]:
    """Class indices (sorted, no repeats) from ``"0-5"``, ``"0-3,7"``, ``"cat,dog"``, ``3`` or ``[0, "dog"]``.

    An item that is a class name is that class (a folder may name its classes "3", "7", ...); otherwise an integer is
    an index and ``a-b`` an inclusive range of indices."""
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else [spec] if isinstance(spec, int) else spec
    names = {name: i for i, name in enumerate(class_names)}
    n = len(class_names)
    chosen: set[int] = set()
    for item in items:
        text = str(item).strip()
        if text in names:
            chosen.add(names[text])
            continue
        lo, sep, hi = text.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep and lo else (int(text), int(text))
        except ValueError:
            raise VitlabError(
                f"class {text!r} is neither a class name nor an index or range like 0-5.{closest(text, names)}"
            ) from None
        if not 0 <= first <= last < n:
            raise VitlabError(f"classes {text!r} are out of range: the data has classes 0-{n - 1}")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise VitlabError(f"no class chosen by {spec!r}")
    return sorted(chosen)


def _select(dataset: Dataset, keep: list[int]) -> Dataset:
    relabel = torch.full((max(keep) + 1,), -1, dtype=torch.int64)
    relabel[keep] = torch.arange(len(keep))
    labels = dataset.labels
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in keep:
        mask |= labels == c
    indices = torch.nonzero(mask).flatten()
    return dataset.subset(indices, relabel[labels[indices]])


def subset_classes(splits: DatasetSplits, classes: ClassSpec, *, exclude: bool = False) -> DatasetSplits:
    """``splits`` with only the chosen classes (or, with ``exclude``, only the others) in train, val and test,
    relabelled 0..k-1 in their original order; ``class_names`` are theirs."""
    chosen = parse_classes(classes, splits.class_names)
    keep = [c for c in range(splits.num_classes) if c not in chosen] if exclude else chosen
    if not keep:
        raise VitlabError(f"excluding classes {classes!r} leaves no class")
    names = [splits.class_names[c] for c in keep]
    train, val = _select(splits.train, keep), _select(splits.val, keep)
    test = _select(splits.test, keep) if splits.test is not None else None
    if len(train) == 0:
        raise VitlabError(f"classes {', '.join(names)} have no training image")
    held = {"val": val.labels, **({"test": test.labels} if test is not None else {})}
    spec = str(classes) if isinstance(classes, str | int) else ",".join(map(str, classes))
    label = f"{'all but ' if exclude else ''}{spec}"
    return dataclasses.replace(
        splits,
        name=f"{splits.name} (classes {label})",
        train=train,
        val=val,
        test=test,
        class_names=names,
        notes=small_class_notes(names, {"train": train.labels, **held}),
    )


def limit_images(
    splits: DatasetSplits, *, train: int | None = None, test: int | None = None, seed: int = 0
) -> DatasetSplits:
    """``splits`` with a training split of ``train`` images and a test split of ``test`` images, each drawn by class
    in proportion (`stratified_split`). Val and the normalisation statistics stay those of the whole dataset, so that
    runs at several sizes are measured on the same images; a smaller test split makes quick studies of slow models
    affordable (every run given the same ``test`` and ``seed`` scores the same images)."""
    for split, images in (("train", train), ("test", test)):
        data = getattr(splits, split)
        if images is None or data is None or images == len(data):
            continue
        n = len(data)
        if not 0 < images <= n:
            raise VitlabError(f"{split}_images must be between 1 and the {n} images of the {split} split, got {images}")
        # by class; a caption set's labels are sample indices, so it says what to draw by (its `strata`)
        _, chosen = stratified_split(getattr(data, "strata", data.labels), images / n, seed)
        subset = data.subset(chosen, data.labels[chosen])
        name = splits.name + (f" ({images} training images)" if split == "train" else "")
        splits = dataclasses.replace(splits, name=name, **{split: subset})
    return splits


def class_order(
    model_names: Sequence[str] | None, data_names: Sequence[str], *, num_classes: int, model: str, data: str
) -> list[int] | None:
    """Where each of the data's classes is among a model's outputs, checked by name.

    None when the model predicts the data's classes in the data's order; ``order`` with data class ``i`` = output
    ``order[i]`` when it predicts the same classes in another order (a folder sorted differently, a subset listed in
    another order); a one-line `VitlabError` naming the difference when the names differ. A model that records no
    class names (a foreign checkpoint) is checked by its number of classes only. ``model`` and ``data`` name the two
    in the message."""
    if not model_names:
        if num_classes != len(data_names):
            raise VitlabError(f"{model} predicts {num_classes} classes but {data} has {len(data_names)}")
        return None
    model_names, data_names = [str(n) for n in model_names], [str(n) for n in data_names]
    if model_names == data_names:
        return None
    if sorted(model_names) == sorted(data_names) and len(set(data_names)) == len(data_names):
        return [model_names.index(name) for name in data_names]
    missing = [n for n in model_names if n not in data_names]
    extra = [n for n in data_names if n not in model_names]
    raise VitlabError(
        f"{model} predicts the classes {_names(model_names)} but {data} has {_names(data_names)}"
        f"{f'; not in the data: {_names(missing)}' if missing else ''}"
        f"{f'; not in the model: {_names(extra)}' if extra else ''}; use data with the model's classes"
        " (a class subset: --classes)"
    )


def relabel(dataset: Dataset, order: Sequence[int]) -> Dataset:
    """``dataset`` with label ``i`` replaced by ``order[i]`` (a `class_order`: the data's labels in a model's order)."""
    return dataset.subset(torch.arange(len(dataset)), torch.as_tensor(list(order))[dataset.labels])


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"({shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''})"
