"""Defaults that fit the data (`model: auto`) and schedules sized to a time budget (`--budget`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vitlab
from vitlab.train import TrainConfig, train
from vitlab.train.budget import BudgetProbe, Schedule, parse_duration
from vitlab.train.config import load_yaml
from vitlab.train.defaults import DEFAULTS, apply_data_defaults, choose_default

TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2}


# --- the defaults table -----------------------------------------------------------------------------------------
def test_every_row_names_a_model_its_evidence_and_what_confirms_it() -> None:
    for row in DEFAULTS:
        vitlab.create_model(row.model, **row.model_args)  # builds
        TrainConfig.from_dict({"model": row.model, **row.settings})  # valid settings
        assert row.evidence and (row.confirm is None or row.confirm.startswith(("python benchmarks/", "a ")))
    assert DEFAULTS[-1].max_side is None and DEFAULTS[-1].max_images is None  # the last row takes anything


def test_the_demo_trains_the_full_data_rows_recipe() -> None:
    """`make demo` is the default row for Fashion-MNIST-sized data, run for 3 minutes instead of 5 (and a shorter
    warmup): the model and levers the small-data benchmark chose, in a config that loads."""
    demo = load_yaml(Path(__file__).parents[1] / "configs" / "demo.yaml")
    cfg = TrainConfig.from_dict(demo)
    row = choose_default({"img_size": (28, 28), "train_images": 54_000})
    assert cfg.model == row.model and cfg.budget_s == 180
    for key in ("label_smoothing", "ema_decay", "hflip", "batch_size", "lr", "weight_decay"):
        assert getattr(cfg, key) == row.settings[key], key


@pytest.mark.parametrize(
    ("side", "images", "row"),
    [
        (8, 1_437, 0),
        (16, 5_000, 0),
        (8, 20_000, 3),
        (28, 2_500, 2),
        (28, 54_000, 3),
        (32, 45_000, 3),
        (224, 800, 5),
        (8, 24, 0),
        (28, 24, 1),
        (32, 200, 1),
        (32, 201, 2),
        (224, 24, 4),
    ],
)
def test_the_row_follows_image_size_and_count(side, images, row) -> None:
    facts = {"img_size": (side, side), "train_images": images, "in_chans": 1, "num_classes": 10}
    assert choose_default(facts) is DEFAULTS[row]


def test_only_what_the_user_left_out_comes_from_the_table(tmp_path) -> None:
    values, why = apply_data_defaults({"data": "digits", "lr": 0.01}, {"data", "lr"})
    row = DEFAULTS[0]
    assert values["model"] == row.model and values["lr"] == 0.01 and values["epochs"] == row.settings["epochs"]
    assert values["model_args"] == row.model_args
    assert "no --model: defaults for digits (about 1,438 training images, 8x8, 1 channel)" in why
    assert row.evidence in why
    # under torchrun the row's batch is shared: the run takes the same steps as on one process
    two, why = apply_data_defaults({"data": "digits"}, {"data"}, world_size=2)
    assert two["batch_size"] * 2 == row.settings["batch_size"] and "(2 processes)" in why
    # RGB images get the row's model with three input channels; the row's budget gives way to the user's epochs
    from PIL import Image

    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (30, 30), (i * 40, c * 100, 0)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    values, why = apply_data_defaults({"data": f"folder:{tmp_path / 'imgs'}", "epochs": 2}, {"data", "epochs"})
    assert values["model"] == DEFAULTS[1].model and values["model_args"]["in_chans"] == 3
    assert "budget_s" not in values and values["epochs"] == 2
    assert "30x30, 3 channels" in why and ("provisional until" in why) == (DEFAULTS[1].confirm is not None)


def test_a_recipe_without_a_model_is_completed_and_recorded(tmp_path) -> None:
    run = tmp_path / "run"
    cfg = TrainConfig.from_sources(
        None, data="digits", epochs=1, max_steps=2, precision="fp32", threads=1, out=str(run)
    )
    assert cfg.model == "auto"
    summary = train(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert summary["model"] == saved["model"] == DEFAULTS[0].model and saved["model_args"] == DEFAULTS[0].model_args
    assert saved["epochs"] == 1 and saved["batch_size"] == DEFAULTS[0].settings["batch_size"]


# --- budgets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"), [(600, 600.0), ("600", 600.0), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0)]
)
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0", "-5m"])
def test_parse_duration_refuses_nonsense(text) -> None:
    with pytest.raises(vitlab.VitlabError, match="budget"):
        parse_duration(text)


def test_the_probe_sizes_the_schedule_from_a_fake_clock() -> None:
    probe = BudgetProbe(100.0, min_steps=2, probe_fraction=0.02)  # times at least 2 s
    clock = {1: 3.0, 2: 3.5, 3: 4.0, 4: 4.5, 5: 5.0}  # the first step is slow; then 2 steps/s
    fixed = [probe.observe(step, clock[step]) for step in range(1, 6)]
    assert fixed[:4] == [None, None, None, None]  # step 4 is the first with 2 timed steps and >= 2 s
    assert probe.rate == pytest.approx(2.0)
    assert fixed[4] == 5 + int((100.0 - 5.0) * 2.0)
    # two processes: the mean of their rates, and they stop measuring together
    other = torch.tensor([0.0, 4.0], dtype=torch.float64)  # the other process: not done yet, 4 steps/s
    probe2 = BudgetProbe(100.0, reduce=lambda t: t + other, world_size=2)
    results = [probe2.observe(step, clock[step]) for step in range(1, 6)]
    assert results[-1] == 5 + int(95.0 * 3.0) and probe2.rate == pytest.approx(3.0)


def test_the_count_is_measured_again_over_the_steps_since_the_probe() -> None:
    probe = BudgetProbe(100.0, min_steps=2, probe_fraction=0.02)
    clock = {1: 2.5, 2: 3.0, 3: 3.5, 4: 4.0, 5: 4.5}  # a slow first step, then 2 steps/s
    assert [probe.after_step(step, clock[step]) for step in range(1, 6)][-1][0] == 5 + int(95.5 * 2.0)
    # after the probe the run speeds up (caches warm): 75 steps in 25 s, 3 steps/s; the probe's slow seconds do not
    # count (averaged from the clock's start, 79 steps in 27.5 s, the rest would be sized at 2.87 steps/s)
    assert probe.refit(80, 29.5) == 80 + int(70.5 * 3.0) and probe.rate == pytest.approx(3.0)
    assert probe.refit(80, 120.0) == 80  # already past the budget: stop here
    # a warmup shorter than the probe (7 steps, one of them slow) is timed too little: the whole window counts
    short = BudgetProbe(100.0, min_steps=2, probe_fraction=0.02)
    assert [short.after_step(step, clock[step]) for step in range(1, 6)][-1][0] == 5 + int(95.5 * 2.0)
    assert short.refit(12, 5.9) == 12 + int(94.1 * 11 / 3.4)  # 11 steps in 3.4 s since the clock started
    # a checkpoint keeps where the probe fixed its count: the resumed probe refits from the same steps
    resumed = BudgetProbe(100.0)
    resumed.load_state_dict(probe.state_dict())
    assert resumed.refit(80, 29.5) == 80 + int(70.5 * 3.0)
    other = torch.tensor([3.0], dtype=torch.float64)  # a second process at 3 steps/s, this one at 1: the mean, 2
    two = BudgetProbe(100.0, reduce=lambda t: t + other, world_size=2)
    two.start = (0, 0.0)
    assert two.refit(40, 40.0) == 40 + 60 * 2


def test_a_budget_smaller_than_the_probe_ends_at_once() -> None:
    probe = BudgetProbe(1.0, min_steps=1)
    assert probe.observe(1, 0.6) is None and probe.observe(2, 1.2) == 2


def test_the_schedule_runs_at_zero_during_the_probe_and_ends_at_the_budget() -> None:
    s = Schedule(total_steps=110, warmup_steps=20, lr=1.0, min_lr=0.0, probe_steps=10)
    lrs = [s.lr_at(i) for i in range(110)]
    assert lrs[:10] == [0.0] * 10
    assert lrs[10] == pytest.approx(1 / 20) and lrs[29] == pytest.approx(1.0)
    assert lrs[-1] < 1e-3 and max(lrs) == pytest.approx(1.0)


def _budget_cfg(out, **kw) -> TrainConfig:
    args = dict(
        model="vit_tiny_patch7_28", model_args=TINY, data="digits", batch_size=64, precision="fp32", threads=1,
        budget_s=3.0, eval_every=5, out=str(out),
    )  # fmt: skip
    return TrainConfig(**{**args, **kw})


def test_a_budget_run_records_its_step_count_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    class Interrupted(Exception):
        pass

    cut = tmp_path / "cut"
    # the count measured again at the end of the warmup: a fixed one here, so that the test does not depend on the
    # machine's speed (BudgetProbe.refit itself is tested on a fake clock)
    monkeypatch.setattr("vitlab.train.budget.BudgetProbe.refit", lambda self, step, train_time: step + 40)

    def stop_after_the_warmup(model, splits, record):
        saved = yaml.safe_load((cut / "config.yaml").read_text())
        if saved.get("warmup_steps") is not None and record["step"] >= saved["probe_steps"] + saved["warmup_steps"] + 5:
            raise Interrupted  # after a checkpoint taken with the final step count
        return None

    with pytest.raises(Interrupted):
        train(_budget_cfg(cut), on_eval=stop_after_the_warmup)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    steps, probe_steps, warmup = saved["steps"], saved["probe_steps"], saved["warmup_steps"]
    assert probe_steps >= 3 and warmup > 0 and steps == probe_steps + warmup + 40
    summary = train(TrainConfig.from_dict(saved), resume=True)  # as `vitlab train --resume` reads it back
    assert summary["steps"] == steps
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    # the cosine ran to its end: the last step's rate is min_lr (1e-5) plus (lr - min_lr) (pi / 2T)^2 for a cosine
    # of T steps (T > 15 here: a few percent of the peak at most)
    assert lines[-1]["step"] == steps and 1e-5 <= lines[-1]["lr"] < 1e-5 + 0.02 * (1e-3 - 1e-5)
    # a fresh run given the recorded count takes the very same steps: nothing depended on the timing
    again = tmp_path / "again"
    train(_budget_cfg(again, steps=steps, probe_steps=probe_steps, warmup_steps=warmup))
    first = [{k: v for k, v in m.items() if k not in ("images_per_s", "time_s")} for m in lines]
    second = [
        {k: v for k, v in json.loads(x).items() if k not in ("images_per_s", "time_s")}
        for x in (again / "metrics.jsonl").read_text().splitlines()
    ]
    assert first == second
    a, b = (
        load_file(cut / "checkpoints/last/model.safetensors"),
        load_file(again / "checkpoints/last/model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
