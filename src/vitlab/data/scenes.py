"""Scenes with captions, from data that ships: 1-3 small items over a background texture.

A scene is a canvas (default 64 px) covered by a crop of one of scikit-image's textures (brick, grass, gravel),
tinted so that it has a colour, with 1-3 Fashion-MNIST items (scikit-learn's digits where Fashion-MNIST is not on the
machine) scaled to a quarter to almost half of the canvas, coloured, and placed so that they overlap little. For
each scene it keeps what captioning, segmentation and retrieval need: the image, each item's class, colour, box and
pixels (an instance map), the background, and 5 captions from a small grammar with paraphrases ("a red sneaker to
the left of a blue bag on grass", "a bag and a sneaker lying on the grass", ...).

Scene ``i`` of seed ``s`` is a pure function of ``(s, i)`` (its own numpy Generator: the global random state is
neither read nor changed), so a larger count only adds scenes, and the split of a scene is drawn with it: ``val``
and ``test`` take ``val_fraction`` each. Held-out combinations make the test split measure composition: scenes with
an (item class, background) pair of `HELD_OUT_BACKGROUND` or an (item, item) pair of `HELD_OUT_PAIRS` are drawn only
in the test split; train and val scenes are drawn again until they have none. Test scenes take their items from
images the train and val scenes never use (Fashion-MNIST's test set, a fixed fifth of the digits).

``scenes:SOURCE[?count=N&size=PX&seed=S]`` names the scenes as a caption set (`build_scene_dataset`);
`write_scene_folder` writes them as PNG images, COCO caption and instance files and palette-PNG label maps
(`vitlab data scenes`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from vitlab.data.base import (
    InMemoryDataset,
    channel_histograms,
    stats_from_histograms,
    stratified_split,
    tensors_hash,
)
from vitlab.data.captions import DIGITS, FASHION_MNIST, CaptionDataset, CaptionSplits
from vitlab.errors import VitlabError

PREFIX = "scenes:"
SOURCES = ("fashion-mnist", "digits")
SPLITS = ("train", "val", "test")
MAX_ITEMS = 3
BACKGROUNDS = ("brick", "grass", "gravel")
# a colour per texture, so that "grass" is green in RGB; textures are drawn at 25-75% of it, items up to 100%
_TINTS = np.array([(200, 110, 90), (90, 170, 70), (150, 140, 170)], dtype=np.float32)
COLOURS = ("white", "red", "blue", "yellow")
_COLOUR_RGB = np.array([(240, 240, 240), (230, 40, 30), (40, 90, 240), (245, 215, 20)], dtype=np.float32)
# (item class, background index) and (item class, item class) seen only in the test split
HELD_OUT_BACKGROUND = ((1, 0), (5, 1), (8, 2))
HELD_OUT_PAIRS = ((0, 7), (3, 9))
ITEM_THRESHOLD = 40  # an item's pixel is part of it where its intensity (0-255) is above this
_MAX_OVERLAP = 0.15  # of the smaller box's area, between two items' boxes
_PER_SCENE = ("images", "instances", "boxes", "item_classes", "item_colours", "backgrounds", "crops", "split", "ids")


@dataclass
class ItemPool:
    """The small images items are cut from: uint8 [M, h, w] with their classes and whether test scenes use them."""

    images: np.ndarray
    labels: np.ndarray
    for_test: np.ndarray
    names: tuple[str, ...]
    source: str
    notes: list[str] = field(default_factory=list)

    def choices(self, k: int, test: bool) -> np.ndarray:
        return self._by_class[(k, test)]

    def __post_init__(self) -> None:
        self._by_class = {
            (k, t): np.flatnonzero((self.labels == k) & (self.for_test == t))
            for k in range(len(self.names))
            for t in (False, True)
        }


@dataclass
class Scenes:
    """Scenes as arrays (``N`` scenes of ``H x W``; ``MAX_ITEMS`` slots per scene, -1 where a slot is empty).

    ``images`` uint8 [N, H, W, 3]; ``instances`` uint8 [N, H, W]: 0 for the background, j + 1 where item slot j is
    visible; ``boxes`` int32 [N, MAX_ITEMS, 4] (x0, y0, x1, y1), x1 and y1 exclusive, tight around the pixels
    each item was drawn with (a later item may cover a few of them); ``item_classes`` / ``item_colours`` int64
    [N, MAX_ITEMS] into ``item_names`` / `COLOURS`;
    ``backgrounds`` int64 [N] into `BACKGROUNDS`; ``crops`` int64 [N, 4] (y, x, scale, quarter turns) of the
    texture crop (`background_image` draws it again); ``split`` int64 [N] into `SPLITS`; ``ids`` int64 [N] each
    scene's index in the generator; ``captions`` 5 per scene.
    """

    images: np.ndarray
    instances: np.ndarray
    boxes: np.ndarray
    item_classes: np.ndarray
    item_colours: np.ndarray
    backgrounds: np.ndarray
    crops: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    captions: list[list[str]]
    item_names: tuple[str, ...]
    source: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label_names(self) -> list[str]:
        """Names of the classes of `label_maps`: the item classes, then the background textures ("stuff")."""
        return [*self.item_names, *BACKGROUNDS]

    def label_maps(self) -> np.ndarray:
        """uint8 [N, H, W]: each pixel's index in `label_names` (an item's class, else its background's)."""
        K = len(self.item_names)
        out = (K + self.backgrounds)[:, None, None].repeat(self.images.shape[1], 1).repeat(self.images.shape[2], 2)
        for j in range(MAX_ITEMS):
            where = self.instances == j + 1  # (N, H, W)
            out[where] = np.broadcast_to(self.item_classes[:, j, None, None], where.shape)[where]
        return out.astype(np.uint8)

    def take(self, index: np.ndarray) -> Scenes:
        """The scenes at ``index`` (an int or bool array), e.g. ``scenes.take(scenes.split == 2)`` for test."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        arrays = {a: getattr(self, a)[index] for a in _PER_SCENE}
        return replace(self, **arrays, captions=[self.captions[i] for i in index.tolist()])


# --- what scenes are made of ---------------------------------------------------------------------------------------
def load_item_pool(source: str, *, data_dir: str | None = None) -> ItemPool:
    """Items of ``source`` (`SOURCES`). Fashion-MNIST comes from a folder (``data_dir``, the Debian package
    ``dataset-fashion-mnist``, the vitlab cache) and is never downloaded here: scenes are built from data that
    ships, so without it they use scikit-learn's digits and say so in ``notes``."""
    if source not in SOURCES:
        raise VitlabError(f"unknown scene items {source!r}; choose from {', '.join(SOURCES)}")
    notes = []
    if source == "fashion-mnist":
        from vitlab.data.fashion_mnist import load_fashion_mnist

        try:
            d = load_fashion_mnist(data_dir, download_missing=False)
        except VitlabError:
            notes.append(
                "Fashion-MNIST is not on this machine (apt-get install dataset-fashion-mnist, or --data-dir): the "
                "scenes use scikit-learn's digits instead"
            )
        else:
            images = torch.cat([d["train_images"], d["test_images"]])[:, 0].numpy()  # (M, 28, 28)
            labels = torch.cat([d["train_labels"], d["test_labels"]]).numpy()
            for_test = np.arange(len(labels)) >= len(d["train_labels"])
            return ItemPool(images, labels, for_test, FASHION_MNIST.prompt_names, "fashion-mnist", notes)
    from vitlab.data.builtin import load_digits

    images, labels = load_digits()
    _, test = stratified_split(labels, 0.2, seed=0)  # a fixed fifth of each digit for the test scenes
    for_test = np.zeros(len(labels), dtype=bool)
    for_test[test.numpy()] = True
    return ItemPool(images[:, 0].numpy(), labels.numpy(), for_test, DIGITS.prompt_names, "digits", notes)


