"""Scenes with captions (`vitlab.data.scenes`) and COCO-format caption sets (`vitlab.data.coco`): the generator is
deterministic, its masks, boxes and captions say what its images show, held-out combinations stay in test, and the
folder `vitlab data scenes` writes reads back through ``coco-captions:DIR`` pixel for pixel."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.data.coco import rle_to_mask
from vitlab.data.scenes import (
    BACKGROUNDS,
    HELD_OUT_BACKGROUND,
    HELD_OUT_PAIRS,
    SPLITS,
    background_image,
    generate_scenes,
    load_item_pool,
    write_scene_folder,
)
from vitlab.data.sources import describe_dataset
from vitlab.errors import VitlabError


@pytest.fixture(scope="module")
def pool():
    return load_item_pool("digits")  # Fashion-MNIST is not shipped: the digits are always there


@pytest.fixture(scope="module")
def scenes(pool):
    return generate_scenes(count=300, size=32, seed=0, pool=pool)


def _arrays(s) -> dict[str, np.ndarray]:
    names = ("images", "instances", "boxes", "item_classes", "item_colours", "backgrounds", "crops", "split")
    return {n: getattr(s, n) for n in names}


def test_generator_is_deterministic_and_leaves_the_global_random_state_alone(pool, scenes) -> None:
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    again = generate_scenes(count=60, size=32, seed=0, pool=pool)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    for name, array in _arrays(again).items():  # scene i depends on (seed, i) only: a smaller count is a prefix
        assert array.dtype == getattr(scenes, name).dtype
        assert array.tobytes() == getattr(scenes, name)[:60].tobytes(), name
    assert again.captions == scenes.captions[:60]
    other = generate_scenes(count=60, size=32, seed=1, pool=pool)
    assert not np.array_equal(other.images, again.images) and other.captions != again.captions
    assert set(np.unique(scenes.split)) == {0, 1, 2} and all(len(c) == 5 for c in scenes.captions)


def test_masks_and_boxes_match_the_images(scenes) -> None:
    size = scenes.images.shape[1]
    labels = scenes.label_maps()
    for i in range(len(scenes)):
        background = background_image(int(scenes.backgrounds[i]), scenes.crops[i], size)
        items = scenes.instances[i] > 0
        # where no item is, the image is the background texture; under an item, it is not
        assert np.array_equal(scenes.images[i][~items], background[~items]), i
        differs = np.abs(scenes.images[i].astype(int) - background.astype(int)).sum(-1) > 12
        assert differs[items].mean() > 0.9, i
        for j in np.flatnonzero(scenes.item_classes[i] >= 0):
            x0, y0, x1, y1 = scenes.boxes[i, j]
            ys, xs = np.nonzero(scenes.instances[i] == j + 1)
            assert len(ys) and x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, (i, j)
            assert (labels[i][scenes.instances[i] == j + 1] == scenes.item_classes[i, j]).all()
        K = len(scenes.item_names)
        assert (labels[i][~items] == K + scenes.backgrounds[i]).all()
    assert scenes.label_names == [*scenes.item_names, *BACKGROUNDS]


def _named(caption: str, names: tuple[str, ...]) -> dict[str, int]:
    """How often each item name is in a caption, as a whole name ("shirt" is not in "a t-shirt")."""
    counts = {n: len(re.findall(rf"(?<![\w-]){n}(?![\w-])", caption)) for n in names}
    return {n: c for n, c in counts.items() if c}


_RELATION = re.compile(r"^an? (\w+) (\S+) (to the left of|to the right of|above|below) an? (\w+) (\S+) on (\w+)$")


def test_captions_name_the_items_and_the_background_and_relations_follow_the_boxes(scenes) -> None:
    relations = 0
    for i, captions in enumerate(scenes.captions):
        present = [scenes.item_names[k] for k in scenes.item_classes[i] if k >= 0]
        background = BACKGROUNDS[scenes.backgrounds[i]]
        for caption in captions:  # every caption names each item once and the background
            assert _named(caption, scenes.item_names) == {n: present.count(n) for n in present}, caption
            assert re.search(rf"\b{background}\b", caption), caption
        assert len(set(captions)) >= 4, captions
        m = _RELATION.match(captions[0])
        if m and len(present) == 2:  # "a red two to the left of a blue seven on grass": the boxes agree
            relations += 1
            first = [j for j in (0, 1) if scenes.item_names[scenes.item_classes[i, j]] == m[2]]
            if len(first) != 1:
                continue  # two items of one class: the sentence does not say which is which
            a, b = scenes.boxes[i, first[0]], scenes.boxes[i, 1 - first[0]]
            dx, dy = (a[0] + a[2]) - (b[0] + b[2]), (a[1] + a[3]) - (b[1] + b[3])
            expected = {"to the left of": dx < 0, "to the right of": dx > 0, "above": dy < 0, "below": dy > 0}
            assert expected[m[3]] and (abs(dx) >= abs(dy)) == ("of" in m[3]), caption
    assert relations > 20


def test_held_out_combinations_appear_only_in_the_test_split(scenes) -> None:
    def held_out(i: int) -> bool:
        classes = [int(k) for k in scenes.item_classes[i] if k >= 0]
        bg = int(scenes.backgrounds[i])
        pairs = {frozenset((a, b)) for n, a in enumerate(classes) for b in classes[n + 1 :]}
        return any((k, bg) in HELD_OUT_BACKGROUND for k in classes) or bool(
            pairs & {frozenset(p) for p in HELD_OUT_PAIRS}
        )

    flags = np.array([held_out(i) for i in range(len(scenes))])
    assert not flags[scenes.split != SPLITS.index("test")].any()
    assert flags[scenes.split == SPLITS.index("test")].any()


def test_scene_folder_round_trips_through_coco_captions(tmp_path) -> None:
    out = tmp_path / "scenes"
    args = ["data", "scenes", "--out", str(out), "--count", "40", "--size", "32", "--seed", "3", "--items", "digits"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "captions_train.json" in r.output and str(out) in r.output
    scenes = generate_scenes(count=40, size=32, seed=3, source="digits")
    splits = build_dataset(f"coco-captions:{out}", img_size=(32, 32), in_chans=3)
    for s, name in enumerate(SPLITS):
        part, split = scenes.take(scenes.split == s), getattr(splits, name)
        images, idx = next(split.loader(len(split), shuffle=False))
        assert torch.equal(images, torch.from_numpy(part.images).permute(0, 3, 1, 2)), name  # pixel for pixel
        assert [split.captions[k] for k in idx.tolist()] == part.captions
        coco = json.loads((out / f"captions_{name}.json").read_text())
        assert {"id", "file_name", "width", "height"} <= set(coco["images"][0])
        assert {"id", "image_id", "caption"} == set(coco["annotations"][0])
        instances = json.loads((out / f"instances_{name}.json").read_text())
        for a in instances["annotations"]:
            k = part.ids.tolist().index(a["image_id"])
            mask = rle_to_mask(a["segmentation"])
            j = next(j for j in range(3) if np.array_equal(mask, part.instances[k] == j + 1))
            assert a["area"] == mask.sum() > 0
            x0, y0, x1, y1 = part.boxes[k, j].tolist()
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0] and a["category_id"] == part.item_classes[k, j]
    labels = scenes.label_maps()
    for i in (0, 17, 39):
        with Image.open(out / "masks" / f"{i:06d}.png") as mask:
            assert mask.mode == "P" and np.array_equal(np.array(mask), labels[i])
    assert (out / "labels.txt").read_text().splitlines() == scenes.label_names
    assert not [p for p in tmp_path.iterdir() if p.name != "scenes"]  # the temporary folder went


def _png(path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)
    return path.name


def _coco(path, names: list[str], start: int = 0) -> None:
    images = [{"id": start + i, "file_name": n, "width": 6, "height": 6} for i, n in enumerate(names)]
    captions = [{"id": k, "image_id": start + i, "caption": f"image {start + i} caption {k}"}
                for i in range(len(names)) for k in range(2)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": captions}))


def test_coco_2014_layout_and_a_single_file(tmp_path) -> None:
    # COCO 2014: annotations/captions_{train,val}2014.json, images in train2014/ and val2014/; test carved from train
    root = tmp_path / "coco"
    train = [_png(root / "train2014" / f"t{i}.png", i) for i in range(20)]
    _coco(root / "annotations" / "captions_train2014.json", train)
    val = [_png(root / "val2014" / f"v{i}.png", 100 + i) for i in range(4)]
    _coco(root / "annotations" / "captions_val2014.json", val, start=100)
    s = build_dataset(f"coco-captions:{root}", img_size=(6, 6), in_chans=3, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 4, 2)
    facts = describe_dataset(f"coco-captions:{root}")  # what `vitlab train` chooses defaults from, nothing decoded
    assert facts == {"train_images": 18, "num_classes": 0, "img_size": (6, 6), "in_chans": 3}
    assert all(c[0].startswith("image 1") for c in s.val.captions) and len(s.val.captions[0]) == 2
    # one file without a split in its name: vitlab splits it, test by a fixed seed and val by the run's
    single = tmp_path / "single"
    _coco(single / "captions.json", [_png(single / "images" / f"{i}.png", i) for i in range(20)])
    a = build_dataset(f"coco-captions:{single}", img_size=(6, 6), in_chans=3, seed=0, val_fraction=0.25)
    b = build_dataset(f"coco-captions:{single}", img_size=(6, 6), in_chans=3, seed=1, val_fraction=0.25)
    assert (len(a.train), len(a.val), len(a.test)) == (10, 5, 5)  # a quarter of all images each
    assert a.test.captions == b.test.captions and a.val.captions != b.val.captions
    (single / "captions_other.json").write_text("{}")
    with pytest.raises(VitlabError, match="cannot tell which captions file is which split"):
        build_dataset(f"coco-captions:{single}")


def test_missing_and_corrupt_images_are_one_line_errors_or_skipped_with_a_count(tmp_path) -> None:
    root = tmp_path / "c"
    names = [_png(root / "images" / f"{i}.png", 10 * i) for i in range(12)]
    _coco(root / "captions_train.json", [*names, "gone.png"])
    with pytest.raises(VitlabError) as e:
        build_dataset(f"coco-captions:{root}", img_size=(6, 6), in_chans=3)
    assert "'gone.png' is not in" in str(e.value) and "--skip-bad-images" in str(e.value) and "\n" not in str(e.value)
    (root / "images" / "3.png").write_bytes(b"not a png")
    s = build_dataset(f"coco-captions:{root}", img_size=(6, 6), in_chans=3, skip_bad_images=True)
    assert len(s.skipped) == 2 and len(s.train) + len(s.val) + len(s.test) == 11
    assert any("3.png" in m and "cannot read image" in m for m in s.skipped)
    _coco(root / "captions_train.json", names)  # without --skip-bad-images the corrupt file is refused in one line
    with pytest.raises(VitlabError) as e:
        s = build_dataset(f"coco-captions:{root}", img_size=(6, 6), in_chans=3)
        for split in (s.train, s.val, s.test):
            list(split.loader(4, shuffle=False))
    assert "cannot read image" in str(e.value) and "3.png" in str(e.value) and "\n" not in str(e.value)


def test_scene_specs_fashion_mnist_items_and_the_digits_fallback(monkeypatch) -> None:
    import vitlab.data.fashion_mnist as fashion_mnist

    def found(*args, **kwargs):  # a small stand-in for the Debian package's files
        g = torch.Generator().manual_seed(0)
        images = lambda n: (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
        return {"train_images": images(100), "train_labels": torch.arange(100) % 10,
                "test_images": images(30), "test_labels": torch.arange(30) % 10}  # fmt: skip

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", found)
    s = build_dataset("scenes:fashion-mnist?count=40&size=16&seed=2")
    scenes = s.scenes["train"]
    assert not s.notes and scenes.source == "fashion-mnist" and "ankle boot" in scenes.item_names
    for k, captions in enumerate(scenes.captions):
        present = [scenes.item_names[c] for c in scenes.item_classes[k] if c >= 0]
        assert all(_named(c, scenes.item_names) == {n: present.count(n) for n in present} for c in captions)

    def missing(*args, **kwargs):
        raise VitlabError("Fashion-MNIST not found")

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", missing)
    s = build_dataset("scenes:fashion-mnist?count=40&size=16&seed=2")
    assert any("digits instead" in n for n in s.notes) and s.img_size == (16, 16) and s.in_chans == 3
    assert len(s.train) + len(s.val) + len(s.test) == 40 and s.scenes["test"].images.shape[1:] == (16, 16, 3)
    images, idx = next(s.train.loader(4, shuffle=False))
    assert images.shape == (4, 3, 16, 16) and s.train.captions[idx[0]] == s.scenes["train"].captions[0]
    facts = describe_dataset("scenes:digits?count=40&size=16")
    assert facts == {"train_images": 32, "num_classes": 0, "img_size": (16, 16), "in_chans": 3}
    for spec, message in (("scenes:cats", "scenes are made of"), ("scenes:digits?colour=red", "unknown scene option"),
                          ("scenes:digits?count=x", "not a whole number")):  # fmt: skip
        with pytest.raises(VitlabError, match=message):
            build_dataset(spec)


@pytest.mark.parametrize("kind", ["scenes", "coco-captions"])
def test_clip_trains_on_scenes(kind, tmp_path) -> None:
    from test_clip import clip_args

    data = "scenes:digits?count=120&size=16"
    if kind == "coco-captions":  # the same scenes as a user's COCO-format folder
        write_scene_folder(generate_scenes(count=120, size=16, source="digits"), tmp_path / "coco")
        data = f"coco-captions:{tmp_path / 'coco'}"
    args = clip_args(tmp_path / "run", "--max-steps", "3", "--batch-size", "16")
    args[args.index("--data") + 1] = data
    del args[args.index("--unseen") : args.index("--unseen") + 2]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "image to text" in r.output and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
