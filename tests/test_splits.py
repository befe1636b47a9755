"""Splits that never leak: a run records what it held out (RUN/split.json), `vitlab eval` and `vitlab clip eval`
score exactly those images in the run's precision, changed data is refused, and a run without a validation split
selects nothing (best = last) and never reports a score of an empty split."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from vitlab.cli import cli
from vitlab.data.manifest import SplitOptions, build_run_splits, split_manifest
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, train
from vitlab.train.precision import resolve_precision

# the precision that `auto` does not resolve to on this CPU
NOT_AUTO = {"bf16": "fp32", "fp32": "bf16"}[resolve_precision("auto", "cpu")[0]]
MODEL_ARGS = {"img_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 4, "in_chans": 3}


def image_folder(root: Path, *, classes: int = 3, per_class: int = 40, bad: str | None = "c0/000.png") -> Path:
    """``root/c<k>/<i>.png``: 8x8 RGB noise around a class's own grey level, with one unreadable ``bad`` file."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i:03d}.png")
    if bad:
        (root / bad).write_bytes(b"not a png: garbage bytes")
    return root


def folder_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    args = dict(
        model="vit_tiny_patch4_28",
        model_args=MODEL_ARGS,
        data=f"folder:{data}",
        skip_bad_images=True,
        max_steps=4,
        batch_size=16,
        lr=2e-3,
        precision=NOT_AUTO,  # eval must score in the run's precision, not resolve `auto` for its CPU
        num_workers=0,
        threads=1,
        out=str(out),
    )
    return TrainConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run on a folder with one unreadable image, trained with skip_bad_images; the paths it trained on."""
    root = tmp_path_factory.mktemp("splits")
    data, run = image_folder(root / "data"), root / "run"
    trained_on: set[str] = set()

    def record_train_members(model, splits, record):
        trained_on.update(splits.train.members())

    train(folder_cfg(data, run), on_eval=record_train_members)
    return data, run, trained_on


def relative(paths, root: Path) -> set[str]:
    return {os.path.relpath(p, root) for p in paths}


def test_eval_scores_the_runs_own_test_images_in_its_precision(folder_run, monkeypatch) -> None:
    data, run, trained_on = folder_run
    summary = json.loads((run / "summary.json").read_text())
    evaluate_module = importlib.import_module("vitlab.train.evaluate")  # vitlab.train.evaluate is also a function
    scored: list[str] = []
    evaluate = evaluate_module.evaluate

    def spy(model, dataset, **kw):
        scored.extend(dataset.members())
        return evaluate(model, dataset, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    r = CliRunner().invoke(cli, ["eval", str(run / "checkpoints" / "best")])  # no --data: the run's own
    assert r.exit_code == 0, r.output
    assert f"the run's {summary['test_count']} held-out images" in r.output
    assert f"precision {NOT_AUTO} (the run's" in r.output
    result = json.loads((run / "checkpoints" / "best" / "eval-test" / "confusion_matrix.json").read_text())
    assert (result["accuracy"], result["count"]) == (summary["test_accuracy"], summary["test_count"])
    # image for image: the manifest's test members, none of them trained on, the unreadable file nowhere
    manifest = json.loads((run / "split.json").read_text())
    assert relative(scored, data) == set(manifest["test"]["members"]) and len(scored) == summary["test_count"]
    assert not set(scored) & trained_on
    assert manifest["skipped"] == ["c0/000.png"] and "c0/000.png" not in relative(scored, data)
    # the validation split too: the best checkpoint scores what selected it
    r = CliRunner().invoke(cli, ["eval", str(run / "checkpoints" / "best"), "--split", "val"])
    assert r.exit_code == 0, r.output
    result = json.loads((run / "checkpoints" / "best" / "eval-val" / "confusion_matrix.json").read_text())
    assert (result["accuracy"], result["count"]) == (summary["best_val_accuracy"], manifest["val"]["count"])


def test_the_manifest_records_what_the_run_held_out(folder_run) -> None:
    data, run, trained_on = folder_run
    manifest = json.loads((run / "split.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert manifest["data"] == f"folder:{data}" and manifest["options"]["skip_bad_images"] is True
    assert manifest["train"]["count"] == summary["train_images"] == len(trained_on)
    val, test, train_ = set(manifest["val"]["members"]), set(manifest["test"]["members"]), relative(trained_on, data)
    assert not (val & test or val & train_ or test & train_)
    readable = {str(p.relative_to(data)) for p in data.rglob("*.png")} - {"c0/000.png"}
    assert val | test | train_ == readable
    names = manifest["class_names"]
    assert manifest["test"]["labels"] == [names.index(m.split("/")[0]) for m in manifest["test"]["members"]]


def test_changed_data_is_refused_in_one_line_or_evaluated_on_request(folder_run, tmp_path) -> None:
    data, run, _ = folder_run
    best = str(run / "checkpoints" / "best")
    extra = data / "c1" / "new.png"
    shutil.copy(data / "c1" / "001.png", extra)
    try:
        r = CliRunner().invoke(cli, ["eval", best])
        assert r.exit_code == 2 and "the data changed since the run split it" in r.output, r.output
        assert "--allow-changed-data" in r.output and len(r.output.strip().splitlines()) == 1
        r = CliRunner().invoke(cli, ["eval", best, "--allow-changed-data"])
        assert r.exit_code == 0 and "were not held out by the run" in r.output, r.output
    finally:
        extra.unlink()
    # the same files elsewhere are the run's data: checked against its manifest, not refused
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    r = CliRunner().invoke(cli, ["eval", best, "--data", f"folder:{moved}"])
    assert r.exit_code == 0 and "the run's 12 held-out images" in r.output, r.output


def test_the_manifest_captures_classes_split_sizes_and_seed(tmp_path) -> None:
    data = image_folder(tmp_path / "data")
    spec = f"folder:{data}"
    options = SplitOptions(val_fraction=0.2, skip_bad_images=True, classes="c0,c2", train_images=20, test_images=6)
    splits = build_run_splits(spec, options, img_size=(8, 8))
    m = split_manifest(splits, data=spec, options=options)
    assert m["class_names"] == ["c0", "c2"] and m["train"]["count"] == 20 and m["test"]["count"] == 6
    assert {x.split("/")[0] for x in m["val"]["members"] + m["test"]["members"]} == {"c0", "c2"}
    assert m["options"]["classes"] == "c0,c2"
    # another seed draws another validation split from the same data; the whole test split stays
    whole = [dataclasses.replace(options, seed=seed, test_images=None) for seed in (0, 1)]
    a, b = (split_manifest(build_run_splits(spec, o, img_size=(8, 8)), data=spec, options=o) for o in whole)
    assert a["data_hash"] == b["data_hash"] == m["data_hash"] and a["test"] == b["test"] and a["val"] != b["val"]
    # without skipping, the unreadable file is part of the data as found: the fingerprint is the same
    unskipped = build_run_splits(spec, SplitOptions(val_fraction=0.2), img_size=(8, 8))
    assert unskipped.data_hash == splits.data_hash
    # in-memory data: members are image digests, the fingerprint the arrays'
    digits = split_manifest(build_run_splits("digits", SplitOptions()), data="digits", options=SplitOptions())
    assert digits["test"]["count"] == len(digits["test"]["members"]) == 180 and len(digits["data_hash"]) == 64


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path) -> None:
    data = image_folder(tmp_path / "data")
    cfg = folder_cfg(data, tmp_path / "run", max_steps=2, precision="fp32")
    train(cfg)
    (data / "c2" / "000.png").unlink()  # one image less: the split is another one
    with pytest.raises(VitlabError, match="the data changed since the run started"):
        train(folder_cfg(data, tmp_path / "run", max_steps=2, precision="fp32"), resume=True)


# --- no validation split -------------------------------------------------------------------------------------------
def test_no_validation_split_keeps_the_last_model_and_scores_no_empty_split(tmp_path) -> None:
    """digits with val_fraction=0 has neither a validation nor a test split: nothing selects, nothing is tested."""
    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "vit_tiny_patch7_28", "--precision", "fp32", "--out", str(run),
            "--max-steps", "4", "--batch-size", "32", "--set", "val_fraction=0", "--set", "eval_every=2",
            "--set", "model_args={depth: 1, embed_dim: 32, num_heads: 2}", "--set", "threads=1"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "no validation split (val_fraction=0" in r.output
    assert "no held-out data: no test accuracy" in r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["test_count"] == 0 and summary["best_val_accuracy"] is None
    assert summary["best_step"] == summary["steps"] == 4
    best, last = (load_file(run / "checkpoints" / d / "model.safetensors") for d in ("best", "last"))
    assert all(torch.equal(best[k], last[k]) for k in last)
    assert [m["val_acc"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [None, None]
    r = CliRunner().invoke(cli, ["eval", str(run / "checkpoints" / "best")])
    assert r.exit_code == 2 and "has no test split (val_fraction=0" in r.output, r.output


def test_no_validation_split_still_tests_on_a_test_folder(tmp_path) -> None:
    image_folder(tmp_path / "data" / "train", bad=None)
    image_folder(tmp_path / "data" / "test", per_class=4, bad=None)
    summary = train(folder_cfg(tmp_path / "data", tmp_path / "run", val_fraction=0.0, eval_every=2))
    assert summary["test_split"] == "test" and summary["test_count"] == 12 and summary["best_step"] == 4
    assert 0 <= summary["test_accuracy"] <= 1 and summary["best_val_accuracy"] is None


def test_clip_without_a_validation_split_trains_and_reports(tmp_path) -> None:
    run = tmp_path / "run"
    args = ["clip", "train", "--image-model", "vit_tiny_patch4_28", "--text-model", "text_transformer_tiny",
            "--data", "captions:digits", "--embed-dim", "16", "--batch-size", "32", "--precision", "fp32",
            "--max-steps", "2", "--out", str(run), "--set", "val_fraction=0", "--set", "threads=1",
            "--set", f"model_args={json.dumps({k: v for k, v in MODEL_ARGS.items() if k != 'in_chans'})}",
            "--set", "clip_args={text_args: {width: 32, depth: 1, num_heads: 2, context_length: 16}}"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "no held-out data: no retrieval or zero-shot scores" in r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["steps"] == 2


def test_clip_eval_scores_the_runs_own_held_out_images(tmp_path) -> None:
    image_folder(tmp_path / "img", classes=1, per_class=30, bad="c0/bad.png")
    rows = [f"img/c0/{i:03d}.png,picture number {i}" for i in range(30)] + ["img/c0/bad.png,an unreadable image"]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = ["clip", "train", "--image-model", "vit_tiny_patch4_28", "--text-model", "text_transformer_tiny",
            "--data", f"captions:{tmp_path / 'pairs.csv'}", "--embed-dim", "16", "--batch-size", "8",
            "--precision", "fp32", "--max-steps", "2", "--skip-bad-images", "--out", str(run), "--set", "threads=1",
            "--set", f"model_args={json.dumps(MODEL_ARGS)}",
            "--set", "clip_args={text_args: {width: 32, depth: 1, num_heads: 2, context_length: 16}}"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    r = CliRunner().invoke(cli, ["clip", "eval", str(run / "checkpoints" / "best"), "--json"])  # no --data
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["count"] == summary["test_count"] == 3 and "the run's 3 held-out images" in result["checked"]
    assert result["retrieval"]["image_to_text"]["1"] == summary["image_to_text_recall@1"]
