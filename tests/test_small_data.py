"""Small data never fails for being small: a dataset smaller than a batch trains, a class with one image stays in
training, held-out splits are stratified by class; and class subsets for open-set experiments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import vitlab
from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.data.base import stratified_split
from vitlab.train.trainer import fit_batch

TINY = '{"depth": 1, "embed_dim": 16, "num_heads": 2}'


def image_folder(root, counts: dict[str, int]):
    """``root/<class>/<i>.png``: 8x8 images, each class a grey level plus noise."""
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(40 + 60 * c + rng.normal(0, 10, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def train_cli(*args: str):
    base = ["train", "--model", "vit_tiny_patch7_28", "--set", f"model_args={TINY}", "--precision", "fp32"]
    return CliRunner().invoke(cli, [*base, "--set", "threads=1", "--set", "num_workers=0", *map(str, args)])


def test_a_folder_smaller_than_a_batch_trains(tmp_path) -> None:
    data = image_folder(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8})
    run = tmp_path / "run"
    r = train_cli("--data", f"folder:{data}", "--epochs", "3", "--out", run)  # the default batch of 128
    assert r.exit_code == 0, r.output
    splits = build_dataset(f"folder:{data}", img_size=(28, 28), in_chans=1)
    n = len(splits.train)
    assert n + len(splits.val) + len(splits.test) == 24
    assert f"the training split has {n} images, fewer than one step of 128: the batch shrinks to {n}" in r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["epochs"] == 3


@pytest.mark.parametrize(
    ("n", "batch", "accum", "world", "expected"),
    [(1000, 128, 1, 1, 128), (20, 128, 1, 1, 20), (20, 128, 1, 2, 10), (21, 16, 2, 2, 5), (256, 128, 1, 2, 128)],
)
def test_the_batch_shrinks_per_process(n, batch, accum, world, expected) -> None:
    fitted, why = fit_batch(n, batch, accum_steps=accum, world_size=world)
    assert fitted == expected
    assert fitted * accum * world <= n
    if expected == batch:
        assert why is None
    else:
        assert f"has {n} images" in why and f"shrinks to {expected}" in why
        assert ("per process" in why) == (world > 1)
    with pytest.raises(vitlab.VitlabError, match="fewer than one per micro-batch"):
        fit_batch(3, batch, accum_steps=2, world_size=2)


def test_a_class_with_one_image_stays_in_training_and_the_split_says_so(tmp_path, capsys) -> None:
    data = image_folder(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8, "lonely": 1})
    splits = build_dataset(f"folder:{data}", img_size=(8, 8), in_chans=1)
    lonely = splits.class_names.index("lonely")
    assert (splits.train.labels == lonely).sum() == 1
    assert (splits.val.labels == lonely).sum() == 0 and (splits.test.labels == lonely).sum() == 0
    assert "class 'lonely' has 1 image: 1 train, none in val or test" in splits.notes
    from vitlab.train import TrainConfig, train

    cfg = TrainConfig(
        model="vit_tiny_patch7_28",
        model_args=json.loads(TINY),
        data=f"folder:{data}",
        max_steps=2,
        precision="fp32",
        num_workers=0,
        threads=1,
        out=str(tmp_path / "run"),
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and len(summary["per_class_accuracy"]) == 4
    assert "class 'lonely' has 1 image" in capsys.readouterr().out


def test_held_out_splits_of_a_folder_are_stratified_by_class(tmp_path) -> None:
    counts = {"a": 40, "b": 20, "c": 10, "d": 3}
    data = image_folder(tmp_path / "imgs", counts)
    splits = build_dataset(f"folder:{data}", img_size=(8, 8), in_chans=1, val_fraction=0.2)
    total = sum(counts.values())
    for split in (splits.val, splits.test):
        per_class = torch.bincount(split.labels, minlength=4).tolist()
        share = len(split) / total
        for n_c, got in zip(counts.values(), per_class):  # each class in proportion, to one image
            assert abs(got - n_c * share) < 1, (per_class, share)
    assert len(splits.train) + len(splits.val) + len(splits.test) == total
    # 3 images: one in test (a share of 0.6), and of the 2 left none in val (0.5, which loses to larger remainders)
    assert [n.split(":")[0] for n in splits.notes] == ["class 'd' has no image in val (3 images"]
    # the same with a train/ folder and no val/: val carved, stratified; no test split
    image_folder(tmp_path / "tv" / "train", counts)
    carved = build_dataset(f"folder:{tmp_path / 'tv'}", img_size=(8, 8), in_chans=1, val_fraction=0.2)
    assert carved.test is None
    assert torch.bincount(carved.val.labels, minlength=4).tolist() == [8, 4, 2, 1]


def test_stratified_split_keeps_the_last_image_of_every_class() -> None:
    labels = torch.tensor([0] * 9 + [1] * 2 + [2])
    kept, held = stratified_split(labels, 0.3, seed=1)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(12))
    assert set(labels[kept].tolist()) == {0, 1, 2}
    assert len(held) == round(0.3 * 12) and (labels[held] == 2).sum() == 0


# --- class subsets (open-set experiments) ----------------------------------------------------------------------
def test_parse_classes() -> None:
    from vitlab.data import parse_classes

    names = ["cat", "dog", "eel", "fox", "3"]
    assert parse_classes("0-2", names) == [0, 1, 2]
    assert parse_classes("fox, 0-1,cat", names) == [0, 1, 3]
    assert parse_classes("3", names) == [4]  # a class name wins over an index
    assert parse_classes(2, names) == [2] and parse_classes([0, "eel"], names) == [0, 2]
    with pytest.raises(vitlab.VitlabError, match=r"out of range: the data has classes 0-4"):
        parse_classes("2-7", names)
    with pytest.raises(vitlab.VitlabError, match=r"neither a class name.*Did you mean: dog"):
        parse_classes("dgo", names)


def test_subset_classes_relabels_and_excludes() -> None:
    from vitlab.data import subset_classes

    full = build_dataset("digits")
    known = subset_classes(full, "0-5")
    unknown = subset_classes(full, "0-5", exclude=True)
    assert known.class_names == list("012345") and unknown.class_names == list("6789")
    for split in ("train", "val", "test"):
        whole, k, u = getattr(full, split), getattr(known, split), getattr(unknown, split)
        assert len(k) + len(u) == len(whole)
        assert torch.equal(torch.bincount(k.labels), torch.bincount(whole.labels)[:6])
        assert torch.equal(torch.bincount(u.labels), torch.bincount(whole.labels)[6:])
        # the same images, in the same order, with labels shifted down by 6
        late = whole.labels >= 6
        assert torch.equal(u.images, whole.images[late]) and torch.equal(u.labels + 6, whole.labels[late])
    assert (known.mean, known.std) == (full.mean, full.std)


def test_subset_of_a_folder_by_names(tmp_path) -> None:
    from vitlab.data import subset_classes

    data = image_folder(tmp_path / "imgs", {"cat": 10, "dog": 10, "eel": 10})
    sub = subset_classes(build_dataset(f"folder:{data}", img_size=(8, 8), in_chans=1), "eel,dog")
    assert sub.class_names == ["dog", "eel"] and sub.num_classes == 2
    for split in (sub.train, sub.val, sub.test):
        assert all(f"/{sub.class_names[y]}/" in path for path, y in split.samples)
        assert set(split.labels.tolist()) <= {0, 1}


def test_cli_classes_trains_and_evaluates_on_the_subset(tmp_path) -> None:
    run = tmp_path / "run"
    r = train_cli("--data", "digits", "--classes", "0-5", "--max-steps", 2, "--out", run)
    assert r.exit_code == 0, r.output
    assert "training on 6 classes (0, 1, 2, 3, 4, 5), as labels 0 to 5 in this order" in r.output
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["per_class_accuracy"]) == list("012345")
    assert json.loads((run / "checkpoints" / "best" / "config.json").read_text())["num_classes"] == 6
    r = CliRunner().invoke(cli, ["eval", str(run / "checkpoints" / "best"), "--data", "digits", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    test_images = int((build_dataset("digits").test.labels < 6).sum())
    assert summary["test_count"] == test_images and f"on {test_images} images" in r.output


def test_limit_images_draws_by_class_and_keeps_val() -> None:
    from vitlab.data import limit_images

    full = build_dataset("digits")
    small = limit_images(full, train=200, seed=3)
    assert len(small.train) == 200 and small.val is full.val and small.test is full.test
    share = 200 / len(full.train)
    for n_c, got in zip(torch.bincount(full.train.labels).tolist(), torch.bincount(small.train.labels).tolist()):
        assert abs(got - n_c * share) < 1
    rows = {tuple(x.flatten().tolist()) for x in full.train.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in small.train.images)  # images of the training split
    with pytest.raises(vitlab.VitlabError, match="train_images must be between 1 and the 1437"):
        limit_images(full, train=5000)
    few = limit_images(full, test=90, seed=3)  # a test subset: by class too, the training split untouched
    assert len(few.test) == 90 and few.train is full.train and few.val is full.val
    assert torch.bincount(few.test.labels, minlength=10).tolist() == [9] * 10
    assert torch.equal(limit_images(full, test=90, seed=3).test.labels, few.test.labels)  # the same images again
    with pytest.raises(vitlab.VitlabError, match="test_images must be between 1 and the 180"):
        limit_images(full, test=0)
