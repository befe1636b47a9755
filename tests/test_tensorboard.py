"""--log tensorboard: RUN/tensorboard/ holds metrics.jsonl's scalars, the test scores, the curves and the confusion
matrix, written by rank 0 alone, and a resumed run shows each step once (read back with TensorBoard's own reader)."""

from __future__ import annotations

import io
import json
import signal
import sys
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_resume_ddp import hooked_vitlab
from test_train import cli_args
from vitlab import VitlabError
from vitlab.cli import cli
from vitlab.train import TrainConfig
from vitlab.train.report import RunLogs

# metrics.jsonl key -> the TensorBoard tag it is logged under
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "lr": "lr",
    "images_per_s": "images_per_s",
    "time_s": "time_s",
    "epoch": "epoch",
}


def events(run) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_scalars_are_the_metrics(run) -> EventAccumulator:
    """Every number of every metrics.jsonl line is a scalar at its step, once; nothing else is logged per step."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = events(run)
    logged = {key for m in lines for key, v in m.items() if key != "step" and v is not None}
    assert set(acc.Tags()["scalars"]) - {"test/accuracy", "test/loss"} == {TAGS[k] for k in logged}
    for key in logged:
        scalars = acc.Scalars(TAGS[key])
        assert [s.step for s in scalars] == [m["step"] for m in lines], key  # each step once, in order
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in lines], rel=1e-6), key  # float32
    return acc


def test_a_run_logs_its_metrics_test_scores_curves_and_confusion_matrix(tmp_path) -> None:
    run = tmp_path / "run"
    args = cli_args(run, "--log", "tensorboard", "--batch-size", "32", "--max-steps", "6", "--set", "eval_every=2")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((run / "config.yaml").read_text())["log"] == ["jsonl", "tensorboard"]
    acc = assert_scalars_are_the_metrics(run)
    assert [s.step for s in acc.Scalars("loss/train")] == [2, 4, 6]
    summary = json.loads((run / "summary.json").read_text())
    test = acc.Scalars("test/accuracy")
    assert [(s.step, s.value) for s in test] == [(6, pytest.approx(summary["test_accuracy"], rel=1e-6))]
    assert set(acc.Tags()["images"]) == {"curves", "confusion_matrix"}
    (curves,) = acc.Images("curves")
    with Image.open(run / "curves.png") as png:  # the very PNG the run wrote, pixel for pixel
        expected = np.asarray(png.convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(curves.encoded_image_string)).convert("RGB")), expected)
    (confusion,) = acc.Images("confusion_matrix")
    assert confusion.step == 6 and confusion.width > 100 and confusion.height > 100


def test_a_run_killed_past_its_checkpoint_resumes_showing_each_step_once(tmp_path) -> None:
    """SIGKILLed after step 5, past its evaluations at steps 2 and 4 and its checkpoint at step 3, the run resumes
    from step 3 and evaluates step 4 again: TensorBoard shows it once (purge_step), and every evaluation before the
    checkpoint is there."""
    run = tmp_path / "run"
    args = ("--log", "tensorboard", "--batch-size", "16", "--max-steps", "8", "--set", "eval_every=2")
    args += ("--set", "checkpoint_every=3", "--set", "drop_path_rate=0.2", "--set", "hflip=true")  # random draws
    code, out = hooked_vitlab(tmp_path, *cli_args(run, *args), VITLAB_TEST_KILL_AT="5")
    assert code == -signal.SIGKILL and not (run / "summary.json").exists(), out[-3000:]
    assert [s.step for s in events(run).Scalars("loss/train")] == [2, 4]
    r = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run)])
    assert r.exit_code == 0 and f"resumed {run} at step 3/8" in r.output, r.output
    acc = assert_scalars_are_the_metrics(run)
    assert [s.step for s in acc.Scalars("loss/train")] == [2, 4, 6, 8]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session
    # where it logs is not what it computes: --resume may change it
    r = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run), "--log", "jsonl"])
    assert r.exit_code == 0, r.output


def test_a_resume_opened_within_the_killed_sessions_second_is_read_after_it(tmp_path) -> None:
    """TensorBoard reads event files in name order (the second a writer opened, the host, the process id): a resume
    whose file would sort before the killed session's, opened in the same second, would have its steps hidden by the
    old session's purge. It waits for the next second instead."""
    record = {"step": 2, "train_loss": 1.0}
    killed = RunLogs(["tensorboard"], tmp_path, enabled=True)
    killed.start(0)
    for step in (2, 4):
        killed.on_eval({**record, "step": step})
    killed.close()
    (old,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    old.rename(old.with_name(f"events.out.tfevents.{int(time.time())}.~host-sorting-last.1.0"))
    resumed = RunLogs(["tensorboard"], tmp_path, enabled=True)
    resumed.start(3)
    for step in (4, 6):
        resumed.on_eval({**record, "step": step, "train_loss": 0.5})
    resumed.close()
    losses = [(s.step, s.value) for s in events(tmp_path).Scalars("loss/train")]
    assert losses == [(2, 1.0), (4, 0.5), (6, 0.5)]


def test_under_ddp_only_rank_0_writes(tmp_path) -> None:
    run = tmp_path / "run"
    args = ("--batch-size", "16", "--max-steps", "4", "--set", "eval_every=2", "--set", "drop_path_rate=0.2")
    # under torchrun the option is spelled --set log=tensorboard (or a recipe's log: key): torchrun's own parser reads
    # every --log after the script as an abbreviation of its --log-dir / --logs-specs, and stops
    code, out = hooked_vitlab(tmp_path, *cli_args(run, "--set", "log=tensorboard", *args), processes=2)
    assert code == 0, out[-3000:]
    # rank 1 writing too would leave a second event file, and every step twice
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = assert_scalars_are_the_metrics(run)
    assert [s.step for s in acc.Scalars("loss/train")] == [2, 4]


def test_log_is_checked_and_a_missing_tensorboard_is_one_line(tmp_path, monkeypatch) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("log: [tensorboard]\n")
    assert TrainConfig.from_sources(recipe).log == ["jsonl", "tensorboard"]  # metrics.jsonl is always written
    with pytest.raises(VitlabError, match=r"log: no backend 'tensorbord'; .* Did you mean: tensorboard\?"):
        TrainConfig(log="jsonl,tensorbord")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    r = CliRunner().invoke(cli, cli_args(tmp_path / "run", "--log", "tensorboard", "--max-steps", "1"))
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --log tensorboard needs the tensorboard package: pip install vitlab[tensorboard]"
    ]
