"""Caption sets: images paired with captions, for contrastive image-text training (CLIP) and retrieval.

``captions:SOURCE[?key=value&...]`` names one (`vitlab.data.build_dataset`):

* ``SOURCE`` a ``.csv`` / ``.tsv`` file with an image-path column and a caption column (open_clip's convention:
  ``filepath`` and ``title``; ``?image=COL&caption=COL`` picks others, ``?sep=;`` another delimiter), or a ``.jsonl``
  file of objects with those keys. Image paths are relative to the file. Rows naming the same image are one sample
  with several captions (COCO-style): training draws one of them per visit, retrieval counts any as a match. A row
  whose image is missing or unreadable, or whose caption is empty, is a one-line error naming the row; with
  ``skip_bad_images`` such rows are left out and counted in ``DatasetSplits.skipped``. ``val_fraction`` of the
  images goes to test (a fixed seed: the same held-out set for every run) and as much again to val (``seed``).
* ``SOURCE`` a built-in set, ``fashion-mnist`` or ``digits``: every image's captions are its class's name in
  several templates plus short descriptions of the class's look ("a long garment covering the legs"). Classes named
  in ``?unseen=A,B`` (default: two per set; ``?unseen=`` for none) are held out of training and validation
  entirely; the test split keeps every class, for zero-shot accuracy on seen and unseen classes.

A caption split's batches are ``(images uint8 [b, C, H, W], sample indices int64 [b])``: the index reaches the
sample's captions (``dataset.captions[i]``), so the data order, sharding and exact resume are those of every other
dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import Tensor

from vitlab.data.base import (
    Dataset,
    DatasetSplits,
    InMemoryDataset,
    channel_histograms,
    files_hash,
    stats_from_histograms,
    stratified_split,
)
from vitlab.data.builtin import build_builtin, builtin_facts
from vitlab.data.folder import STATS_IMAGES, TEST_SPLIT_SEED, FolderDataset, load_image
from vitlab.data.images import header_facts
from vitlab.errors import VitlabError

PREFIX = "captions:"


@dataclass(frozen=True)
class ClassCaptions:
    """What a built-in set says about its classes: the word for each class in prompts, descriptions of each
    class's look, the templates a name is put in, and the classes held out by default."""

    prompt_names: tuple[str, ...]
    descriptions: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    unseen: tuple[str, ...]

    def captions(self, k: int) -> list[str]:
        return [t.format(self.prompt_names[k]) for t in self.templates] + list(self.descriptions[k])


FASHION_MNIST = ClassCaptions(
    prompt_names=("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    descriptions=(
        ("a short-sleeved top for the upper body", "a light top with short sleeves and a round neck"),
        ("a long garment covering the legs", "a pair of pants with two long legs"),
        ("a warm knitted top with long sleeves", "a sweater with long sleeves and no buttons"),
        ("a long one-piece garment with a skirt", "a garment for the body that hangs down over the legs"),
        ("a warm long-sleeved outer garment with buttons", "a heavy jacket with a collar worn outside"),
        ("a flat shoe with a strap", "an open summer shoe with straps and no laces"),
        ("a top with long sleeves, a collar and buttons", "a buttoned top with a collar"),
        ("a sporty shoe with laces", "a low flat shoe for running"),
        ("a container with a handle for carrying things", "a bag with a strap or handles"),
        ("a shoe that covers the ankle", "a boot with a heel that reaches the ankle"),
    ),
    templates=(
        "a photo of a {}.",
        "a photo of the {}.",
        "a grayscale photo of a {}.",
        "a low resolution photo of a {}.",
        "a product photo of a {}.",
        "a centered photo of a {}.",
        "{}",
    ),
    unseen=("Trouser", "Sandal"),
)

