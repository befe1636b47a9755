"""Training tasks and DeiT distillation: the losses against their formulas, the auxiliary-loss hook, training a
distilled DeiT from a teacher checkpoint through the CLI, teacher mismatches, exact resume with a teacher."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

import vitlab
from conftest import move_off_init, tiny_model
from test_train import TINY, cli_args, metrics, weights
from vitlab.cli import cli
from vitlab.train import TrainConfig, train
from vitlab.train.tasks import (
    ClassificationTask,
    DistillationTask,
    hard_distillation_loss,
    soft_distillation_loss,
)

# --- the losses on known logits ------------------------------------------------------------------------------
CLS = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
DIST = [[-0.5, 1.5, 0.0], [1.0, 0.0, -2.0]]
TEACHER = [[0.3, 2.5, -1.0], [4.0, 1.0, 0.0]]  # argmax: 1, 0
LABELS = [0, 2]


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


def ce(rows: list[list[float]], labels: list[int]) -> float:
    return -sum(log_softmax(r)[y] for r, y in zip(rows, labels)) / len(rows)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_hard_distillation_is_half_labels_half_teacher_argmax() -> None:
    expected = 0.5 * ce(CLS, LABELS) + 0.5 * ce(DIST, [1, 0])
    got = hard_distillation_loss(t(CLS), t(DIST), torch.tensor(LABELS), t(TEACHER))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("tau", "alpha"), [(3.0, 0.1), (1.0, 0.5), (0.5, 1.0)])
def test_soft_distillation_is_ce_plus_tau2_kl(tau: float, alpha: float) -> None:
    kl = 0.0
    for s, te in zip(DIST, TEACHER):
        log_ps, log_pt = log_softmax(s, tau), log_softmax(te, tau)
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
    expected = (1 - alpha) * ce(CLS, LABELS) + alpha * tau**2 * kl / len(DIST)
    got = soft_distillation_loss(t(CLS), t(DIST), torch.tensor(LABELS), t(TEACHER), tau=tau, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the KL term pulls the distillation logits by alpha * tau * (p_s - p_t) / B, toward the teacher
    dist = t(DIST).requires_grad_(True)
    soft_distillation_loss(t(CLS), dist, torch.tensor(LABELS), t(TEACHER), tau=tau, alpha=alpha).backward()
    p_s, p_t = (t(DIST) / tau).softmax(-1), (t(TEACHER) / tau).softmax(-1)
    torch.testing.assert_close(dist.grad, alpha * tau * (p_s - p_t) / len(DIST))


class Fixed(torch.nn.Module):
    """Returns fixed logits (a pair while distilled training, as a distilled DeiT); counts its forwards."""

    def __init__(self, *outputs: list[list[float]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.outputs = [t(o) for o in outputs]
        self.distilled_training = False

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward(self, x: torch.Tensor):
        out = [o * self.w for o in self.outputs]
        return tuple(out) if self.distilled_training and len(out) == 2 else sum(out) / len(out)


def test_distillation_task_routes_heads_and_scores_the_fused_prediction() -> None:
    x, y = torch.zeros(2, 1, 4, 4), torch.tensor(LABELS)
    teacher = Fixed(TEACHER)
    student = Fixed(CLS, DIST)
    soft = DistillationTask(teacher, kind="soft", tau=2.0, alpha=0.3)
    soft.setup(student)
    assert student.distilled_training
    out = soft.loss(student, x, y, y)
    assert out.loss.item() == pytest.approx(
        soft_distillation_loss(t(CLS), t(DIST), y, t(TEACHER), tau=2.0, alpha=0.3).item(), rel=1e-6
    )
    fused = (t(CLS) + t(DIST)) / 2
    assert out.correct.item() == (fused.argmax(-1) == y).sum().item()
    assert not teacher.w.requires_grad and not teacher.training
    # a student with one head: both terms read it
    single = Fixed(CLS)
    hard = DistillationTask(teacher, kind="hard")
    out = hard.loss(single, x, y, y)
    assert out.loss.item() == pytest.approx(0.5 * ce(CLS, LABELS) + 0.5 * ce(CLS, [1, 0]), rel=1e-6)
    # mixed targets (class probabilities) go to the label term as they are
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]])
    expected = 0.5 * torch.nn.functional.cross_entropy(t(CLS), mixed) + 0.5 * ce(CLS, [1, 0])
    assert hard.loss(single, x, mixed, y).loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_classification_task_adds_the_models_auxiliary_loss() -> None:
    class WithAux(Fixed):
        def auxiliary_loss(self, target: torch.Tensor) -> torch.Tensor:
            self.seen = target
            return self.w * 0.25

    x, y = torch.zeros(2, 1, 4, 4), torch.tensor(LABELS)
    plain = ClassificationTask().loss(Fixed(CLS), x, y, y)
    model = WithAux(CLS)
    out = ClassificationTask().loss(model, x, y, y)
    assert out.loss.item() == pytest.approx(ce(CLS, LABELS) + 0.25, rel=1e-6)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.25, rel=1e-6)
    assert model.seen is y and out.correct.item() == 2  # both rows' argmax match
    out.loss.backward()
    assert model.w.grad is not None


def test_teacher_sees_the_batch_in_its_own_normalisation() -> None:
    teacher = move_off_init(vitlab.create_model("vit_tiny_patch7_28", **TINY)).eval()
    teacher.default_cfg["mean"], teacher.default_cfg["std"] = (0.5,), (0.25,)
    task = DistillationTask(teacher, data_mean=[0.2], data_std=[0.4])
    images = torch.rand(2, 1, 28, 28)
    x = (images - 0.2) / 0.4  # the student's input
    torch.testing.assert_close(task.teacher_logits(x), teacher((images - 0.5) / 0.25), atol=1e-5, rtol=1e-5)


# --- training through the CLI --------------------------------------------------------------------------------
STUDENT = "deit_tiny_distilled_patch7_28"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny ViT teacher for digits (28x28 grayscale, 10 classes) with random weights moved off init."""
    torch.manual_seed(1)
    teacher = move_off_init(vitlab.create_model("vit_tiny_patch7_28", **TINY), std=0.5)
    return vitlab.save_pretrained(teacher, tmp_path_factory.mktemp("teacher") / "ckpt")


