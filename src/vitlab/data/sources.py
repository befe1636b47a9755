"""`build_dataset`: a dataset name to its train / val / test splits and normalisation statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vitlab.data.base import DatasetSplits, files_hash
from vitlab.data.builtin import BUILTIN_FACTS, build_builtin, builtin_facts
from vitlab.data.captions import build_caption_dataset, caption_facts
from vitlab.data.clips import build_clip_dataset, is_clip_spec
from vitlab.data.coco import build_coco_dataset, coco_facts
from vitlab.data.folder import build_folder_dataset, folder_facts
from vitlab.data.scenes import build_scene_dataset, scene_facts
from vitlab.data.segmentation import build_segmentation_dataset, is_segmentation, segmentation_facts
from vitlab.data.shards import PREFIX as SHARDS
from vitlab.data.shards import build_shard_dataset, shard_facts
from vitlab.errors import VitlabError, closest

DATASET_NAMES = [
    "digits",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "folder:PATH",
    "captions:FILE",
    "scenes:fashion-mnist",
    "segfolder:DIR",
    "clips:fashion-mnist",
    "videofeatures:DIR",
    "coco-captions:DIR",
    "wds:DIR_OR_PATTERN",
]


def describe_dataset(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.1) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of a dataset without loading it (a folder's files are
    counted and a few image headers read): what `vitlab.train.defaults` chooses a model and schedule from."""
    if is_clip_spec(spec):
        raise VitlabError(f"{spec} holds video clips: train MMT on them with `vitlab retrieval train`")
    if is_segmentation(spec):
        return segmentation_facts(spec, val_fraction=val_fraction)
    if spec.startswith("folder:"):
        return folder_facts(spec[len("folder:") :], val_fraction=val_fraction)
    if spec.startswith("captions:"):
        return caption_facts(spec, val_fraction=val_fraction)
    if spec.startswith("scenes:"):
        return scene_facts(spec, val_fraction=val_fraction)
    if spec.startswith("coco-captions:"):
        return coco_facts(spec, val_fraction=val_fraction)
    if spec.startswith(SHARDS):
        return shard_facts(spec)
    name = spec.lower()
    if name not in BUILTIN_FACTS:
        raise VitlabError(
            f"unknown dataset {spec!r}; choose from {', '.join(DATASET_NAMES)}.{closest(spec, DATASET_NAMES)}"
        )
    return builtin_facts(name, val_fraction=val_fraction)


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
    - ``scenes:fashion-mnist`` / ``scenes:digits``: scenes with captions, boxes and masks, drawn in memory; see
      `vitlab.data.scenes`; ``seg:scenes:...`` their label maps and ``segfolder:DIR`` PNG images with palette-PNG
      masks, for segmentation (`vitlab.data.segmentation`). ``coco-captions:DIR``: a COCO-format caption set;
      see `vitlab.data.coco`.
    - ``wds:DIR`` (or a pattern of its training shards): WebDataset shards that `vitlab data shards` wrote, their
      splits as written (``seed`` and ``val_fraction`` chose them then); the training split streams. See
      `vitlab.data.shards`.

    ``img_size`` and ``in_chans`` are the size (default 224x224) and channels (default 3) a folder's images are
    decoded to. Built-in datasets keep their native size and channels in memory; `to_model_input` converts
    batches to what the model takes. ``skip_bad_images`` decodes every file of a folder up front and leaves out the
    unreadable ones, listed in ``DatasetSplits.skipped``.
    """
    if not 0 <= val_fraction < 0.5:
        raise VitlabError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if spec.startswith("captions:"):
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
    if is_clip_spec(spec):
        return build_clip_dataset(spec, data_dir=data_dir, val_fraction=val_fraction)
    if is_segmentation(spec):
        return build_segmentation_dataset(spec, data_dir=data_dir, seed=seed, val_fraction=val_fraction)
    if spec.startswith("scenes:"):
        return build_scene_dataset(spec, data_dir=data_dir, val_fraction=val_fraction)
    if spec.startswith(SHARDS):
        return build_shard_dataset(spec, img_size=img_size, in_chans=in_chans)
    if spec.startswith("coco-captions:"):
        return build_coco_dataset(spec, img_size=img_size, in_chans=in_chans, seed=seed, val_fraction=val_fraction,
                                  skip_bad_images=skip_bad_images)  # fmt: skip
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
    if name in BUILTIN_FACTS:
        return build_builtin(name, data_dir=data_dir, seed=seed, val_fraction=val_fraction, download=download)
    raise VitlabError(
        f"unknown dataset {spec!r}; choose from {', '.join(DATASET_NAMES)}.{closest(spec, DATASET_NAMES)}"
    )
