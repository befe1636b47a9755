"""Training tasks: the one seam between the training loop and what is being learned.

A task turns a batch into a loss and metrics. The loop (`vitlab.train.trainer`) owns the data order, augmentation,
mixing, precision, accumulation, optimizer, checkpoints and resume; it never looks at the kind of model. For every
micro-batch it calls, under its autocast::

    out = task.loss(model, x, target, labels)      # -> TaskOutput(loss, correct)
    (out.loss / accum_steps).backward()

* ``model``: the module to call, possibly wrapped by DistributedDataParallel or torch.compile (call it, so that
  gradients are synchronised); `unwrap(model)` reaches the module itself for model-specific hooks;
* ``x``: the normalised, augmented, possibly mixed images [B, C, H, W];
* ``target``: what the loss compares with: class indices [B], or class probabilities [B, K] after mixup, cutmix or
  label smoothing;
* ``labels``: the batch's original class indices [B], for metrics;
* ``TaskOutput.loss``: a scalar fp32 tensor to backpropagate; ``TaskOutput.correct``: the number of top-1 correct
  predictions in the batch (a 0-dim tensor; the loop sums it into the training accuracy).

``task.setup(model)`` runs once on the bare model before the loop wraps it, and ``task.describe()`` is a line for the
log. ``task.start_epoch(epoch)`` runs before each epoch's batches (a task that draws per sample, as CLIP's captions,
draws from a generator of (seed, epoch) that every process shares). Two more calls let a task learn something other
than a classifier without a second loop:

* ``task.build_model(cfg, splits)`` builds the model (seeded by the loop) and records on it what a checkpoint keeps
  (``pretrained_cfg``: class names and normalisation);
* ``task.evaluate(model, dataset, splits=..., batch_size=..., device=..., precision=..., dist_info=...,
  num_workers=...)`` measures a split in eval mode: a dict with ``loss``, ``accuracy`` (what selects the best
  checkpoint), ``count``, and ``report``, the task's entries for the run summary, and optionally ``curves``, what
  it adds to each line of metrics.jsonl (captioning and CLIP: ``val_zero_shot`` on scenes). Classification evaluates
  ``model(x)`` (`vitlab.train.evaluate`).

A task whose data is not a classification dataset receives in ``labels`` (and ``target``) whatever its dataset's
batches carry: a caption set's sample indices for contrastive image-text training (`vitlab.train.contrastive`).

Tasks here:

* `ClassificationTask`: cross-entropy against ``target``, plus the model's auxiliary loss when it defines one.
  **Hook**: a model may define ``auxiliary_loss(target) -> Tensor | None``, called right after each training forward
  with that batch's ``target``; the model keeps what it needs from the forward it just ran (e.g. a hard-attention
  model's log-probabilities of the glimpses it sampled, for a REINFORCE term rewarded by its prediction's
  correctness) and returns a scalar added to the loss as is, or None.
* `DistillationTask` (DeiT, Touvron et al. 2021, arXiv:2012.12877, section 4) wraps it with a teacher: any checkpoint
  `vitlab.from_pretrained` reads (vitlab, HF or timm; any architecture, a CNN too), in eval mode, under no_grad, on
  the same augmented (and mixed) batch as the student.
* `vitlab.train.contrastive.ContrastiveTask` (CLIP): image and text towers, symmetric contrastive loss over the
  global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import DatasetSplits
from vitlab.errors import VitlabError
from vitlab.factory import create_model
from vitlab.train.config import TrainConfig
from vitlab.train.evaluate import evaluate


class TaskOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32: what the loop backpropagates
    correct: torch.Tensor  # 0-dim: top-1 correct predictions in the batch


class Task(Protocol):
    def setup(self, model: nn.Module) -> None: ...

    def start_epoch(self, epoch: int) -> None: ...

    def build_model(self, cfg: TrainConfig, splits: DatasetSplits) -> nn.Module: ...

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput: ...

    def evaluate(self, model: nn.Module, dataset: Any, *, splits: DatasetSplits, **kwargs: Any) -> dict[str, Any]: ...

    def describe(self) -> str: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile wrappers, where model-specific hooks live."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).sum()


class ClassificationTask:
    """Cross-entropy on (possibly mixed or smoothed) targets, plus the model's ``auxiliary_loss`` if it has one."""

    def setup(self, model: nn.Module) -> None:
        pass

    def start_epoch(self, epoch: int) -> None:
        pass

    def describe(self) -> str:
        return "classification"

    def build_model(self, cfg: TrainConfig, splits: DatasetSplits) -> nn.Module:
        if not splits.num_classes:
            raise VitlabError(f"{splits.name} has no classes to learn; a caption set trains with `vitlab clip train`")
        model = create_model(
            cfg.model, num_classes=splits.num_classes, drop_path_rate=cfg.drop_path_rate, **cfg.model_args
        )
        model.pretrained_cfg = {"class_names": splits.class_names, "mean": list(splits.mean), "std": list(splits.std)}
        return model

    def evaluate(self, model: nn.Module, dataset: Any, *, splits: DatasetSplits, **kwargs: Any) -> dict[str, Any]:
        """Loss, accuracy, per-class accuracy and confusion of ``model(x)`` (`vitlab.train.evaluate.evaluate`)."""
        # the model's own normalisation: the data's, or the pretrained model's when fine-tuning (--init)
        norm = getattr(model, "pretrained_cfg", {})
        mean, std = norm.get("mean", splits.mean), norm.get("std", splits.std)
        r = evaluate(model, dataset, num_classes=splits.num_classes, mean=mean, std=std, **kwargs)
        return {**r, "report": {"per_class_accuracy": dict(zip(splits.class_names, r["per_class_accuracy"]))}}

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)  # in fp32 whatever the autocast

    def auxiliary(self, model: nn.Module, target: torch.Tensor) -> torch.Tensor | float:
        hook = getattr(unwrap(model), "auxiliary_loss", None)
        extra = hook(target) if hook is not None else None
        return 0.0 if extra is None else extra.float()

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        logits = model(x)
        loss = self.criterion(logits, target) + self.auxiliary(model, target)
        return TaskOutput(loss, count_correct(logits, labels))