@functools.cache
def _textures() -> tuple[np.ndarray, ...]:
    import skimage.data

    return tuple(getattr(skimage.data, name)().astype(np.float32) / 255 for name in BACKGROUNDS)  # (512, 512) each


def _crop_scales(size: int) -> list[int]:
    """Block sizes a texture crop is averaged down by: the larger, the finer the texture looks."""
    return [f for f in (1, 2, 3, 4) if size * f <= 512] or [1]


def background_image(background: int, crop: np.ndarray, size: int) -> np.ndarray:
    """The tinted texture crop (y, x, scale, quarter turns) of a scene, uint8 [size, size, 3]."""
    y, x, f, turns = (int(v) for v in crop)
    tex = _textures()[background]
    if size * f > tex.shape[0]:  # a canvas larger than the texture: stretch it
        from skimage.transform import resize

        gray = resize(tex, (size, size), order=1, anti_aliasing=False)
    else:
        patch = tex[y : y + size * f, x : x + size * f]
        gray = patch.reshape(size, f, size, f).mean(axis=(1, 3))  # (size, size)
    gray = np.rot90(gray, turns)
    rgb = _TINTS[background] * (0.25 + 0.5 * gray[..., None])  # (size, size, 3)
    return np.round(rgb).astype(np.uint8)


