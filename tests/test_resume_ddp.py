"""The promises a run makes when it is scaled out or stopped: collectives on the process group's device, ranks that
draw their own random numbers and agree where they must, exact resume after SIGKILL on every dataset kind, and a
resume that refuses to change the run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from test_train import TINY, cli_args, metrics, tiny_cfg, weights
from vitlab import VitlabError
from vitlab.cli import cli
from vitlab.train import TrainConfig, distributed, train, trainer
from vitlab.train.trainer import relabelling

# `vitlab` with two test hooks, set by environment variables: every process SIGKILLs itself right after step
# VITLAB_TEST_KILL_AT (the same step on every rank: no rank is left waiting), and rank VITLAB_TEST_FAST_CLOCK_RANK
# sees its clock run 50 times faster than the others'
HOOKED_VITLAB = """
import os, signal, sys, time

from vitlab.train import trainer

rank = os.environ.get("RANK", "0")
if os.environ.get("VITLAB_TEST_FAST_CLOCK_RANK") == rank:
    real, t0 = time.perf_counter, time.perf_counter()
    time.perf_counter = lambda: t0 + 50 * (real() - t0)
kill_at = int(os.environ.get("VITLAB_TEST_KILL_AT", "0"))
after_step = trainer.after_step


def after_step_then_die(loop, state, **kwargs):
    done = after_step(loop, state, **kwargs)
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return done


trainer.after_step = after_step_then_die
from vitlab.cli import cli

cli(sys.argv[1:])
"""


def hooked_vitlab(
    tmp_path: Path, *args: str, processes: int = 1, torchrun: bool = False, timeout: float = 180, **env: str
):
    """Run ``vitlab ARGS`` with the test hooks in a subprocess, under torchrun for ``processes`` > 1 (or asked)."""
    script = tmp_path / "hooked_vitlab.py"
    script.write_text(HOOKED_VITLAB)
    launch = [sys.executable, str(script)]
    if processes > 1 or torchrun:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launch += ["--master_port", str(free_port()), str(script)]
    log = tmp_path / f"vitlab-{len(list(tmp_path.glob('vitlab-*.log')))}.log"
    with log.open("w") as out:  # a file, not a pipe: a worker left behind cannot keep the test waiting for EOF
        proc = subprocess.Popen(
            [*launch, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers, a hung one included
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"vitlab {' '.join(args)} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_one_process_group(monkeypatch) -> None:
    """The environment `torchrun --nproc_per_node 1` gives its process: the trainer joins a (gloo) group of one."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_every_collective_runs_on_the_process_group_device(tmp_path, monkeypatch) -> None:
    """NCCL takes only CUDA tensors. With the group's device pretended to be another one ('meta'), every tensor the
    loop hands to a collective (training accumulators, the budget probe's vote, the evaluation's sums, the stop
    flag) must already be there."""
    join_one_process_group(monkeypatch)
    seen: list[tuple[str, torch.device]] = []

    def recorder(name: str):
        def collective(t: torch.Tensor, *args, **kwargs) -> None:
            seen.append((name, t.device))

        return collective

    monkeypatch.setattr(torch.distributed, "all_reduce", recorder("all_reduce"))
    monkeypatch.setattr(torch.distributed, "broadcast", recorder("broadcast"))
    monkeypatch.setattr(distributed, "group_device", lambda: torch.device("meta"))
    copy = torch.Tensor.copy_

    def copy_back(t: torch.Tensor, src: torch.Tensor, **kwargs) -> torch.Tensor:
        # a meta tensor holds no data: the (one-process) result is the input, already in place
        return t if src.device.type == "meta" else copy(t, src, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_back)
    summary = train(tiny_cfg(tmp_path / "run", max_steps=6, budget_s=20, eval_every=3, time_budget_s=600))
    assert summary["steps"] == 6
    assert {name for name, _ in seen} == {"all_reduce", "broadcast"}
    assert all(device.type == "meta" for _, device in seen), sorted(set(seen))


def resumed_at(output: str, run: Path) -> int:
    return int(re.search(rf"resumed {re.escape(str(run))} at step (\d+)", output).group(1))