# --- distillation (DeiT, section 4) ------------------------------------------------------------------------------
def hard_distillation_loss(
    cls_logits: torch.Tensor, dist_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """1/2 CE(psi(Z_s), y) + 1/2 CE(psi(Z_s^dist), y_t), y_t = argmax_c Z_t(c): the teacher's decision is a label."""
    y_t = teacher_logits.argmax(-1)
    return 0.5 * F.cross_entropy(cls_logits.float(), target) + 0.5 * F.cross_entropy(dist_logits.float(), y_t)


def soft_distillation_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float,
    alpha: float,
) -> torch.Tensor:
    """(1 - alpha) CE(psi(Z_s), y) + alpha tau^2 KL(psi(Z_t / tau) || psi(Z_s^dist / tau)).

    The paper writes the KL term as KL(psi(Z_s/tau), psi(Z_t/tau)); like its code and Hinton et al. we compute
    sum_c p_t log(p_t / p_s), whose gradient in the student logits is (p_s - p_t) / tau, summed over classes and
    averaged over the batch (the paper's per-image loss; the authors' code divides by batch x classes instead).
    tau^2 keeps the gradient's scale independent of the temperature."""
    log_p_s = F.log_softmax(dist_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return (1 - alpha) * F.cross_entropy(cls_logits.float(), target) + alpha * tau**2 * kl


class DistillationTask:
    """Learn from the true labels and from a teacher, as DeiT.

    A student with a distillation head (``set_distilled_training``, e.g. a distilled DeiT) returns the pair
    (class logits, distillation logits) while training: the class head learns the labels, the distillation head the
    teacher. Any other student uses its one head for both terms. Training accuracy scores the prediction the model
    makes at inference (the average of the two heads). The model's ``auxiliary_loss`` is added unweighted, as in
    `ClassificationTask`.

    ``teacher_mean`` / ``teacher_std`` / ``data_mean`` / ``data_std``: when the teacher was trained with another
    normalisation than the student's data, the batch is renormalised for it (the same images, in the teacher's
    units); equal statistics leave it untouched.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        kind: str = "hard",
        tau: float = 3.0,
        alpha: float = 0.1,
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        base: ClassificationTask | None = None,
    ) -> None:
        if kind not in ("hard", "soft"):
            raise VitlabError(f"distillation must be 'hard' or 'soft', got {kind!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.tau, self.alpha = kind, tau, alpha
        self.base = base or ClassificationTask()
        self._renorm = _renormalisation(teacher, data_mean, data_std)

    def setup(self, model: nn.Module) -> None:
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)

    def start_epoch(self, epoch: int) -> None:
        pass

    def build_model(self, cfg: TrainConfig, splits: DatasetSplits) -> nn.Module:
        return self.base.build_model(cfg, splits)

    def evaluate(self, model: nn.Module, dataset: Any, *, splits: DatasetSplits, **kwargs: Any) -> dict[str, Any]:
        return self.base.evaluate(model, dataset, splits=splits, **kwargs)

    def describe(self) -> str:
        params = f"tau={self.tau}, alpha={self.alpha}" if self.kind == "soft" else "1:1 with the labels"
        name = getattr(self.teacher, "model_name", type(self.teacher).__name__)
        return f"{self.kind} distillation ({params}) from a {name} teacher"

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._renorm is not None:
            scale, shift = self._renorm
            x = x * scale + shift
        return self.teacher(x).float()

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        teacher_logits = self.teacher_logits(x)
        out = model(x)
        if isinstance(out, tuple):
            cls_logits, dist_logits = out
            prediction = (cls_logits + dist_logits) / 2  # what the model answers at inference
        else:
            cls_logits = dist_logits = prediction = out
        if self.kind == "hard":
            loss = hard_distillation_loss(cls_logits, dist_logits, target, teacher_logits)
        else:
            loss = soft_distillation_loss(
                cls_logits, dist_logits, target, teacher_logits, tau=self.tau, alpha=self.alpha
            )
        loss = loss + self.base.auxiliary(model, target)
        return TaskOutput(loss, count_correct(prediction, labels))


def _renormalisation(
    teacher: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) [1, C, 1, 1] with x_teacher = x * scale + shift, or None when the statistics agree."""
    cfg = getattr(teacher, "default_cfg", {})
    t_mean, t_std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or t_mean is None or t_std is None or len(t_mean) != len(mean):
        return None
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    tm, ts = torch.tensor(t_mean, dtype=torch.float32), torch.tensor(t_std, dtype=torch.float32)
    if torch.allclose(m, tm) and torch.allclose(s, ts):
        return None
    device = next(teacher.parameters()).device
    # x = (img - m) / s and the teacher wants (img - tm) / ts = x * s / ts + (m - tm) / ts
    return (s / ts).view(1, -1, 1, 1).to(device), ((m - tm) / ts).view(1, -1, 1, 1).to(device)


class ClassOrder(nn.Module):
    """A classifier whose outputs come in another class order: output ``i`` is the wrapped model's output
    ``order[i]`` (a teacher trained on the student's classes listed in another order; see `class_order`)."""

    def __init__(self, model: nn.Module, order: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("order", torch.as_tensor(list(order)), persistent=False)
        self.default_cfg = getattr(model, "default_cfg", {})
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.num_classes = len(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.order]  # (B, K) in the student's class order


def load_teacher(
    path: str | Path,
    *,
    num_classes: int,
    in_chans: int,
    img_size: tuple[int, int],
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """Load a teacher checkpoint and check that it fits the student's data: ``num_classes`` outputs for
    ``in_chans`` x ``img_size`` images. A teacher built for another size is accepted when it runs at this one
    (a CNN, a dynamic-size ViT); anything else is a one-line error. With the data's ``class_names`` the teacher's
    classes are checked by name (`vitlab.data.subset.class_order`): the same classes in another order come back
    reordered to the data's (`ClassOrder`), other classes are a one-line error."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.data.subset import class_order

    teacher = from_pretrained(path, map_location="cpu").to(device).eval().requires_grad_(False)
    name = f"teacher {str(path)!r}"
    classes = getattr(teacher, "num_classes", None)
    if classes is not None and classes != num_classes:
        raise VitlabError(
            f"{name} predicts {classes} classes but the data has {num_classes}; use a teacher "
            "trained on the same classes"
        )
    want = (in_chans, *img_size)
    built: Any = tuple(getattr(teacher, "default_cfg", {}).get("input_size") or want)
    if built[0] != in_chans:
        raise VitlabError(f"{name} takes {built[0]}-channel images but the student's data has {in_chans}")
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, *want, device=device))
    except (VitlabError, RuntimeError, ValueError) as e:  # a fixed-size model refuses another size
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(
            f"{name} cannot take {want[0]}x{want[1]}x{want[2]} inputs (it was built for "
            f"{'x'.join(map(str, built))}): {first}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.shape != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise VitlabError(f"{name} returns {shape} for one image, not logits over {num_classes} classes")
    if class_names is None:
        return teacher
    names = getattr(teacher, "pretrained_cfg", {}).get("class_names")
    order = class_order(names, class_names, num_classes=num_classes, model=name, data="the student's data")
    return teacher if order is None else ClassOrder(teacher, order).to(device)
