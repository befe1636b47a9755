"""Early stopping (``patience``): the stop, its reason, an exact resume, and the defaults of a tiny folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vitlab.train import TrainConfig, train
from vitlab.train.defaults import apply_data_defaults

MODEL_ARGS = {"img_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 4, "in_chans": 3}
PATIENCE = 3


@pytest.fixture
def data(tmp_path_factory, monkeypatch) -> Path:
    """24 PNGs of 8x8 in 3 classes of a noisy colour: a folder that fits in memory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for i in range(24):
        c = i % 3
        pixels = np.eye(3)[c][None, None] * 160 + rng.normal(60, 40, (8, 8, 3))
        (root / f"c{c}").mkdir(exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def config(data: Path, out: Path) -> TrainConfig:
    # hflip and drop path draw random numbers every step: a resume must restore the generators too
    return TrainConfig.from_dict(
        dict(model="vit_tiny_patch4_28", model_args=MODEL_ARGS, data=f"folder:{data}", epochs=40, batch_size=8,
             lr=3e-3, patience=PATIENCE, val_fraction=0.25, hflip=True, drop_path_rate=0.1, precision="fp32",
             threads=1, num_workers=0, out=str(out))
    )  # fmt: skip


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("images_per_s", "time_s")} for m in lines]


def first_streak_end(accuracies: list[float], patience: int) -> int | None:
    """The index of the evaluation that ends the first run of ``patience`` evaluations without a new best."""
    best, stale = -1.0, 0
    for i, acc in enumerate(accuracies):
        best, stale = (acc, 0) if acc > best else (best, stale + 1)
        if stale == patience:
            return i
    return None


@pytest.fixture
def stopped(data, tmp_path_factory, capsys) -> tuple[Path, dict, str]:
    """An uninterrupted run, its summary and what it printed."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    summary = train(config(data, run))
    return run, summary, capsys.readouterr().out


def test_patience_stops_the_run_when_validation_stops_improving(stopped) -> None:
    run, summary, printed = stopped
    records = metrics(run)
    accuracies = [m["val_acc"] for m in records]
    assert summary["steps"] < 40 and records[-1]["step"] == summary["steps"]  # 1 step per epoch, 40 planned
    assert first_streak_end(accuracies, PATIENCE) == len(records) - 1  # the first streak stops it, not a later one
    assert summary["stop_reason"].startswith(f"validation accuracy has not improved for {PATIENCE} evaluations")
    assert f"stopped early: {summary['stop_reason']}" in printed
    assert yaml.safe_load((run / "config.yaml").read_text())["patience"] == PATIENCE


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(stopped, data, tmp_path) -> None:
    whole, summary, _ = stopped
    stop = summary["steps"]
    assert stop >= PATIENCE + 1  # the first evaluation always improves on nothing

    class Interrupted(Exception):
        pass

    def interrupt(model, splits, record):
        if record["step"] == stop - 1:  # the last checkpoint (stop - 2) has counted stale evaluations
            raise Interrupted

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(config(data, cut), on_eval=interrupt)
    assert torch.load(cut / "checkpoints/last/trainer_state.pt", weights_only=False)["stale"] >= 1
    resumed = train(config(data, cut), resume=True)
    assert (resumed["steps"], resumed["stop_reason"]) == (stop, summary["stop_reason"])
    assert metrics(cut) == metrics(whole)
    a, b = (load_file(r / "checkpoints/last/model.safetensors") for r in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run that stopped early and is resumed stays stopped
    again = train(config(data, cut), resume=True)
    assert again["steps"] == stop and metrics(cut) == metrics(whole)


def test_a_tiny_folder_with_no_flags_plans_seconds_and_an_early_stop(tmp_path) -> None:
    for i in range(24):  # 24 photos of 32x32 (only their headers are read)
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (80 * (i % 3), 0, 0)).save(tmp_path / f"c{i % 3}" / f"{i}.png")
    values, why = apply_data_defaults({"data": f"folder:{tmp_path}"}, {"data"})
    cfg = TrainConfig.from_dict(values)
    assert "tiny data" in why and cfg.budget_s is None and cfg.time_budget_s is None  # not minutes of a budget
    train_images = 24 - 2 * round(24 * cfg.val_fraction)
    steps_per_epoch = max(1, math.floor(train_images / cfg.batch_size))  # a batch larger than the split shrinks
    assert cfg.epochs * steps_per_epoch <= 100 and cfg.patience == 10  # at most 100 steps, stopped 10 evals after


# Rank 1 scores its own way (a task that does not reduce its accuracy over the ranks): it improves at every evaluation
RANK_1_ALWAYS_IMPROVES = """
import json, os, sys

from vitlab.train import TrainConfig, train
from vitlab.train.tasks import ClassificationTask

if os.environ["RANK"] == "1":
    real, calls = ClassificationTask.evaluate, []

    def rising(self, *args, **kwargs):
        calls.append(1)
        return {**real(self, *args, **kwargs), "accuracy": len(calls) / 1000}

    ClassificationTask.evaluate = rising
summary = train(TrainConfig.from_dict(json.loads(sys.argv[1])))
print("RESULT", json.dumps({"steps": summary["steps"], "stop_reason": summary["stop_reason"]}), flush=True)
"""


def test_every_rank_stops_at_the_same_step(data, tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(RANK_1_ALWAYS_IMPROVES)
    values = {**config(data, tmp_path / "run").to_dict(), "batch_size": 4}  # 2 x 4: the same steps as 1 x 8
    # --standalone: torchrun finds a free port itself (a port picked here could be taken before it binds it)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a rank that went on alone would wait for the other at its next collective: the timeout catches that hang
    done = subprocess.run(
        [*launch, str(script), json.dumps(values)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and all(r["stop_reason"] for r in results)  # each says its own best, rank 0 prints
    assert results[0]["steps"] == results[1]["steps"] < 40
