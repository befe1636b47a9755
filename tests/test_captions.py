"""Caption sets as inputs: the data-fitted defaults describe them (a CLIP run without --image-model gets an image
tower), a training subset (train_images) draws from them, and data.captions never imports data.sources."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

import vitlab.data.captions
from vitlab.cli import cli
from vitlab.data import build_dataset, limit_images
from vitlab.data.sources import describe_dataset
from vitlab.train.defaults import apply_data_defaults, choose_default


def caption_csv(folder: Path, n: int = 20, side: int = 12) -> Path:
    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for i in range(n):
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a picture of thing {i % 5}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_defaults_describe_a_caption_set_and_choose_only_an_image_tower(tmp_path: Path) -> None:
    spec = f"captions:{caption_csv(tmp_path)}"
    facts = describe_dataset(spec)
    assert facts == {"train_images": 16, "num_classes": 0, "img_size": (12, 12), "in_chans": 3}
    digits = describe_dataset("captions:digits")  # two of ten classes unseen by default
    assert digits["img_size"] == (8, 8) and digits["train_images"] == round(
        describe_dataset("digits")["train_images"] * 0.8
    )

    values = {"data": spec, "text_model": "text_transformer_tiny", "model": "auto", "epochs": 10}
    out, said = apply_data_defaults(values, {"data", "text_model"})
    row = choose_default(facts)
    assert (out["model"], out["model_args"]["in_chans"]) == (row.model, 3) and "image tower" in said
    assert all(out.get(k) == values.get(k) for k in row.settings)  # the schedule stays the recipe's
    classification, _ = apply_data_defaults({"data": "digits", "model": "auto"}, {"data"})
    assert all(classification[k] == v for k, v in choose_default(describe_dataset("digits")).settings.items())


def test_train_images_limits_a_caption_set(tmp_path: Path) -> None:
    s = build_dataset(f"captions:{caption_csv(tmp_path)}", img_size=(8, 8))
    small = limit_images(s, train=6, seed=0)
    assert len(small.train) == 6 and small.train.labels.tolist() == list(range(6))
    assert all(caps in s.train.captions for caps in small.train.captions)
    images, indices = next(iter(small.train.loader(6, shuffle=False)))
    assert images.shape == (6, 3, 8, 8) and indices.tolist() == list(range(6))
    digits = build_dataset("captions:digits")
    few = limit_images(digits, train=80, seed=0)
    counts = few.train.classes.bincount(minlength=10)
    assert len(few.train) == 80 and counts[[1, 8]].sum() == 0 and (counts[[0, 2, 3, 4, 5, 6, 7, 9]] == 10).all()


def test_clip_train_without_an_image_model_on_a_caption_file(tmp_path: Path) -> None:
    csv = caption_csv(tmp_path)
    text_args = {"width": 16, "depth": 1, "num_heads": 2, "context_length": 16}
    args = ["clip", "train", "--text-model", "text_transformer_tiny", "--data", f"captions:{csv}", "--embed-dim", "8",
            "--batch-size", "4", "--max-steps", "2", "--precision", "fp32", "--out", str(tmp_path / "run"),
            "--set", f"clip_args={json.dumps({'text_args': text_args})}", "--set", "threads=1",
            "--set", "train_images=8", "--set", "num_workers=0"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "image tower" in r.output and "(8 training images)" in r.output


def test_captions_does_not_import_sources() -> None:
    tree = ast.parse(Path(vitlab.data.captions.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "vitlab.data.sources" not in imported and "vitlab.data.builtin" in imported
