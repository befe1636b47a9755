"""Training runs on digits with a tiny ViT: outputs, exact resume after SIGKILL, DDP equivalence, clear failures."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import vitlab
from vitlab.cli import cli
from vitlab.train import TrainConfig, train
from vitlab.train.optim import lr_at, param_groups
from vitlab.train.trainer import TIMING_KEYS, seed_everything

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    args = dict(
        model="vit_tiny_patch7_28",
        model_args=TINY,
        data="digits",
        epochs=2,
        batch_size=64,
        lr=2e-3,
        out=str(out),
        precision="fp32",
        threads=1,
    )
    return TrainConfig(**{**args, **kw})


def cli_args(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        "digits",
        "--model",
        "vit_tiny_patch7_28",
        "--set",
        f"model_args={json.dumps(TINY)}",
        "--precision",
        "fp32",
        "--set",
        "threads=1",
        "--out",
        str(out),
        *extra,
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def metrics(run: Path, *, drop_timing: bool = True) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not (drop_timing and k in TIMING_KEYS)} for m in lines]


def test_a_run_writes_everything(tmp_path) -> None:
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, epochs=3, batch_size=16, lr=3e-3, ema_decay=0.9))
    for f in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json"):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    for key in ("test_accuracy", "best_val_accuracy", "epochs", "train_time_s", "images_per_s", "params"):
        assert key in s
    assert s == json.loads(json.dumps(summary))
    assert 0.0 <= s["test_accuracy"] <= 1.0 and s["epochs"] == 3 and s["params"] > 0
    assert s["test_accuracy"] > 0.15  # above chance (0.1); a ViT starts slowly on 1,437 8x8 digits
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == [1.0, 2.0, 3.0]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    best = vitlab.from_pretrained(run / "checkpoints" / "best")
    assert best.pretrained_cfg["class_names"] == [str(i) for i in range(10)]
    assert len(best.pretrained_cfg["mean"]) == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["ema_decay"] == 0.9


def test_resume_after_sigkill_is_exact(tmp_path) -> None:
    """Kill a run mid-way with SIGKILL, resume it, and compare with a run that never stopped."""
    extra = ("--epochs", "6", "--batch-size", "32", "--set", "checkpoint_every=3", "--set", "eval_every=7")
    full, killed = tmp_path / "full", tmp_path / "killed"
    runner = CliRunner()
    assert runner.invoke(cli, cli_args(full, *extra)).exit_code == 0

    cmd = [sys.executable, "-m", "vitlab", *cli_args(killed, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoints" / "last" / "config.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(state.read_text()).get("step", 0) >= 40:
                break
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-swap
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    r = runner.invoke(cli, ["train", "--resume", "--out", str(killed)])
    assert r.exit_code == 0, r.output
    stopped_at = int(re.search(rf"resumed {re.escape(str(killed))} at step (\d+)", r.output).group(1))
    assert 40 <= stopped_at < 264
    assert metrics(killed) == metrics(full)
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_match_one_process(tmp_path) -> None:
    """2 gloo processes with batch 16 each take the same steps as 1 process with batch 32."""
    common = ("--max-steps", "4", "--set", "warmup_epochs=0", "--lr", "1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    assert CliRunner().invoke(cli, cli_args(one, "--batch-size", "32", *common)).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "vitlab",
        *cli_args(two, "--batch-size", "16", *common),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    seed_everything(0)  # the trainer's initialisation: the 4 steps moved every trainable weight away from it
    init = vitlab.create_model("vit_tiny_patch7_28", num_classes=10, **TINY).state_dict()
    assert all(not torch.equal(a[k], init[k]) for k in ("blocks.0.attn.qkv.weight", "head.weight", "pos_embed"))


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    train(tiny_cfg(a, batch_size=32, max_steps=3, warmup_epochs=0))
    train(tiny_cfg(b, batch_size=16, accum_steps=2, max_steps=3, warmup_epochs=0))
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    with pytest.raises(vitlab.VitlabError, match=r"the loss became (nan|inf).*last good checkpoint is kept") as e:
        train(tiny_cfg(run, lr=1e30, clip_grad=None, warmup_epochs=0, checkpoint_every=1))
    assert "\n" not in str(e.value)
    good = json.loads((run / "checkpoints" / "last" / "config.json").read_text())["step"]
    assert good >= 1
    model = vitlab.from_pretrained(run / "checkpoints" / "last")
    assert model.num_classes == 10


def test_same_seed_same_run_and_refuses_to_overwrite(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_cfg(a, max_steps=5, drop_path_rate=0.1, hflip=True))
    train(tiny_cfg(b, max_steps=5, drop_path_rate=0.1, hflip=True))
    assert metrics(a) == metrics(b)
    with pytest.raises(vitlab.VitlabError, match=r"already holds a run; add --resume"):
        train(tiny_cfg(a, max_steps=5))


def test_augmentation_and_mixing_run(tmp_path) -> None:
    cfg = tiny_cfg(
        tmp_path / "run",
        max_steps=4,
        random_resized_crop=0.5,
        randaugment=[2, 9],
        random_erasing=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        precision="bf16",
    )
    s = train(cfg)
    assert s["steps"] == 4
    assert metrics(tmp_path / "run")[-1]["train_acc"] is None  # no accuracy against mixed targets


def test_weight_decay_groups_and_schedule() -> None:
    model = vitlab.create_model("vit_tiny_patch7_28", **TINY)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= no
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if n not in no}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.001
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))


def test_cli_train_eval_predict(tmp_path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(cli, cli_args(run, "--epochs", "1"))
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and str(run) in r.output
    r = runner.invoke(cli, ["eval", str(run / "checkpoints" / "best"), "--data", "digits"])
    assert r.exit_code == 0, r.output
    assert "digits test: accuracy" in r.output
    cm = json.loads((run / "checkpoints" / "best" / "eval-test" / "confusion_matrix.json").read_text())
    assert sum(map(sum, cm["confusion"])) == cm["count"] == 180
    assert (run / "checkpoints" / "best" / "eval-test" / "confusion_matrix.png").exists()

    from PIL import Image

    Image.new("L", (40, 30), 128).save(tmp_path / "a.png")
    Image.new("RGB", (28, 28), (0, 255, 0)).save(tmp_path / "b.jpg")
    r = runner.invoke(
        cli,
        [
            "predict",
            str(run / "checkpoints" / "best"),
            str(tmp_path / "a.png"),
            str(tmp_path / "b.jpg"),
            "--json",
            "--top-k",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [len(o["top"]) for o in out] == [3, 3]
    probs = [p["probability"] for p in out[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = runner.invoke(cli, ["predict", str(run / "checkpoints" / "best"), str(tmp_path / "bad.png")])
    assert r.exit_code == 2 and "cannot read image" in r.output and "bad.png" in r.output


def test_config_file_and_flag_precedence(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_tiny_patch4_28\nepochs: 7\nlr: 0.01\n")
    cfg = TrainConfig.from_sources(recipe, lr=0.5)
    assert (cfg.model, cfg.epochs, cfg.lr) == ("vit_tiny_patch4_28", 7, 0.5)
    recipe.write_text("epoch: 3\n")
    with pytest.raises(vitlab.VitlabError, match=r"unknown training option 'epoch'\. Did you mean: epochs"):
        TrainConfig.from_sources(recipe)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vit_tiny_patch7_29"], "unknown model 'vit_tiny_patch7_29'"),
        (["--data", "fashion-mnst"], "fashion-mnist"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--resume", "--out", "/nonexistent-run"], "nothing to resume"),
    ],
)
def test_user_errors_are_one_line(args, message) -> None:
    r = CliRunner().invoke(cli, ["train", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_fallback_dataset_is_used_and_announced(tmp_path, capsys) -> None:
    s = train(tiny_cfg(tmp_path / "run", data="folder:/nonexistent/images", fallback_data="digits", max_steps=2))
    assert s["data"] == "digits"
    assert "folder:/nonexistent/images is not available here" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path) -> None:
    """--compile runs the same optimisation (inductor's fused kernels round differently, hence the tolerance)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = {"max_steps": 2, "warmup_epochs": 0, "model_args": {"depth": 1, "embed_dim": 32, "num_heads": 2}}
    train(tiny_cfg(eager, **args))
    train(tiny_cfg(compiled, compile=True, **args))
    a, b = weights(eager), weights(compiled)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


def test_resume_after_a_kill_inside_the_checkpoint_swap(tmp_path) -> None:
    """Killed between the two renames of the atomic swap, a run has only checkpoints/last.old: resume finds it."""
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=3))
    last = run / "checkpoints" / "last"
    last.rename(last.with_name("last.old"))
    summary = train(tiny_cfg(run, max_steps=3), resume=True)
    assert summary["steps"] == 3
    assert (last / "trainer_state.pt").exists() and not last.with_name("last.old").exists()