@pytest.fixture(scope="module")
def cnn_teacher_dir(tmp_path_factory):
    """A small ResNet teacher (the paper's best kind of teacher is a CNN), random weights moved off init."""
    torch.manual_seed(2)
    teacher = move_off_init(tiny_model("resnet18_28", num_classes=10), std=0.5)
    return vitlab.save_pretrained(teacher, tmp_path_factory.mktemp("cnn_teacher") / "ckpt")


TEACHERS = ["teacher_dir", "cnn_teacher_dir"]  # a ViT and a CNN


def distill_args(out, teacher, *extra: str, model: str = STUDENT) -> list[str]:
    return cli_args(out, "--model", model, "--teacher", str(teacher), *extra)  # the later --model wins


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distilled_deit_trains_from_a_teacher_checkpoint(kind, teacher, request, tmp_path) -> None:
    teacher_dir = request.getfixturevalue(teacher)
    run = tmp_path / kind
    r = CliRunner().invoke(cli, distill_args(run, teacher_dir, "--distill", kind, "--max-steps", "4"))
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["task"].startswith(f"{kind} distillation")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["teacher"], saved["distill"]) == (str(teacher_dir), kind)
    best = vitlab.from_pretrained(run / "checkpoints" / "last")
    assert best.model_name == STUDENT and not best.distilled_training  # a plain model again: averaged heads
    assert best.head_dist.weight.abs().sum() > 0  # the distillation head learned (it starts at zero)
    # the teacher shaped the steps: without it the same run ends elsewhere
    plain = tmp_path / "plain"
    train(TrainConfig.from_dict({**saved, "teacher": None, "distill": None, "out": str(plain)}))
    assert not torch.equal(weights(run)["head_dist.weight"], weights(plain)["head_dist.weight"])


def test_a_vit_student_distils_with_its_one_head(teacher_dir, tmp_path) -> None:
    run = tmp_path / "run"
    args = distill_args(run, teacher_dir, "--distill", "soft", "--max-steps", "2", model="vit_tiny_patch7_28")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "soft distillation (tau=3.0, alpha=0.1)" in json.loads((run / "summary.json").read_text())["task"]


