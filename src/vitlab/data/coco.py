"""COCO-format caption sets: ``coco-captions:DIR``, the layout COCO, Flickr8k/30k conversions and `vitlab data
scenes` share.

A captions file is JSON with ``images`` (``id``, ``file_name``, optionally ``width`` / ``height``) and
``annotations`` (``id``, ``image_id``, ``caption``), one image having any number of captions. vitlab reads:

* the files named ``captions*.json`` in DIR or DIR/annotations (COCO's ``captions_train2014.json``, vitlab's
  ``captions_train.json``); without such names, every ``*.json`` there but COCO's instances and keypoints files;
* a file's split from its name (``train``, ``val``, ``test`` in it); one file for each split present. A split
  without a file is carved out of the train file's images: ``val_fraction`` for test (a fixed seed, the same for
  every run) and as much again for val (the run's ``seed``). A single file with no split in its name is train;
* each image by its ``file_name`` in DIR, DIR/images, or a folder named after the file (``train2014`` for
  ``captions_train2014.json``) or its split, directly in DIR or in DIR/images.

An image that is missing, or named by no caption, is a one-line error; with ``skip_bad_images`` missing and
undecodable images are left out and listed in ``DatasetSplits.skipped``. Batches are those of every caption set
(`vitlab.data.captions`): images decoded at the model's size, with each sample's index as its label.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.data.base import channel_histograms, files_hash, stats_from_histograms, stratified_split
from vitlab.data.captions import CaptionDataset, CaptionSplits, _check_image
from vitlab.data.folder import STATS_IMAGES, TEST_SPLIT_SEED, FolderDataset, load_image
from vitlab.data.images import header_facts
from vitlab.errors import VitlabError

PREFIX = "coco-captions:"
SPLITS = ("train", "val", "test")
_NOT_CAPTIONS = ("instances", "person_keypoints")


# --- writing -------------------------------------------------------------------------------------------------------
def captions_json(images: list[dict[str, Any]], captions: list[list[str]], *, description: str = "") -> dict[str, Any]:
    """A COCO captions file: ``images`` as given (``id``, ``file_name``, ``width``, ``height``) and one annotation
    per caption, numbered from 1 in order."""
    annotations = [
        {"id": 0, "image_id": image["id"], "caption": text}
        for image, texts in zip(images, captions, strict=True)
        for text in texts
    ]
    for n, annotation in enumerate(annotations, start=1):
        annotation["id"] = n
    return {"info": {"description": description}, "images": images, "annotations": annotations}


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a bool mask [H, W]: run lengths in column-major order, starting with a run of
    zeros (pycocotools' ``frPyObjects`` reads it)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1  # where a run ends
    bounds = np.concatenate([[0], edges, [len(flat)]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """The bool mask [H, W] of an uncompressed RLE (`mask_to_rle`)."""
    H, W = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape(W, H).T


# --- reading -------------------------------------------------------------------------------------------------------
def caption_files(root: Path) -> dict[str, Path]:
    """``{split: captions file}`` of a COCO-format folder (see the module docstring)."""
    if not root.is_dir():
        raise VitlabError(f"coco-captions: {str(root)!r} is not a directory")
    folders = [root, root / "annotations"]
    found = sorted(f for d in folders if d.is_dir() for f in d.glob("captions*.json"))
    if not found:
        found = sorted(
            f for d in folders if d.is_dir() for f in d.glob("*.json") if not f.name.startswith(_NOT_CAPTIONS)
        )
    if not found:
        raise VitlabError(f"no captions JSON (captions_train.json, ...) in {root} or {root / 'annotations'}")
    if len(found) == 1:
        return {_split_of(found[0]) or "train": found[0]}
    files: dict[str, Path] = {}
    for f in found:
        split = _split_of(f)
        if split is None or split in files:
            names = ", ".join(p.name for p in found)
            raise VitlabError(
                f"{root}: cannot tell which captions file is which split ({names}); name them captions_train.json, "
                "captions_val.json, captions_test.json, or keep one file"
            )
        files[split] = f
    if "train" not in files:
        raise VitlabError(f"{root} has captions for {', '.join(files)} but none for train (captions_train.json)")
    return files


def _split_of(path: Path) -> str | None:
    stem = path.stem.lower()
    hits = [s for s in SPLITS if s in stem]
    return hits[0] if len(hits) == 1 else None


def read_captions_json(path: Path) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """(the file's images, ``{image id: captions}``) with one-line errors for what is not COCO captions."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlabError(f"{path} is not JSON ({e}); a COCO captions file has 'images' and 'annotations'") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise VitlabError(f"{path} is not a COCO captions file: it needs 'images' and 'annotations' lists")
    images = data["images"]
    for n, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise VitlabError(f"{path}: images[{n}] needs 'id' and 'file_name'")
    known = {image["id"] for image in images}
    captions: dict[int, list[str]] = {}
    for n, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise VitlabError(f"{path}: annotations[{n}] needs 'image_id' and 'caption'")
        if a["image_id"] not in known:
            raise VitlabError(f"{path}: annotations[{n}] names image_id {a['image_id']!r}, which 'images' lacks")
        text = " ".join(str(a["caption"]).split())
        if text:
            captions.setdefault(a["image_id"], []).append(text)
    return images, captions


def _image_folders(root: Path, caption_file: Path, split: str) -> list[Path]:
    tag = caption_file.stem.lower().removeprefix("captions").strip("_-")
    names = list(dict.fromkeys(t for t in (tag, split) if t))
    return [root, root / "images", *(root / n for n in names), *(root / "images" / n for n in names)]


def _find(folders: list[Path], name: str) -> Path | None:
    return next((d / name for d in folders if (d / name).is_file()), None)


def _split_samples(
    root: Path, caption_file: Path, split: str, *, in_chans: int, skip_bad_images: bool, skipped: list[str]
) -> tuple[list[Path], list[list[str]]]:
    """The images of one captions file that have captions and can be used, with their captions."""
    images, captions = read_captions_json(caption_file)
    folders = _image_folders(root, caption_file, split)
    files, texts = [], []
    for image in images:
        if image["id"] not in captions:
            continue  # COCO's test files list images without captions
        name = str(image["file_name"])
        file = _find(folders, name)
        problem = (
            f"{caption_file.name}: image {name!r} is not in {', '.join(str(d) for d in folders[:3])}"
            if file is None
            else _check_image(file, in_chans, decode=skip_bad_images)
        )
        if problem:
            if not skip_bad_images:
                raise VitlabError(f"{problem}; fix it, or pass --skip-bad-images to leave such images out")
            skipped.append(problem)
            continue
        files.append(file.resolve())
        texts.append(captions[image["id"]])
    return files, texts


def coco_facts(spec: str, *, val_fraction: float) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of a COCO-format caption set without decoding it (the
    captions files are read and a few image headers), for `vitlab.train.defaults`; ``num_classes`` is 0."""
    root = _root(spec)
    files = caption_files(root)
    images, captions = read_captions_json(files["train"])
    named = [str(image["file_name"]) for image in images if image["id"] in captions]
    folders = _image_folders(root, files["train"], "train")
    sample = [f for name in named[:: max(1, len(named) // 25)] if (f := _find(folders, name))]
    carved = sum(split not in files for split in ("val", "test"))
    return {"train_images": round(len(named) * (1 - carved * val_fraction)), "num_classes": 0, **header_facts(sample)}


def _root(spec: str) -> Path:
    return Path(spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec).expanduser()


def build_coco_dataset(
    spec: str,
    *,
    img_size: tuple[int, int] | None,
    in_chans: int | None,
    seed: int,
    val_fraction: float,
    skip_bad_images: bool,
) -> CaptionSplits:
    """``coco-captions:DIR`` as a caption set (see the module docstring)."""
    root = _root(spec)
    in_chans = 3 if in_chans is None else in_chans
    img_size = (224, 224) if img_size is None else (int(img_size[0]), int(img_size[1]))
    files = caption_files(root)
    skipped: list[str] = []
    parts = {
        s: _split_samples(root, f, s, in_chans=in_chans, skip_bad_images=skip_bad_images, skipped=skipped)
        for s, f in files.items()
    }
    if not parts["train"][0]:
        raise VitlabError(f"{files['train']} has no usable image with a caption ({len(skipped)} skipped)")
    parts = _carve_missing(parts, seed=seed, val_fraction=val_fraction)

    def caption_set(split: str) -> CaptionDataset:
        paths, texts = parts[split]
        images = FolderDataset([(p, k) for k, p in enumerate(paths)], in_chans=in_chans, img_size=img_size)
        return CaptionDataset(images, texts)

    train_files = parts["train"][0]
    pick = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(0))[:STATS_IMAGES]
    hist = sum(
        channel_histograms(load_image(train_files[i], in_chans=in_chans, img_size=img_size)[None])
        for i in pick.tolist()
    )
    mean, std = stats_from_histograms(hist)
    listed = b"".join(f.read_bytes() for f in files.values())
    found = [p for paths, _ in parts.values() for p in paths]
    return CaptionSplits(
        name=spec,
        train=caption_set("train"),
        val=caption_set("val"),
        test=caption_set("test"),
        class_names=[],
        mean=mean,
        std=std,
        in_chans=in_chans,
        img_size=img_size,
        skipped=skipped,
        # the captions files and the images they name, as found
        data_hash=hashlib.sha256(listed + files_hash(root.resolve(), found).encode()).hexdigest(),
        root=str(root.resolve()),
    )


def _carve_missing(
    parts: dict[str, tuple[list[Path], list[list[str]]]], *, seed: int, val_fraction: float
) -> dict[str, tuple[list[Path], list[list[str]]]]:
    """Every split, those without a file carved out of train (test by a fixed seed, val by ``seed``)."""
    out = dict(parts)
    fraction = val_fraction
    for split, carve_seed in (("test", TEST_SPLIT_SEED), ("val", seed)):
        if split in out:
            continue
        paths, texts = out["train"]
        keep, held = stratified_split(torch.zeros(len(paths), dtype=torch.long), fraction, carve_seed)
        fraction = val_fraction / (1 - val_fraction)  # val takes as many as test did, from what test left
        out["train"] = ([paths[i] for i in keep.tolist()], [texts[i] for i in keep.tolist()])
        out[split] = ([paths[i] for i in held.tolist()], [texts[i] for i in held.tolist()])
    return out