DIGITS = ClassCaptions(
    prompt_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    descriptions=(
        ("a closed round loop", "an oval ring with a hole in the middle"),
        ("a single straight vertical stroke", "a thin upright line"),
        ("a curve on top with a flat line at the bottom", "a hook that ends in a flat base"),
        ("two curves open to the left", "two bumps on the right side stacked on each other"),
        ("a vertical line crossed by a short bar", "an open corner on a vertical stroke"),
        ("a flat bar on top with a round belly below", "a short vertical line and a curve at the bottom"),
        ("a curved stroke ending in a loop at the bottom", "a loop at the bottom with a tail on top"),
        ("a flat bar on top with a slanted stroke down", "a line across the top and a diagonal line"),
        ("two loops stacked on each other", "a closed loop on top of another closed loop"),
        ("a loop on top with a tail going down", "a round head on a straight stroke"),
    ),
    templates=("a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a blurry photo of a {}.", "{}"),
    unseen=("1", "8"),
)

BUILTIN = {"fashion-mnist": FASHION_MNIST, "digits": DIGITS}
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a picture of a {}.", "{}")


class CaptionDataset(Dataset):
    """A dataset of images (any kind, labelled with each sample's index) whose batches carry sample indices in place
    of labels; ``captions[i]`` are sample i's captions and ``classes[i]`` its class for a built-in set (else None)."""

    def __init__(self, images: Dataset, captions: list[list[str]], classes: Tensor | None = None) -> None:
        if len(images) != len(captions) or not torch.equal(images.labels, torch.arange(len(images))):
            raise ValueError("a caption set's images must be labelled 0..N-1, one caption list each")
        self.images = images
        self.captions = captions
        self.classes = classes
        self.labels = torch.arange(len(captions))

    def __len__(self) -> int:
        return len(self.captions)

    def _load_batches(
        self, batches: list[Tensor], num_workers: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        # the image dataset is built with each sample's index as its label: its batches already carry the indices
        return self.images._load_batches(batches, num_workers, generator)

    def members(self) -> list[str]:
        return self.images.members()

    @property
    def strata(self) -> Tensor:
        """What a stratified subset (`vitlab.data.limit_images`) draws by: a built-in set's classes, else one
        stratum (the labels are sample indices, one per stratum, of which a stratified split could take none)."""
        return self.classes if self.classes is not None else torch.zeros(len(self), dtype=torch.int64)

    def subset(self, indices: Tensor, labels: Tensor) -> CaptionDataset:
        """The samples at ``indices``, numbered 0..k-1 again (``labels`` is not used: a caption set's labels are
        its sample indices)."""
        images = self.images.subset(indices, torch.arange(len(indices)))
        classes = self.classes[indices] if self.classes is not None else None
        return CaptionDataset(images, [self.captions[i] for i in indices.tolist()], classes=classes)


@dataclass
class CaptionSplits(DatasetSplits):
    """`DatasetSplits` of a caption set. ``class_names`` and `ClassCaptions` only for a built-in set (its test split
    holds every class), with ``unseen`` the classes kept out of training."""

    unseen: list[str] = field(default_factory=list)
    class_captions: ClassCaptions | None = None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``captions:SOURCE?k=v&...`` -> (SOURCE, options)."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    source, _, query = body.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    allowed = {"image", "caption", "sep", "unseen"}
    for key in options:
        if key not in allowed:
            raise VitlabError(
                f"unknown caption-set option {key!r} in {spec!r}; options are {', '.join(sorted(allowed))}"
            )
    if not source:
        raise VitlabError(f"{spec!r} names no caption source: captions:FILE.csv, captions:fashion-mnist, ...")
    return source, options


def build_caption_dataset(
    spec: str,
    *,
    data_dir: str | None,
    img_size: tuple[int, int] | None,
    in_chans: int | None,
    seed: int,
    val_fraction: float,
    skip_bad_images: bool,
    download: bool = True,
) -> CaptionSplits:
    source, options = parse_spec(spec)
    if source.lower() in BUILTIN:
        if set(options) - {"unseen"}:
            raise VitlabError(f"the built-in caption set {source!r} takes only ?unseen=CLASSES")
        return _builtin(source.lower(), spec, options.get("unseen"), data_dir, seed, val_fraction, download)
    if "unseen" in options:
        raise VitlabError("?unseen= needs a built-in caption set with classes (fashion-mnist, digits)")
    return _from_file(source, spec, options, img_size, in_chans, seed, val_fraction, skip_bad_images)


def caption_facts(spec: str, *, val_fraction: float) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of a caption set without decoding it (a file's rows are
    read and a few image headers), for `vitlab.train.defaults` to choose an image tower; ``num_classes`` is 0 (the
    captions are the labels)."""
    source, options = parse_spec(spec)
    if source.lower() in BUILTIN:
        facts = builtin_facts(source.lower(), val_fraction=val_fraction)
        unseen = options.get("unseen", ",".join(BUILTIN[source.lower()].unseen))
        seen = 1 - len([n for n in unseen.split(",") if n.strip()]) / facts["num_classes"]
        return {**facts, "train_images": round(facts["train_images"] * seen), "num_classes": 0}
    path = Path(source).expanduser()
    rows = read_caption_rows(path, image=options.get("image", "filepath"), caption=options.get("caption", "title"),
                             sep=options.get("sep"))  # fmt: skip
    files = list(dict.fromkeys((path.parent / image).resolve() for _, image, text in rows if image and text.strip()))
    train = round(len(files) * (1 - 2 * val_fraction))  # test and val are carved from it
    return {"train_images": train, "num_classes": 0, **header_facts(files)}


# --- built-in sets ---------------------------------------------------------------------------------------------------
def resolve_classes(names: str | list[str], class_names: list[str], prompt_names: tuple[str, ...] = ()) -> list[int]:
    """Class indices of comma-separated names, matched case-insensitively against class or prompt names."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    lookup = {n.lower(): i for i, n in enumerate(class_names)}
    lookup.update({n.lower(): i for i, n in enumerate(prompt_names)})
    out = []
    for name in (n for n in wanted if n):
        if name.lower() not in lookup:
            raise VitlabError(f"unseen class {name!r} is not one of {', '.join(class_names)}")
        out.append(lookup[name.lower()])
    return sorted(set(out))


def _builtin(
    name: str, spec: str, unseen_opt: str | None, data_dir: str | None, seed: int, val_fraction: float, download: bool
) -> CaptionSplits:
    base = build_builtin(name, data_dir=data_dir, seed=seed, val_fraction=val_fraction, download=download)
    info = BUILTIN[name]
    unseen = resolve_classes(info.unseen if unseen_opt is None else unseen_opt, base.class_names, info.prompt_names)
    if len(unseen) == base.num_classes:
        raise VitlabError(f"every class of {name} is unseen: nothing is left to train on")
    per_class = [info.captions(k) for k in range(base.num_classes)]

    def caption_split(split: InMemoryDataset, keep_unseen: bool) -> CaptionDataset:
        keep = torch.ones(len(split), dtype=torch.bool)
        if not keep_unseen:
            for k in unseen:
                keep &= split.labels != k
        images, labels = split.images[keep], split.labels[keep]
        data = InMemoryDataset(images, torch.arange(len(labels)))
        return CaptionDataset(data, [per_class[k] for k in labels.tolist()], classes=labels)

    train = caption_split(base.train, keep_unseen=False)
    mean, std = stats_from_histograms(channel_histograms(train.images.images))  # the seen classes' statistics
    return CaptionSplits(
        name=spec,
        train=train,
        val=caption_split(base.val, keep_unseen=False),
        test=caption_split(base.test, keep_unseen=True),
        class_names=base.class_names,
        mean=mean,
        std=std,
        in_chans=base.in_chans,
        img_size=base.img_size,
        unseen=[base.class_names[k] for k in unseen],
        class_captions=info,
        data_hash=_options_hash(base.data_hash, {"unseen": unseen}),
    )


# --- caption files ---------------------------------------------------------------------------------------------------
def read_caption_rows(path: Path, *, image: str, caption: str, sep: str | None) -> list[tuple[int, str, str]]:
    """(line number, image path as written, caption) for every row of a CSV / TSV / JSONL file."""
    if not path.is_file():
        raise VitlabError(f"caption file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[int, str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise VitlabError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or image not in obj or caption not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise VitlabError(
                    f"{path}:{n}: needs keys {image!r} and {caption!r} (has {keys}); ?image=KEY&caption=KEY"
                )
            rows.append((n, str(obj[image] or ""), str(obj[caption] or "")))
        return rows
    delimiter = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = reader.fieldnames or []
    for col in (image, caption):
        if col not in columns:
            raise VitlabError(
                f"{path} has no column {col!r} (columns: {', '.join(columns) or 'none'}); choose columns with "
                "?image=COL&caption=COL (vitlab clip train --image-column / --caption-column)"
            )
    for row in reader:
        rows.append((reader.line_num, (row.get(image) or "").strip(), row.get(caption) or ""))
    return rows


def _from_file(
    source: str,
    spec: str,
    options: dict[str, str],
    img_size: tuple[int, int] | None,
    in_chans: int | None,
    seed: int,
    val_fraction: float,
    skip_bad_images: bool,
) -> CaptionSplits:
    path = Path(source).expanduser()
    in_chans = 3 if in_chans is None else in_chans
    img_size = (224, 224) if img_size is None else (int(img_size[0]), int(img_size[1]))
    rows = read_caption_rows(path, image=options.get("image", "filepath"), caption=options.get("caption", "title"),
                             sep=options.get("sep"))  # fmt: skip
    hint = "fix the row, or pass --skip-bad-images to leave bad rows out"
    grouped: dict[Path, list[str]] = {}
    skipped: list[str] = []
    checked: dict[Path, str | None] = {}
    for line, image, text in rows:
        where = f"{path}:{line}"
        caption = " ".join(text.split())
        problem = None
        if not image:
            problem = f"{where}: no image path"
        elif not caption:
            problem = f"{where}: empty caption"
        else:
            file = (path.parent / image).resolve()
            if file not in checked:
                checked[file] = _check_image(file, in_chans, decode=skip_bad_images)
            if checked[file]:
                problem = f"{where}: {checked[file]}"
        if problem:
            if not skip_bad_images:
                raise VitlabError(f"{problem}; {hint}")
            skipped.append(problem)
            continue
        grouped.setdefault(file, []).append(caption)
    if not grouped:
        raise VitlabError(f"{path} has no usable rows ({len(rows)} rows, {len(skipped)} bad)")
    files = list(grouped)
    captions = [grouped[f] for f in files]
    rest, test = stratified_split(torch.zeros(len(files), dtype=torch.long), val_fraction, TEST_SPLIT_SEED)
    train, val = stratified_split(torch.zeros(len(rest), dtype=torch.long), val_fraction / (1 - val_fraction), seed)
    train, val = rest[train], rest[val]

    def caption_split(idx: Tensor) -> CaptionDataset:
        samples = [(files[i], k) for k, i in enumerate(idx.tolist())]
        images = FolderDataset(samples, in_chans=in_chans, img_size=img_size)
        return CaptionDataset(images, [captions[i] for i in idx.tolist()])

    splits = {name: caption_split(idx) for name, idx in (("train", train), ("val", val), ("test", test))}
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:STATS_IMAGES]
    hist = sum(
        channel_histograms(load_image(files[train[i]], in_chans=in_chans, img_size=img_size)[None])
        for i in pick.tolist()
    )
    mean, std = stats_from_histograms(hist)
    root = path.parent.resolve()  # image paths are resolved: their names in a manifest are relative to this
    existing = [f for f in checked if f.is_file()]
    return CaptionSplits(
        name=spec,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=[],
        mean=mean,
        std=std,
        in_chans=in_chans,
        img_size=img_size,
        skipped=skipped,
        # the file's rows (which image, which captions, in which order) and the images they name, as found
        data_hash=_options_hash(hashlib.sha256(path.read_bytes()).hexdigest(), options, files_hash(root, existing)),
        root=str(root),
    )


def _options_hash(*parts: Any) -> str:
    """A caption set's fingerprint: its source's and the options that make samples and captions of it (which
    columns, which classes are unseen)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _check_image(file: Path, in_chans: int, *, decode: bool) -> str | None:
    """Why an image cannot be used, or None. Existence always; a full decode only when bad rows are skipped
    (otherwise an unreadable file is a one-line error when its batch is loaded)."""
    if not file.is_file():
        return f"image {str(file)!r} does not exist"
    if decode:
        try:
            load_image(file, in_chans=in_chans, img_size=(8, 8))
        except VitlabError as e:
            return str(e).split(". Fix")[0]
    return None