@pytest.mark.parametrize(
    ("teacher_kw", "message"),
    [
        ({"num_classes": 5}, "predicts 5 classes but the data has 10"),
        ({"in_chans": 3}, "takes 3-channel images but the student's data has 1"),
        ({"img_size": 35}, r"cannot take 1x28x28 inputs \(it was built for 1x35x35\)"),
    ],
)
def test_a_teacher_that_does_not_fit_is_a_one_line_error(teacher_kw, message, tmp_path) -> None:
    teacher = vitlab.create_model("vit_tiny_patch7_28", **{**TINY, **teacher_kw})
    vitlab.save_pretrained(teacher, tmp_path / "teacher")
    r = CliRunner().invoke(cli, distill_args(tmp_path / "run", tmp_path / "teacher", "--max-steps", "1"))
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher") and re.search(message, lines[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distill", "soft"], "--distill soft needs a teacher"),
        (["--teacher", "/nonexistent-teacher"], "does not exist"),
        (["--teacher", "x", "--distill-alpha", "1.5"], "distill_alpha must be between 0 and 1"),
    ],
)
def test_distillation_flags_are_checked(args, message, tmp_path) -> None:
    r = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and r.output.startswith("error:") and message in r.output, r.output


@pytest.mark.parametrize("teacher", TEACHERS)
def test_resume_with_a_teacher_is_exact(teacher, request, tmp_path) -> None:
    """One epoch straight through vs. the same run stopped by a failure at step 6 (last checkpoint: step 4) and
    resumed with --resume, which reads the teacher from the run's config (a ViT or a CNN teacher)."""
    teacher_dir = request.getfixturevalue(teacher)
    extra = ("--distill", "soft", "--epochs", "1", "--set", "checkpoint_every=4", "--set", "eval_every=6")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    runner = CliRunner()
    assert runner.invoke(cli, distill_args(full, teacher_dir, *extra)).exit_code == 0

    class Stop(Exception):
        pass

    def fail_at_6(model, splits, record):
        if record["step"] == 6:
            raise Stop

    saved = yaml.safe_load((full / "config.yaml").read_text())
    with pytest.raises(Stop):
        train(TrainConfig.from_dict({**saved, "out": str(stopped)}), on_eval=fail_at_6)
    assert json.loads((stopped / "checkpoints" / "last" / "config.json").read_text())["step"] == 4
    r = runner.invoke(cli, ["train", "--resume", "--out", str(stopped)])
    assert r.exit_code == 0, r.output
    assert f"resumed {stopped} at step 4" in r.output
    assert metrics(stopped) == metrics(full)
    a, b = weights(full), weights(stopped)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("source", ["hf", "timm"])
def test_any_checkpoint_format_can_teach(source, tmp_path) -> None:
    """A HF transformers directory (DeiT with its teacher heads) or a timm state dict loads as a teacher that fits."""
    from vitlab.train.tasks import load_teacher

    if source == "hf":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.DeiTConfig(
            image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=10,
        )  # fmt: skip
        ref = transformers.DeiTForImageClassificationWithTeacher(cfg).eval()
        move_off_init(ref)
        ref.save_pretrained(tmp_path / "t")
        path, expected = tmp_path / "t", lambda x: ref(pixel_values=x).logits
    else:
        # the directory timm writes: its config.json says what the weights cannot (the head count)
        args = {**TINY, "embed_dim": 128}
        ref = move_off_init(vitlab.create_model("vit_tiny_patch7_28", **args)).eval()
        path = tmp_path / "t"
        path.mkdir()
        torch.save(ref.state_dict(), path / "pytorch_model.bin")
        config = {"architecture": "vit_tiny_patch7_28", "num_classes": 10, "model_args": args}
        (path / "config.json").write_text(json.dumps(config))
        expected = ref
    teacher = load_teacher(path, num_classes=10, in_chans=1, img_size=(28, 28))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(DistillationTask(teacher).teacher_logits(x), expected(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(vitlab.VitlabError, match="predicts 10 classes but the data has 7"):
        load_teacher(path, num_classes=7, in_chans=1, img_size=(28, 28))