def image_folder(root: Path, *, classes: int = 3, per_class: int = 12, size: int = 8) -> Path:
    """A folder dataset of random grayscale PNGs, one folder per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels, mode="L").save(root / f"class{c}" / f"{i}.png")
    return root


def test_sigkill_and_resume_on_a_folder_dataset_is_exact(tmp_path) -> None:
    """RandAugment, mixup/cutmix, dropout and drop path on a folder dataset; every process killed with SIGKILL after
    step 5, one random-drawing step past the checkpoint of step 4 and inside an epoch: the resumed run ends with the
    weights and metrics of a run that never stopped."""
    data = image_folder(tmp_path / "images")
    model_args = {**TINY, "img_size": 8, "drop_rate": 0.1, "proj_drop_rate": 0.1}
    args = [
        *("train", "--data", f"folder:{data}", "--model", "vit_tiny_patch4_28", "--precision", "fp32"),
        *("--epochs", "4", "--batch-size", "6", "--set", f"model_args={json.dumps(model_args)}"),
        *("--set", "drop_path_rate=0.1", "--set", "randaugment=[2, 9]", "--set", "mixup_alpha=0.8"),
        *("--set", "cutmix_alpha=1.0", "--set", "val_fraction=0.25", "--set", "num_workers=0"),
        *("--set", "threads=1", "--set", "checkpoint_every=4", "--set", "eval_every=3"),
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    runner = CliRunner()
    r = runner.invoke(cli, [*args, "--out", str(full)])
    assert r.exit_code == 0, r.output
    code, out = hooked_vitlab(tmp_path, *args, "--out", str(killed), VITLAB_TEST_KILL_AT="5")
    assert code == -signal.SIGKILL, out[-2000:]
    assert json.loads((killed / "checkpoints" / "last" / "config.json").read_text())["step"] == 4

    r = runner.invoke(cli, ["train", "--resume", "--out", str(killed)])
    assert r.exit_code == 0, r.output
    assert resumed_at(r.output, killed) == 4  # 18 training images, 3 steps an epoch: steps 4-6 are the second
    assert json.loads((killed / "summary.json").read_text())["steps"] == 12
    assert metrics(killed) == metrics(full) and [m["step"] for m in metrics(full)] == [3, 6, 9, 12]
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_ARGS = (
    *("--batch-size", "16", "--max-steps", "8", "--set", "warmup_epochs=0", "--set", "randaugment=[2, 9]"),
    *("--set", "drop_path_rate=0.2", "--set", "mixup_alpha=0.8", "--set", "checkpoint_every=3"),
    *("--set", "eval_every=4"),
)


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_numbers_and_resume_exactly(tmp_path) -> None:
    """Two gloo processes with augmentation, mixup and drop path: each rank checkpoints its own random state (they
    differ: the ranks draw different numbers), and a run SIGKILLed after step 5 resumes (from its checkpoint) to the
    metrics and weights of a run that never stopped."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, out = hooked_vitlab(tmp_path, *cli_args(full, *DDP_ARGS), processes=2)
    assert code == 0, out[-3000:]
    code, out = hooked_vitlab(tmp_path, *cli_args(killed, *DDP_ARGS), processes=2, VITLAB_TEST_KILL_AT="5")
    assert code != 0 and not (killed / "summary.json").exists()
    saved = torch.load(killed / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    rngs = saved["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])

    code, out = hooked_vitlab(tmp_path, "train", "--resume", "--out", str(killed), processes=2)
    assert code == 0, out[-3000:]
    assert resumed_at(out, killed) == saved["step"] < 5
    assert json.loads((killed / "summary.json").read_text())["processes"] == 2
    assert metrics(killed) == metrics(full) and [m["step"] for m in metrics(full)] == [4, 8]
    a, b = weights(full), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_time_budget_stops_every_rank_at_rank_0s_step(tmp_path) -> None:
    """Rank 1's clock runs 50 times faster: were it to decide for itself, it would stop at its first steps and
    leave rank 0 waiting in a collective. Rank 0 decides, and both stop at the same step."""
    run = tmp_path / "run"
    args = cli_args(run, "--batch-size", "16", "--epochs", "10", "--time-budget", "1.5", "--set", "eval_every=20")
    code, out = hooked_vitlab(tmp_path, *args, processes=2, timeout=120, VITLAB_TEST_FAST_CLOCK_RANK="1")
    assert code == 0, out[-3000:]
    assert "stopped early: time budget of 2s reached" in out
    summary = json.loads((run / "summary.json").read_text())
    assert 1 < summary["steps"] < 400 and metrics(run)[-1]["step"] == summary["steps"]


def test_resume_refuses_options_that_change_the_run(tmp_path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=2))
    r = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run), "--batch-size", "16", "--lr", "0.5"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "batch_size 64 -> 16" in lines[0] and "lr 0.002 -> 0.5" in lines[0], lines
    with pytest.raises(VitlabError, match=r"would change it: epochs 2 -> 3\. "):
        train(tiny_cfg(run, max_steps=2, epochs=3), resume=True)
    # where and how fast it runs is not what it computes: those may change
    summary = train(tiny_cfg(run, max_steps=2, threads=2, num_workers=0, log_every=1), resume=True)
    assert summary["steps"] == 2


