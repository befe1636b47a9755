"""Segmentation data: images with per-pixel label maps, from scenes or from a folder of PNGs.

A segmentation split is an in-memory dataset whose batches are ``(images uint8 [b, C, H, W], sample indices [b])``,
as a caption set's are: the label maps live beside the images (``dataset.masks``, int64 [N, H, W], -1 where a pixel
is not labelled) and the segmentation task (`vitlab.train.segmentation`) looks them up by index. So the loop's batch
order, resume and DDP sharding apply unchanged.

Two sources:

* ``seg:scenes:SOURCE[?count=N&size=PX&seed=S]`` (what ``vitlab seg train --data scenes:SOURCE`` records): the
  scenes of `vitlab.data.scenes`, each pixel labelled with its item's class or, where no item is, its background
  texture ("stuff"); the classes are ``Scenes.label_names``, the scenes' own splits are kept.
* ``segfolder:DIR``: ``DIR/images/*.png`` with ``DIR/masks/*.png`` of the same names (palette or grey PNGs whose
  values are lines of ``DIR/labels.txt``; 255 marks an unlabelled pixel, as in PASCAL VOC), as `vitlab data scenes`
  writes them. Test and validation each take ``val_fraction`` of the images: the test part with a fixed seed (every
  run tests on the same images), the validation part with the run's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitlab.data.base import DatasetSplits, InMemoryDataset, channel_stats, tensors_hash
from vitlab.errors import VitlabError

SCENES = "seg:"
FOLDER = "segfolder:"
IGNORE = -1  # the target of a pixel no class covers (PyTorch-Encoding's ignore label)
FILE_IGNORE = 255  # how a mask file marks such a pixel


class SegmentationDataset(InMemoryDataset):
    """Images uint8 [N, C, H, W] with label maps ``masks`` int64 [N, H, W]; a batch's labels are sample indices."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        if masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"masks must be [N, H, W] of the images', got {tuple(masks.shape)}")
        super().__init__(images, torch.arange(images.shape[0]))
        self.masks = masks.long()

    def subset(self, indices: torch.Tensor, labels: torch.Tensor) -> SegmentationDataset:
        return SegmentationDataset(self.images[indices], self.masks[indices])


@dataclass
class SegmentationSplits(DatasetSplits):
    """`DatasetSplits` whose ``class_names`` are the label maps' classes (``num_classes`` of them)."""


def is_segmentation(spec: str) -> bool:
    return spec.startswith((SCENES, FOLDER))


def segmentation_spec(spec: str) -> str:
    """What ``vitlab seg`` records for ``--data``: ``scenes:...`` becomes ``seg:scenes:...`` (the scenes' label maps,
    not their captions); ``segfolder:`` and ``seg:`` specs stay."""
    if is_segmentation(spec):
        return spec
    if spec.startswith("scenes:"):
        return SCENES + spec
    raise VitlabError(f"segmentation trains on scenes:fashion-mnist|digits or segfolder:DIR, not {spec!r}")


def build_segmentation_dataset(
    spec: str, *, data_dir: str | None = None, seed: int = 0, val_fraction: float = 0.1
) -> SegmentationSplits:
    if spec.startswith(FOLDER):
        return build_segfolder_dataset(spec[len(FOLDER) :], seed=seed, val_fraction=val_fraction, name=spec)
    return build_scene_segmentation(spec, data_dir=data_dir, val_fraction=val_fraction)


def segmentation_facts(spec: str, *, val_fraction: float) -> dict:
    """``{train_images, num_classes, img_size, in_chans}`` for `vitlab.train.defaults` (a folder is read)."""
    if spec.startswith(SCENES):
        from vitlab.data.scenes import BACKGROUNDS, scene_facts

        facts = scene_facts(spec[len(SCENES) :], val_fraction=val_fraction)
        return {**facts, "num_classes": 10 + len(BACKGROUNDS)}
    splits = build_segmentation_dataset(spec, val_fraction=val_fraction)
    return {"train_images": len(splits.train), "num_classes": splits.num_classes, "img_size": splits.img_size,
            "in_chans": splits.in_chans}  # fmt: skip