# --- one scene -----------------------------------------------------------------------------------------------------
def _has_held_out(classes: list[int], background: int) -> bool:
    if any((k, background) in HELD_OUT_BACKGROUND for k in classes):
        return True
    pairs = {(min(a, b), max(a, b)) for i, a in enumerate(classes) for b in classes[i + 1 :]}
    return bool(pairs & {(min(a, b), max(a, b)) for a, b in HELD_OUT_PAIRS})


def _draw_content(rng: np.random.Generator, num_classes: int, test: bool) -> tuple[list[int], int]:
    """Item classes and background; train and val scenes are drawn again until they hold no held-out pair."""
    for _ in range(1000):
        n = int(rng.integers(1, MAX_ITEMS + 1))
        classes = rng.integers(num_classes, size=n).tolist()
        background = int(rng.integers(len(BACKGROUNDS)))
        if test or not _has_held_out(classes, background):
            return classes, background
    raise RuntimeError("no scene without a held-out combination in 1000 draws")  # not reachable with the pairs above


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection of two boxes (x0, y0, x1, y1) over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(w, 0) * max(h, 0) / smaller


def _place(rng: np.random.Generator, side: int, size: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left corner of a ``side`` square that overlaps the ``taken`` squares little (the least of 50 draws)."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(50):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        worst = max((_overlap((x, y, x + side, y + side), t) for t in taken), default=0.0)
        if worst <= _MAX_OVERLAP:
            return y, x
        if worst < best_overlap:
            best, best_overlap = (y, x), worst
    return best


def _item_pixels(image: np.ndarray, side: int) -> np.ndarray:
    """An item's intensity (float 0-255) scaled to [side, side]."""
    from skimage.transform import resize

    return resize(image.astype(np.float32), (side, side), order=1, anti_aliasing=side < image.shape[0])


def draw_scene(
    rng: np.random.Generator, pool: ItemPool, *, size: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One scene: (image uint8 [size, size, 3], instance map uint8 [size, size], what is in it)."""
    u = rng.random()
    split = 2 if u < val_fraction else 1 if u < 2 * val_fraction else 0
    classes, background = _draw_content(rng, len(pool.names), test=split == 2)
    scale = int(rng.choice(_crop_scales(size)))
    span = max(512 - size * scale, 0)
    crop = np.array([rng.integers(0, span + 1), rng.integers(0, span + 1), scale, rng.integers(4)])
    image = background_image(background, crop, size).astype(np.float32)
    instances = np.zeros((size, size), dtype=np.uint8)
    lo, hi = max(round(size * 0.25), 4), max(round(size * 0.44), 4)
    squares: list[tuple[int, int, int, int]] = []
    boxes, colours = [], []
    for j, k in enumerate(classes):
        source = pool.images[rng.choice(pool.choices(k, split == 2))]
        side = int(rng.integers(lo, hi + 1))
        y, x = _place(rng, side, size, squares)
        squares.append((x, y, x + side, y + side))
        colour = int(rng.integers(len(COLOURS)))
        pixels = _item_pixels(source, side)  # (side, side)
        mask = pixels > ITEM_THRESHOLD
        if not mask.any():  # an item too faint to see at this size: its brightest pixel stands for it
            mask = pixels == pixels.max()
        ys, xs = np.nonzero(mask)
        boxes.append((x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1))
        shade = 0.35 + 0.65 * np.clip(pixels, 0, 255)[..., None] / 255  # (side, side, 1)
        region = image[y : y + side, x : x + side]
        region[mask] = (_COLOUR_RGB[colour] * shade)[mask]
        instances[y : y + side, x : x + side][mask] = j + 1  # a later item covers an earlier one
        colours.append(colour)
    facts = {"split": split, "classes": classes, "colours": colours, "boxes": boxes, "background": background,
             "crop": crop}  # fmt: skip
    return np.round(image).astype(np.uint8), instances, facts


def generate_scenes(
    *,
    count: int = 2000,
    size: int = 64,
    seed: int = 0,
    source: str = "fashion-mnist",
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    pool: ItemPool | None = None,
) -> Scenes:
    """``count`` scenes of ``size`` px, scene i drawn from ``numpy.random.default_rng([seed, i])``."""
    if count < 1 or not 16 <= size <= 1024:
        raise VitlabError(f"scenes need count >= 1 and 16 <= size <= 1024 px, got count={count}, size={size}")
    if not 0 <= val_fraction < 0.5:
        raise VitlabError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    pool = pool or load_item_pool(source, data_dir=data_dir)
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    instances = np.zeros((count, size, size), dtype=np.uint8)
    boxes = np.full((count, MAX_ITEMS, 4), -1, dtype=np.int32)
    classes = np.full((count, MAX_ITEMS), -1, dtype=np.int64)
    colours = np.full((count, MAX_ITEMS), -1, dtype=np.int64)
    backgrounds, split = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    crops = np.zeros((count, 4), dtype=np.int64)
    captions = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        images[i], instances[i], facts = draw_scene(rng, pool, size=size, val_fraction=val_fraction)
        n = len(facts["classes"])
        boxes[i, :n], classes[i, :n], colours[i, :n] = facts["boxes"], facts["classes"], facts["colours"]
        backgrounds[i], split[i], crops[i] = facts["background"], facts["split"], facts["crop"]
        captions.append(scene_captions(rng, facts, pool.names))
    return Scenes(images, instances, boxes, classes, colours, backgrounds, crops, split, np.arange(count), captions,
                  pool.names, pool.source, seed, list(pool.notes))  # fmt: skip


# --- captions ------------------------------------------------------------------------------------------------------
def _a(phrase: str) -> str:
    article = "an" if phrase[0] in "aeio" and not phrase.startswith("one") else "a"
    return f"{article} {phrase}"


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def _relation(a: tuple[int, ...], b: tuple[int, ...]) -> str:
    """Where box ``a`` is relative to box ``b``: the axis on which their centres are further apart decides."""
    dx = (a[0] + a[2]) - (b[0] + b[2])
    dy = (a[1] + a[3]) - (b[1] + b[3])
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def scene_captions(rng: np.random.Generator, facts: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """Five captions of a scene, each naming every item and the background: one per sentence frame, with the
    frame's paraphrase, the order of the items and the use of colours drawn from ``rng``."""
    order = sorted(range(len(facts["classes"])), key=lambda j: facts["boxes"][j][0] + facts["boxes"][j][2])
    plain = [_a(names[facts["classes"][j]]) for j in order]  # left to right
    coloured = [_a(f"{COLOURS[facts['colours'][j]]} {names[facts['classes'][j]]}") for j in order]
    bg = BACKGROUNDS[facts["background"]]
    n = len(order)
    shuffled = [plain[j] for j in rng.permutation(n)]
    count = ("a single item", "a pair of items", "a trio of items")[n - 1]  # no number word: digits are items
    if n == 1:
        where = rng.choice([f"{coloured[0]} on {bg}", f"{plain[0]} on the {bg}", f"{coloured[0]} lying on {bg}"])
    elif n == 2:
        j, k = order
        rel = _relation(facts["boxes"][j], facts["boxes"][k])
        back = _relation(facts["boxes"][k], facts["boxes"][j])
        where = rng.choice([f"{coloured[0]} {rel} {coloured[1]} on {bg}",
                            f"{coloured[1]} {back} {coloured[0]} on {bg}"])  # fmt: skip
    else:
        where = rng.choice([f"{_listing(coloured)} from left to right on {bg}",
                            f"{_listing(plain)} in a row on the {bg}"])  # fmt: skip
    return [
        str(where),
        str(rng.choice([f"{_listing(shuffled)} lying on the {bg}", f"{_listing(shuffled)} on {bg}"])),
        str(rng.choice([f"{count} on {bg}: {_listing(plain)}", f"{count} on the {bg}: {_listing(shuffled)}"])),
        str(rng.choice([f"{bg} with {_listing(coloured)}", f"a {bg} background with {_listing(coloured)}"])),
        str(rng.choice([f"there is {_listing(shuffled)} on the {bg}", f"a picture of {_listing(plain)} on {bg}"])),
    ]


# --- as a caption set ----------------------------------------------------------------------------------------------
@dataclass
class SceneSplits(CaptionSplits):
    """`CaptionSplits` of scenes, with each split's `Scenes` (boxes, masks, classes) in ``scenes``."""

    scenes: dict[str, Scenes] = field(default_factory=dict)


def parse_scene_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``scenes:SOURCE?count=N&size=PX&seed=S`` -> (SOURCE, {count, size, seed})."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    source, _, query = body.partition("?")
    options = {"count": 2000, "size": 64, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise VitlabError(f"unknown scene option {key!r} in {spec!r}; options are count, size, seed")
        try:
            options[key] = int(value)
        except ValueError:
            raise VitlabError(f"scene option {key}={value!r} in {spec!r} is not a whole number") from None
    if source.lower() not in SOURCES:
        raise VitlabError(f"{spec!r}: scenes are made of {' or '.join(SOURCES)} items (scenes:digits?count=500)")
    return source.lower(), options


def scene_facts(spec: str, *, val_fraction: float) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of ``scenes:...`` without drawing them, for
    `vitlab.train.defaults`; ``num_classes`` is 0 (the captions are the labels)."""
    _, options = parse_scene_spec(spec)
    size = options["size"]
    train = round(options["count"] * (1 - 2 * val_fraction))
    return {"train_images": train, "num_classes": 0, "img_size": (size, size), "in_chans": 3}


def scene_splits(scenes: Scenes, *, name: str) -> SceneSplits:
    """Scenes as a caption set: each split an in-memory `CaptionDataset` (images uint8 [n, 3, H, W])."""
    parts = {s: scenes.take(scenes.split == i) for i, s in enumerate(SPLITS)}  # val and test empty at val_fraction=0

    def caption_set(part: Scenes) -> CaptionDataset:
        images = torch.from_numpy(part.images).permute(0, 3, 1, 2).contiguous()  # (n, H, W, 3) -> (n, 3, H, W)
        return CaptionDataset(InMemoryDataset(images, torch.arange(len(part))), part.captions)

    train = caption_set(parts["train"])
    mean, std = stats_from_histograms(channel_histograms(train.images.images))
    return SceneSplits(name=name, train=train, val=caption_set(parts["val"]), test=caption_set(parts["test"]),
                       class_names=[], mean=mean, std=std, in_chans=3, img_size=scenes.images.shape[1:3],
                       notes=list(scenes.notes), scenes=parts, data_hash=_scenes_hash(scenes))  # fmt: skip


def scenes_of(splits: Any, dataset: Any) -> Scenes | None:
    """The `Scenes` behind ``dataset`` when it is a whole split of ``splits`` (`SceneSplits`), else None (other
    data, or a subset of a split)."""
    for part in getattr(splits, "scenes", {}).values():
        if len(part) == len(dataset) and part.captions == getattr(dataset, "captions", None):
            return part
    return None


def item_zero_shot(scenes: Scenes) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Zero-shot classification of scene items, one measure for every training objective: (the scenes with a
    single item [n], that item's class [n], the prompts of each class [K][P]). A class's prompts are the grammar's
    own sentence for a lone item, "a sneaker on the grass", once per background, so that no class's prompts name a
    background the others do not."""
    index = np.flatnonzero((scenes.item_classes >= 0).sum(1) == 1)
    prompts = [[f"{_a(name)} on the {bg}" for bg in BACKGROUNDS] for name in scenes.item_names]
    return index, scenes.item_classes[index, 0], prompts


def _scenes_hash(scenes: Scenes) -> str:
    """The fingerprint of the scenes' arrays and captions (a run's split manifest records it)."""
    arrays = tensors_hash(*(torch.from_numpy(getattr(scenes, a)) for a in _PER_SCENE))
    return hashlib.sha256((arrays + json.dumps(scenes.captions)).encode()).hexdigest()


def build_scene_dataset(spec: str, *, data_dir: str | None, val_fraction: float) -> SceneSplits:
    """``scenes:SOURCE?...`` built in memory (see the module docstring)."""
    source, options = parse_scene_spec(spec)
    scenes = generate_scenes(**options, source=source, data_dir=data_dir, val_fraction=val_fraction)
    return scene_splits(scenes, name=spec)


# --- on disk ---------------------------------------------------------------------------------------------------------
def write_scene_folder(scenes: Scenes, out: str | Path) -> dict[str, int]:
    """Write ``scenes`` to ``out`` (atomically: a temporary folder renamed at the end), as users' data comes:

    - ``images/NNNNNN.png`` (RGB) and ``captions_{train,val,test}.json`` (COCO captions, `vitlab.data.coco`);
    - ``instances_{train,val,test}.json``: COCO instances, the items as ``categories``; per item its ``bbox``
      [x, y, w, h], ``area`` and ``segmentation`` (uncompressed RLE of its visible pixels); per image its
      ``background``;
    - ``masks/NNNNNN.png``: palette PNG label maps, each pixel the line of ``labels.txt`` of its class (the items,
      then the backgrounds).

    Returns the number of scenes per split.
    """
    from vitlab._io import atomic_directory, write_json
    from vitlab.data.coco import captions_json

    labels = scenes.label_maps()
    H, W = scenes.images.shape[1:3]
    names = [f"{i:06d}.png" for i in scenes.ids.tolist()]
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for name, image, label in zip(names, scenes.images, labels):
            _write_png(tmp / "images" / name, image)
            _write_png(tmp / "masks" / name, label, palette=_palette(len(scenes.label_names)))
        (tmp / "labels.txt").write_text("".join(f"{n}\n" for n in scenes.label_names))
        counts = {}
        for s, split in enumerate(SPLITS):
            index = np.flatnonzero(scenes.split == s)
            images = [{"id": int(scenes.ids[i]), "file_name": names[i], "width": W, "height": H} for i in index]
            about = f"vitlab scenes of {scenes.source} items, seed {scenes.seed}, {split} split"
            captions = [scenes.captions[i] for i in index]
            write_json(tmp / f"captions_{split}.json", captions_json(images, captions, description=about))
            write_json(tmp / f"instances_{split}.json", _instances_json(scenes, index, images, about))
            counts[split] = len(index)
    return counts


def _instances_json(scenes: Scenes, index: np.ndarray, images: list[dict[str, Any]], about: str) -> dict[str, Any]:
    from vitlab.data.coco import mask_to_rle

    annotations = []
    for i, image in zip(index.tolist(), images):
        image["background"] = BACKGROUNDS[scenes.backgrounds[i]]
        for j in np.flatnonzero(scenes.item_classes[i] >= 0).tolist():
            x0, y0, x1, y1 = scenes.boxes[i, j].tolist()
            mask = scenes.instances[i] == j + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": int(scenes.item_classes[i, j]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": int(mask.sum()), "iscrowd": 0, "segmentation": mask_to_rle(mask),
                                "colour": COLOURS[scenes.item_colours[i, j]]})  # fmt: skip
    categories = [{"id": k, "name": n} for k, n in enumerate(scenes.item_names)]
    return {"info": {"description": about}, "images": images, "annotations": annotations, "categories": categories}


def _palette(n: int) -> list[int]:
    """Distinct RGB colours for ``n`` labels (PASCAL VOC's bit-interleaved colour map)."""
    out = []
    for k in range(n):
        r = g = b = 0
        c = k + 1  # label 0 gets a colour too: every label here is a class
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out += [r, g, b]
    return out


def _write_png(path: Path, pixels: np.ndarray, *, palette: list[int] | None = None) -> None:
    """uint8 [H, W, 3] as an RGB PNG, or [H, W] with ``palette`` as a palette PNG that keeps the values."""
    from PIL import Image

    if palette is None:
        Image.fromarray(pixels).save(path, format="PNG")  # (H, W, 3) uint8: RGB
        return
    image = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), np.ascontiguousarray(pixels).tobytes())
    image.putpalette(palette)
    image.save(path, format="PNG")