def test_a_budget_run_killed_between_its_probe_and_its_refit_resumes_to_the_same_count(tmp_path, monkeypatch) -> None:
    """The count is measured again when the warmup ends (a fixed one here: the machine's speed must not matter). A
    run stopped after the probe fixed its first count but before that second measurement takes it at the same step
    once resumed, and ends with the count an uninterrupted run ends with, not the probe's."""
    monkeypatch.setattr("vitlab.train.budget.BudgetProbe.refit", lambda self, step, train_time: step + 12)

    class Interrupted(Exception):
        pass

    cut = tmp_path / "cut"

    def stop_inside_the_warmup(model, splits, record) -> None:
        probe_steps = yaml.safe_load((cut / "config.yaml").read_text()).get("probe_steps")
        if probe_steps and record["step"] == probe_steps + 2:
            raise Interrupted  # the checkpoint of the step before holds the probe's count, not yet the refit's

    cfg = tiny_cfg(cut, budget_s=10, warmup_steps=4, eval_every=1, checkpoint_every=1, max_steps=None)
    with pytest.raises(Interrupted):
        train(cfg, on_eval=stop_inside_the_warmup)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    refit_count = saved["probe_steps"] + 4 + 12
    assert saved["steps"] > refit_count  # the probe's count: 10 s hold many more steps
    summary = train(TrainConfig.from_dict(saved), resume=True)
    assert summary["steps"] == refit_count
    assert yaml.safe_load((cut / "config.yaml").read_text())["steps"] == refit_count


def test_checkpoint_every_is_the_cadence_of_checkpoints_and_files_are_replaced_whole(tmp_path, monkeypatch) -> None:
    """checkpoint_every=5 with eval_every=2: checkpoints at 5, 10 and the end, not at every evaluation. config.yaml,
    metrics.jsonl and summary.json appear by a rename of a complete file: a kill mid-write leaves no torn file."""
    saved_at, renamed = [], []
    save_last = trainer.save_last
    monkeypatch.setattr(trainer, "save_last", lambda loop, state: (saved_at.append(state.step), save_last(loop, state)))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), replace(src, dst)))
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=11, eval_every=2, checkpoint_every=5))
    assert saved_at == [5, 10, 11]
    assert [m["step"] for m in metrics(run)] == [2, 4, 6, 8, 10, 11]
    assert renamed.count("metrics.jsonl") == 1 + 6  # created empty, then one more line at each evaluation
    assert {"config.yaml", "summary.json"} <= set(renamed)


def test_a_class_subset_says_how_it_is_relabelled(tmp_path, capsys) -> None:
    """Two classes read "labels 0 and 1", never a range like 0-1 (or 0--1 for a reader of 0-{k - 1})."""
    train(tiny_cfg(tmp_path / "run", classes="3,7", max_steps=1))
    assert "training on 2 classes (3, 7), as labels 0 and 1 in this order" in capsys.readouterr().out
    assert relabelling(["cat"]) == "1 class (cat), as label 0 in this order"


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()), reason="needs CUDA and NCCL"
)
def test_every_collective_of_a_budget_run_works_under_nccl(tmp_path) -> None:
    """Under torchrun on a GPU the group is NCCL, which takes only CUDA tensors: a --budget run with a time budget
    (the probe's vote, the evaluation sums, the stop flag) goes through every collective of the loop and finishes."""
    run = tmp_path / "run"
    args = cli_args(run, "--device", "cuda", "--budget", "20s", "--time-budget", "600", "--max-steps", "12")
    code, out = hooked_vitlab(tmp_path, *args, "--set", "eval_every=4", torchrun=True)
    assert code == 0, out[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_a_run_resumes_with_as_many_processes_as_it_was_trained_by() -> None:
    saved = {"rng": [{"torch": 0}, {"torch": 1}]}  # what two ranks checkpoint
    two = SimpleNamespace(info=distributed.DistInfo(rank=1, world_size=2), run_dir=Path("run"))
    assert trainer.own(saved, "rng", two) == {"torch": 1}
    one = SimpleNamespace(info=distributed.DistInfo(), run_dir=Path("run"))
    with pytest.raises(VitlabError, match=r"run was trained by 2 processes; resume it with as many"):
        trainer.own(saved, "rng", one)


@pytest.mark.parametrize("fails", [False, True])
def test_rank_0_runs_a_download_first_and_the_others_follow(monkeypatch, fails: bool) -> None:
    """`main_first`: rank 0 runs the block, then meets the others at the barrier (even when the block fails, so that
    no rank waits forever); the others meet it there first, then run the block on what it wrote."""
    events: list[str] = []
    monkeypatch.setattr(distributed, "barrier", lambda info: events.append(f"barrier {info.rank}"))
    for rank in (0, 1):
        with pytest.raises(OSError) if fails else contextlib.nullcontext():
            with distributed.main_first(distributed.DistInfo(rank=rank, world_size=2)):
                events.append(f"download {rank}")
                if fails:
                    raise OSError("offline")
    assert events == ["download 0", "barrier 0", "barrier 1", "download 1"]