# --- scenes --------------------------------------------------------------------------------------------------------
def build_scene_segmentation(spec: str, *, data_dir: str | None, val_fraction: float) -> SegmentationSplits:
    from vitlab.data.scenes import SPLITS, build_scene_dataset

    scenes = build_scene_dataset(spec[len(SCENES) :], data_dir=data_dir, val_fraction=val_fraction)
    parts = {}
    for split in SPLITS:
        part = scenes.scenes[split]
        images = torch.from_numpy(part.images).permute(0, 3, 1, 2).contiguous()  # (n, H, W, 3) -> (n, 3, H, W)
        parts[split] = SegmentationDataset(images, torch.from_numpy(part.label_maps()))
    names = scenes.scenes["train"].label_names
    return SegmentationSplits(name=spec, train=parts["train"], val=parts["val"], test=parts["test"],
                              class_names=names, mean=scenes.mean, std=scenes.std, in_chans=3,
                              img_size=tuple(scenes.img_size), notes=scenes.notes,
                              data_hash=scenes.data_hash)  # fmt: skip


# --- a folder of PNGs ------------------------------------------------------------------------------------------------
def read_labels(root: Path) -> list[str]:
    path = root / "labels.txt"
    if not path.is_file():
        raise VitlabError(f"{path} is missing: a segmentation folder names its classes there, one a line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(names) >= FILE_IGNORE:
        raise VitlabError(f"{path} must list 1 to {FILE_IGNORE - 1} class names, one a line; it has {len(names)}")
    return names


def read_mask(path: Path, *, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """A mask file -> int64 [H, W] of class indices (-1 where the file has 255); any fault is one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise VitlabError(
                    f"mask {path} is a {im.mode} image: write masks as palette or grey PNGs whose values are lines "
                    "of labels.txt"
                )
            values = np.array(im, dtype=np.int64)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise VitlabError(f"mask {path} cannot be read ({type(e).__name__}: {e}); rewrite or remove it") from None
    if values.shape != size:
        raise VitlabError(f"mask {path} is {values.shape[1]}x{values.shape[0]} but its image is {size[1]}x{size[0]}")
    bad = (values >= num_classes) & (values != FILE_IGNORE)
    if bad.any():
        raise VitlabError(
            f"mask {path} holds value {int(values[bad][0])} but labels.txt lists {num_classes} classes "
            f"(0..{num_classes - 1}, {FILE_IGNORE} for unlabelled pixels)"
        )
    values[values == FILE_IGNORE] = IGNORE
    return values


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # (H, W, 3)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise VitlabError(f"image {path} cannot be read ({type(e).__name__}: {e}); rewrite or remove it") from None


def read_segfolder(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(images uint8 [N, 3, H, W], masks int64 [N, H, W], class names, file names) of a segmentation folder."""
    root = Path(root).expanduser()
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise VitlabError(f"{root} needs images/ and masks/ folders of PNGs with the same names (and labels.txt)")
    names = read_labels(root)
    files = sorted(p.name for p in (root / "images").glob("*.png"))
    if not files:
        raise VitlabError(f"{root / 'images'} holds no .png images")
    missing = [f for f in files if not (root / "masks" / f).is_file()]
    if missing:
        raise VitlabError(f"{len(missing)} images have no mask in {root / 'masks'}, e.g. {missing[0]}")
    images, masks = [], []
    for f in files:
        image = read_image(root / "images" / f)
        if images and image.shape != images[0].shape:
            raise VitlabError(f"image {f} is {image.shape[1]}x{image.shape[0]}, the others are "
                              f"{images[0].shape[1]}x{images[0].shape[0]}: give images of one size")  # fmt: skip
        images.append(image)
        masks.append(read_mask(root / "masks" / f, num_classes=len(names), size=image.shape[:2]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    return x, torch.from_numpy(np.stack(masks)), names, files


def build_segfolder_dataset(root: str, *, seed: int, val_fraction: float, name: str) -> SegmentationSplits:
    if not root:
        raise VitlabError("a segmentation folder needs a path: segfolder:DIR")
    images, masks, names, files = read_segfolder(root)
    n = len(files)
    n_held = round(n * val_fraction)
    test = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:n_held]  # fixed: the same test images
    rest = torch.ones(n, dtype=torch.bool)
    rest[test] = False
    others = torch.nonzero(rest).flatten()
    val = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n_held]]
    rest[val] = False
    parts = {s: SegmentationDataset(images[i.sort().values], masks[i.sort().values])
             for s, i in (("train", torch.nonzero(rest).flatten()), ("val", val), ("test", test))}  # fmt: skip
    if not len(parts["train"]):
        raise VitlabError(f"{root} has {n} images: too few to leave any for training at val_fraction={val_fraction}")
    mean, std = channel_stats(parts["train"].images)
    digest = hashlib.sha256((tensors_hash(images, masks) + "\n".join(files + names)).encode()).hexdigest()
    return SegmentationSplits(name=name, train=parts["train"], val=parts["val"], test=parts["test"], class_names=names,
                              mean=mean, std=std, in_chans=3, img_size=tuple(images.shape[2:]),
                              data_hash=digest)  # fmt: skip
