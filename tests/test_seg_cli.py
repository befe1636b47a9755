"""`vitlab seg train / eval / predict` end to end on tiny scenes, and segmentation folders (segfolder:DIR): the
round trip with `vitlab data scenes`, and bad masks as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.data.scenes import generate_scenes, write_scene_folder

TINY = "model_args={img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2, features: 16, label_dim: 16}"
HELD_OUT = TINY[:-1] + ", unseen: [five]}"  # a zero-shot fold: class "five" is never trained on
SCENES = "scenes:digits?count=40&size=32"


def seg_train(out: Path, *extra: str, model_args: str = TINY) -> list[str]:
    return ["seg", "train", "--data", SCENES, "--set", model_args, "--epochs", "2", "--batch-size", "16", "--precision",
            "fp32", "--set", "num_workers=0", "--set", "threads=1", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def language_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    r = CliRunner().invoke(cli, seg_train(out, model_args=HELD_OUT))
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and "pixel accuracy" in r.output
    return out


def test_train_eval_writes_metrics(language_run: Path) -> None:
    summary = json.loads((language_run / "summary.json").read_text())
    assert summary["test_accuracy"] == summary["miou"]  # mIoU is what selects and what the report scores
    r = CliRunner().invoke(cli, ["seg", "eval", str(language_run / "checkpoints" / "best")])
    assert r.exit_code == 0, r.output
    written = json.loads((language_run / "checkpoints" / "best" / "eval-test" / "seg_metrics.json").read_text())
    assert {"miou", "pixel_accuracy", "iou", "labels", "count"} <= set(written)
    assert 0 <= written["miou"] <= 1 and 0 <= written["pixel_accuracy"] <= 1
    assert written["miou"] == pytest.approx(summary["miou"])  # the run's own test split, scored again
    assert len(written["iou"]) == 12  # ten digits and three backgrounds, less the held-out one (its fold below)
    assert f"{written['miou']:.4f}" in r.output


def test_held_out_class_is_never_trained_and_scored_as_a_fold(language_run: Path) -> None:
    """model_args.unseen: the class leaves the training label set and its pixels are unlabelled; eval scores it in
    ['others', class] episodes (FB-IoU) by default."""
    from vitlab.data.segmentation import IGNORE
    from vitlab.train import TrainConfig
    from vitlab.train.segmentation import SegmentationTask

    config = json.loads((language_run / "checkpoints" / "best" / "config.json").read_text())
    assert "five" not in config["class_names"] and len(config["class_names"]) == 12
    cfg = TrainConfig.from_dict(config["train_config"])
    splits = build_dataset(cfg.data)
    task = SegmentationTask(cfg, splits)
    five = splits.class_names.index("five")
    assert int((splits.train.masks == five).sum()) > 0
    assert int((task.masks == IGNORE).sum()) == int((splits.train.masks == five).sum())
    assert int(task.masks.max()) == 11
    written = json.loads((language_run / "checkpoints" / "best" / "eval-test" / "seg_metrics.json").read_text())
    assert written["fold"] == ["five"] and 0 <= written["fb_iou"] <= 1 and 0 <= written["fold_miou"] <= 1


def test_eval_with_other_label_names(language_run: Path) -> None:
    """The language head embeds whatever names it is given: new names give other scores, a wrong count is refused."""
    best = str(language_run / "checkpoints" / "best")
    names = ",".join(["digit zero", *"1 2 3 4 6 7 8 9".split(), "bricks", "lawn", "pebbles"])  # 'five' held out
    r = CliRunner().invoke(cli, ["seg", "eval", best, "--labels", names, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labels"][0] == "digit zero"
    r = CliRunner().invoke(cli, ["seg", "eval", best, "--labels", "a,b"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "2 names" in r.output


def test_predict_draws_mask_and_legend(language_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    scenes = generate_scenes(count=1, size=32, source="digits")
    Image.fromarray(scenes.images[0]).save(image)
    out = tmp_path / "pred.png"
    r = CliRunner().invoke(cli, ["seg", "predict", str(language_run / "checkpoints" / "best"), str(image),
                                 "--labels", "sneaker,bag,grass,other", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in ("sneaker", "bag", "grass", "other"))
    picture = Image.open(out)
    assert picture.width > 1.5 * picture.height > 0  # image, mask and legend side by side


def test_classifier_head_trains_and_keeps_its_classes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, seg_train(out, "--head", "classifier", "--max-steps", "2"))
    assert r.exit_code == 0, r.output
    assert "classifier head" in r.output
    best = str(out / "checkpoints" / "best")
    assert CliRunner().invoke(cli, ["seg", "eval", best]).exit_code == 0
    r = CliRunner().invoke(cli, ["seg", "eval", best, "--labels", ",".join(f"c{i}" for i in range(13))])
    assert r.exit_code == 2 and "--head language" in r.output


# --- segmentation folders ------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    scenes = generate_scenes(count=12, size=32, source="digits")
    write_scene_folder(scenes, tmp_path / "scenes")
    return tmp_path / "scenes", scenes


def test_segfolder_round_trip(folder) -> None:
    """What `vitlab data scenes` writes reads back as the scenes' own pixels and label maps."""
    root, scenes = folder
    splits = build_dataset(f"segfolder:{root}", val_fraction=0.2)
    assert splits.class_names == scenes.label_names
    got = {}
    for part in (splits.train, splits.val, splits.test):
        for image, mask in zip(part.images, part.masks):
            got[image.numpy().tobytes()] = mask
    assert len(got) == len(scenes) == sum(len(p) for p in (splits.train, splits.val, splits.test))
    for image, label_map in zip(scenes.images, scenes.label_maps()):
        mask = got[torch.from_numpy(image).permute(2, 0, 1).numpy().tobytes()]
        assert torch.equal(mask, torch.from_numpy(label_map).long())


def test_segfolder_unlabelled_pixels_are_ignored(folder) -> None:
    root, _ = folder
    path = sorted((root / "masks").glob("*.png"))[0]
    mask = Image.open(path)
    values = np.array(mask)
    values[:4] = 255  # PASCAL VOC's mark of an unlabelled pixel
    fixed = Image.frombytes("P", (32, 32), values.tobytes())
    palette = mask.getpalette()
    fixed.putpalette(palette + [255] * (768 - len(palette)))  # index 255 has a colour, so PNG keeps it as is
    fixed.save(path)
    splits = build_dataset(f"segfolder:{root}", val_fraction=0.0)
    assert (splits.train.masks[0, :4] == -1).all() and (splits.train.masks[0, 4:] >= 0).all()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("corrupt", "cannot be read"),
        ("value", "holds value 40"),
        ("size", "is 16x16 but its image is 32x32"),
        ("rgb", "is a RGB image"),
        ("missing", "have no mask"),
        ("labels", "labels.txt is missing"),
    ],
)
def test_bad_masks_are_one_line_errors(folder, tmp_path: Path, fault: str, message: str) -> None:
    root, _ = folder
    path = sorted((root / "masks").glob("*.png"))[3]
    if fault == "corrupt":
        path.write_bytes(path.read_bytes()[:40])
    elif fault == "value":
        Image.fromarray(np.full((32, 32), 40, dtype=np.uint8), mode="L").save(path)
    elif fault == "size":
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L").save(path)
    elif fault == "rgb":
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    elif fault == "missing":
        path.unlink()
    else:
        (root / "labels.txt").unlink()
    r = CliRunner().invoke(cli, ["seg", "train", "--data", f"segfolder:{root}", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert message in r.output
