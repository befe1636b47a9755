"""The training loop, top to bottom: data -> task -> model -> optimizer -> (resume) -> steps with periodic evaluation
and atomic checkpoints -> test report.

What is learned is the task's business (`vitlab.train.tasks`): the loop hands it each batch and backpropagates the
loss it returns (classification, distillation from a teacher, ...); it never branches on the kind of model.

Exact resume: the sample order of an epoch depends only on (seed, epoch), loading draws from a generator of (seed,
epoch, rank), every other random draw (augmentation, dropout, stochastic depth, mixup) comes from torch's global
generator, whose state every process checkpoints, and the learning rate is a function of the step. A teacher is named
in the run's config and runs deterministically in eval mode. So a run resumed from ``checkpoints/last`` takes
bit-identical steps to one that never stopped (on CPU, with the same thread count).

Under torchrun the processes build the same model from the run's seed, then each draws its own stream (seeded from
(seed, rank)); what they must agree on is decided by rank 0 (the run directory, the data download, the time-budget
stop) or drawn from generators they share (the sample order, a CLIP run's captions).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab._io import atomic_directory, recover_directory, write_json, write_text_atomic
from vitlab._registry import get_variant
from vitlab.checkpoint import CONFIG_NAME, from_pretrained, load_checkpoint_state, read_state_dict, write_pretrained
from vitlab.data import DatasetSplits, build_augment, mixup_cutmix, normalize, to_float
from vitlab.data.base import derive_seed
from vitlab.data.clips import VideoSplits
from vitlab.data.manifest import SplitOptions, build_run_splits, record_split
from vitlab.data.segmentation import SegmentationSplits
from vitlab.errors import VitlabError
from vitlab.layers import to_2tuple
from vitlab.layers.mimetic import mimetic_init_
from vitlab.stats import count_params
from vitlab.train.budget import BudgetProbe, Schedule, budget_warmup
from vitlab.train.captioning import CaptioningTask
from vitlab.train.config import TrainConfig, save_yaml
from vitlab.train.contrastive import ContrastiveTask
from vitlab.train.defaults import apply_data_defaults
from vitlab.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast,
    broadcast_object,
    cleanup,
    init_distributed,
    main_first,
)
from vitlab.train.evaluate import autocast
from vitlab.train.optim import ModelEma, build_optimizer
from vitlab.train.precision import resolve_precision
from vitlab.train.report import Progress, RunLogs, format_duration, plot_curves, read_metrics
from vitlab.train.retrieval import RetrievalTask, takes_images
from vitlab.train.sam import SAM
from vitlab.train.segmentation import SegmentationTask
from vitlab.train.tasks import ClassificationTask, DistillationTask, Task, load_teacher
from vitlab.train.transfer import freeze_backbone, hold_backbone_in_eval, init_model

STATE_NAME = "trainer_state.pt"
# where and how fast a run trains, not what it computes: --resume may change these, and only these
RUNTIME_OPTIONS = ("out", "data_dir", "num_workers", "threads", "log_every", "log", "device")
BUDGET_RECORDS = ("steps", "probe_steps", "warmup_steps")  # what a --budget run measures and records itself
OnEval = Callable[[torch.nn.Module, Any, dict[str, Any]], "dict[str, Any] | None"]
TIMING_KEYS = ("images_per_s", "time_s")  # the only metrics that differ between identical runs


def default_run_dir(cfg: TrainConfig) -> Path:
    data = cfg.data.replace("folder:", "").rstrip("/").split("/")[-1].replace(":", "_")
    model = Path(cfg.init.rstrip("/")).name.replace(":", "_") if cfg.init else cfg.model
    return Path("runs") / f"{data}-{model}-{datetime.now():%Y%m%d-%H%M%S}"


def pick_device(pref: str, info: DistInfo) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise VitlabError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def fit_batch(n: int, batch_size: int, *, accum_steps: int = 1, world_size: int = 1) -> tuple[int, str | None]:
    """The per-process batch for a training split of ``n`` images: ``batch_size``, or smaller when one step would
    need more images than there are (a small dataset trains on all of them instead of failing), and the line that
    says so."""
    per_step = accum_steps * world_size
    if n >= batch_size * per_step:
        return batch_size, None
    if n < per_step:
        raise VitlabError(
            f"the training split has {n} images, fewer than one per micro-batch of a step ({accum_steps} accumulation "
            f"x {world_size} processes); lower accum_steps or the number of processes"
        )
    fitted = n // per_step
    layout = "".join(
        f" x {k} {what}" for k, what in ((accum_steps, "accumulation"), (world_size, "processes")) if k > 1
    )
    where = " per process" if world_size > 1 else ""
    return fitted, (
        f"the training split has {n} images, fewer than one step of {batch_size}{layout}: the batch shrinks to "
        f"{fitted}{where}"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig, *, resume: bool = False, on_eval: OnEval | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary that is also written to ``summary.json``.

    ``on_eval(model, splits, record)`` runs after each validation and may return extra fields for that
    metrics.jsonl line (benchmarks use it to follow test accuracy; model selection never sees them).
    """
    info = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        summary = _train(cfg, resume, info, on_eval)
        barrier(info)  # the processes leave together: none tears its group down while another still writes
        return summary
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, resume: bool, info: DistInfo, on_eval: OnEval | None) -> dict[str, Any]:
    run = prepare_run(cfg, resume, info)
    splits = prepare_data(run)
    parts = build_parts(run, splits)
    plan = plan_steps(run, splits)
    state = restore(run, parts, plan) if resume else start(run)
    loop = Loop(run, splits, parts, plan, on_eval)
    step_until_done(loop, state)
    return report(loop, state)


# --- what the phases hand each other -----------------------------------------------------------------------------
@dataclass
class Run:
    """What the run is before its data is read: the configuration, where it runs and where it writes."""

    cfg: TrainConfig  # a budget run records its step count here once measured
    info: DistInfo
    resume: bool
    device: torch.device
    precision: str
    run_dir: Path
    log: Progress  # lines before the loop's progress bar
    intro: list[str]  # what the run chose and adapted, said once it has started (a user error before stays one line)

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


@dataclass
class Parts:
    """The model and what trains it."""

    model: torch.nn.Module  # the bare model, what checkpoints hold
    train_model: torch.nn.Module  # the model as trained: wrapped by DDP and torch.compile when asked
    eval_model: torch.nn.Module  # the EMA's copy when there is one
    task: Task
    optimizer: torch.optim.Optimizer
    ema: ModelEma | None
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    in_chans: int
    img_size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    params: int
    model_name: str
    checkpoint_meta: dict[str, Any]


@dataclass
class Plan:
    """Batches, steps, learning rates and cadences. A budget's are known once its probe has timed steps."""

    batch_size: int  # per process and micro-step
    steps_per_epoch: int
    global_batch: int  # images per optimizer step, over every process
    planned: int = 0  # the schedule's length (2**62 while a budget's probe measures)
    probe: BudgetProbe | None = None
    total_steps: int = 0
    schedule: Schedule | None = None
    eval_every: int = 1
    ckpt_every: int = 1


@dataclass
class RunState:
    """What changes as the run steps; a checkpoint keeps the first six (``running`` on every rank)."""

    step: int = 0
    best_acc: float = -1.0
    best_step: int = 0
    train_time: float = 0.0
    # this rank's loss sum, correct predictions and images since the last evaluation
    running: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    stale: int = 0  # evaluations in a row that did not raise best_acc (what `patience` counts)
    stop_reason: str | None = None
    window_t: float = 0.0  # images/s are measured since the last evaluation
    window_images: int = 0


@dataclass
class Loop:
    """The fixed pieces the steps work with."""

    run: Run
    splits: DatasetSplits
    parts: Parts
    plan: Plan
    on_eval: OnEval | None
    progress: Progress = field(init=False)
    logs: RunLogs = field(init=False)  # TensorBoard, when asked (metrics.jsonl is written here, always)

    def __post_init__(self) -> None:
        info, log_every = self.run.info, self.run.cfg.log_every
        self.progress = Progress(self.plan.total_steps, enabled=info.is_main, log_every=log_every)
        self.logs = RunLogs(self.run.cfg.log, self.run.run_dir, enabled=info.is_main)  # rank 0 writes


# --- the phases --------------------------------------------------------------------------------------------------
def prepare_run(cfg: TrainConfig, resume: bool, info: DistInfo) -> Run:
    """The configuration completed (`model: auto` fits a model and schedule to the data), the device, the precision
    and the run directory, checked against --resume."""
    chosen = None
    if cfg.data.startswith("captions:") and not (cfg.text_model or cfg.caption_args):  # CLIP or a captioner
        raise VitlabError(f"{cfg.data} is a caption set: train a CLIP model on it with `vitlab clip train`")
    if cfg.model == "auto" and not cfg.init:  # a model and schedule that fit the data, recorded in config.yaml
        values, chosen = apply_data_defaults(cfg.to_dict(), cfg.explicit_fields(), world_size=info.world_size)
        cfg = TrainConfig.from_dict(values)
    device = pick_device(cfg.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out) if cfg.out else Path(broadcast_object(str(default_run_dir(cfg)), info))  # rank 0's clock
    last = run_dir / "checkpoints" / "last"
    if info.is_main:  # a run killed inside a checkpoint swap left <dir>.old; the others look once it is back
        for d in (last, run_dir / "checkpoints" / "best"):
            recover_directory(d)
    barrier(info)
    if not resume and (last / STATE_NAME).exists():
        raise VitlabError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --out")
    if resume and not (last / STATE_NAME).exists():
        raise VitlabError(f"nothing to resume in {run_dir}: {last / STATE_NAME} does not exist")
    if resume:
        check_unchanged(cfg, run_dir)
    log = Progress(0, enabled=info.is_main)
    precision, why = resolve_precision(cfg.precision, device)
    intro = [*([chosen] if chosen else []), f"precision {precision} ({why})"]
    return Run(cfg, info, resume, device, precision, run_dir, log, intro)


def check_unchanged(cfg: TrainConfig, run_dir: Path) -> None:
    """--resume continues the run its last checkpoint recorded: options that would change its steps (a batch size,
    a schedule, the data) are refused in one line naming them, never applied to the steps still to take."""
    recorded = json.loads((run_dir / "checkpoints" / "last" / CONFIG_NAME).read_text())["train_config"]
    before, now = TrainConfig.from_dict(recorded).to_dict(), cfg.to_dict()
    free = {*RUNTIME_OPTIONS, *(BUDGET_RECORDS if cfg.budget_s else ())}  # a budget's records come from its checkpoint
    changed = [k for k in now if k not in free and now[k] != before.get(k)]
    if changed:
        what = ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise VitlabError(
            f"--resume continues {run_dir} as it was started; these options would change it: {what}. Drop them, "
            "or start a new run with another --out"
        )


def input_shape(cfg: TrainConfig) -> tuple[int | None, tuple[int, int] | None]:
    """(channels, size) of the model's input: the variant's, or what --set model_args overrides. With --init the
    checkpoint decides (None: a folder is decoded at its defaults, the model then says)."""
    if not takes_images(cfg.model):  # MMT reads the clips' expert features; its batches carry 1-pixel placeholders
        return 1, (1, 1)
    if cfg.init:
        in_chans, img = cfg.model_args.get("in_chans"), cfg.model_args.get("img_size")
    else:
        _, model_kwargs, model_cfg = get_variant(cfg.model)
        in_chans = cfg.model_args.get("in_chans", model_kwargs.get("in_chans", model_cfg["input_size"][0]))
        img = cfg.model_args.get("img_size", model_kwargs.get("img_size", model_cfg["input_size"][1:]))
    return in_chans, None if img is None else to_2tuple(img)


def prepare_data(run: Run) -> DatasetSplits:
    """The splits the run trains, selects and tests on: the dataset (or its fallback), a class subset, fewer images."""
    cfg = run.cfg
    in_chans, img_size = input_shape(cfg)
    options, data = SplitOptions.of(cfg), cfg.data  # the splits `vitlab eval` rebuilds: built the same way
    with main_first(run.info):  # rank 0 downloads and unpacks first; the others read what it wrote
        try:
            splits = build_run_splits(data, options, data_dir=cfg.data_dir, img_size=img_size, in_chans=in_chans)
        except VitlabError as e:
            if not cfg.fallback_data:
                raise
            run.log.message(f"{cfg.data} is not available here ({e}); training on {cfg.fallback_data} instead")
            data = cfg.fallback_data
            splits = build_run_splits(data, options, img_size=img_size, in_chans=in_chans)
    if splits.skipped:
        run.log.message(f"skipped {len(splits.skipped)} unreadable images (--skip-bad-images)")
    if cfg.classes is not None:
        run.intro.append(f"training on {relabelling(splits.class_names)}")
    if not len(splits.val):
        run.intro.append(
            f"no validation split (val_fraction={cfg.val_fraction}): no model selection, checkpoints/best is the "
            "last model"
        )
    run.intro += splits.notes
    # RUN/split.json: what the run holds out, written by a fresh run, checked by a resumed one
    record_split(run.run_dir, splits, data=data, options=options, resume=run.resume, write=run.info.is_main)
    return splits


def relabelling(names: list[str]) -> str:
    """'2 classes (3, 7), as labels 0 and 1 in this order': a class subset's names and the labels they train as."""
    k = len(names)
    labels = "label 0" if k == 1 else "labels 0 and 1" if k == 2 else f"labels 0 to {k - 1}"
    return f"{k} class{'es' * (k != 1)} ({', '.join(names)}), as {labels} in this order"


def build_model(run: Run, splits: DatasetSplits) -> tuple[torch.nn.Module, Task, tuple]:
    """The task and the model it trains, with the input it takes: (model, task, (in_chans, img_size, mean, std))."""
    cfg = run.cfg
    in_chans, img_size = input_shape(cfg)
    mean, std = splits.mean, splits.std
    pretrained = None
    if cfg.init:  # transfer: architecture, input size and normalisation come from the pretrained checkpoint
        if cfg.drop_path_rate:
            raise VitlabError("--init keeps the checkpoint's architecture; drop_path_rate cannot be set with it")
        seed_everything(cfg.seed)  # a family whose new classifier is not zero-initialised draws it here
        resume_dir = run.last_dir if run.resume else None
        pretrained, why = init_model(cfg.init, splits, model_args=cfg.model_args, resume_dir=resume_dir)
        run.intro.append(why)
        in_chans, img_size = pretrained.default_cfg["input_size"][0], tuple(pretrained.default_cfg["input_size"][1:])
        mean, std = tuple(pretrained.pretrained_cfg["mean"]), tuple(pretrained.pretrained_cfg["std"])
    # the task (and its teacher) before seeding: building a teacher draws random numbers, the student's init must not
    # depend on whether there is one
    task = build_task(
        cfg,
        num_classes=splits.num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
        device=run.device,
        splits=splits,
    )
    seed_everything(cfg.seed)
    # transfer starts from the pretrained model; otherwise the task builds its model (a classifier, a CLIP pair)
    model = pretrained if pretrained is not None else task.build_model(cfg, splits)
    if cfg.attn_init == "mimetic":  # its own generator: every other initial weight stays what it was without it
        names = mimetic_init_(model, generator=torch.Generator().manual_seed(derive_seed("mimetic", cfg.seed)))
        run.intro.append(f"attn_init mimetic: {len(names)} attention layers (Trockman & Kolter 2023)")
    model.to(run.device)
    task.setup(model)
    if run.info.rank:  # the same model on every rank; from here each draws its own augmentation, mixing, drop path
        seed_everything(derive_seed("rank", cfg.seed, run.info.rank))
    return model, task, (in_chans, img_size, mean, std)


def build_task(
    cfg: TrainConfig,
    *,
    num_classes: int,
    in_chans: int,
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    splits: DatasetSplits | None = None,
) -> Task:
    """The task a `TrainConfig` and its data ask for: segmentation on label maps, retrieval on clips' features,
    captioning when it has caption_args, contrastive image-text training when it names a text tower, distillation
    when it names a teacher, else classification."""
    if isinstance(splits, SegmentationSplits):  # label maps: LSeg with text_model, else its classifier-head baseline
        return SegmentationTask(cfg, splits)
    if isinstance(splits, VideoSplits):  # clips' expert features and captions: MMT retrieval
        return RetrievalTask(cfg, splits)
    if cfg.text_model and cfg.caption_args:
        raise VitlabError("a run trains CLIP (text_model) or a captioner (caption_args), not both")
    if cfg.caption_args:
        return CaptioningTask(cfg, splits)  # it refuses data that is not a caption set, in one line
    if cfg.text_model:
        if splits is None:
            raise VitlabError("contrastive training needs the caption set to build its task")
        return ContrastiveTask(cfg, splits)
    if splits is not None and hasattr(splits.train, "captions"):  # a caption set's labels are sample indices
        raise VitlabError(f"{splits.name} pairs images with captions: train it with `vitlab clip train`")
    if not cfg.teacher:
        return ClassificationTask()
    teacher = load_teacher(
        cfg.teacher,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        device=device,
        class_names=splits.class_names if splits is not None else None,  # matched by name, not only by count
    )
    return DistillationTask(
        teacher, kind=cfg.distill, tau=cfg.distill_tau, alpha=cfg.distill_alpha, data_mean=mean, data_std=std
    )


def build_parts(run: Run, splits: DatasetSplits) -> Parts:
    """The model and task, the optimizer (and EMA), the model as trained (DDP, torch.compile) and the augmentation."""
    cfg, info = run.cfg, run.info
    model, task, (in_chans, img_size, mean, std) = build_model(run, splits)
    if cfg.freeze == "backbone":
        run.intro.append(f"--freeze backbone: training only the classifier ({freeze_backbone(model):,} parameters)")
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
    optimizer = build_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, layer_decay=cfg.layer_decay
    )
    if cfg.sam_rho:  # its state is the base optimizer's: checkpoints and resume are unchanged
        optimizer = SAM(optimizer, rho=cfg.sam_rho, adaptive=cfg.sam_adaptive)
        run.intro.append(f"SAM rho {cfg.sam_rho}{' (adaptive)' if cfg.sam_adaptive else ''}: two passes per step")
    train_model: torch.nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device = run.device
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    augment = build_augment(
        img_size=img_size,
        in_chans=in_chans,
        random_resized_crop=cfg.random_resized_crop or False,
        hflip=cfg.hflip,
        randaugment=cfg.randaugment,
        random_erasing=cfg.random_erasing,
    )
    return Parts(
        model=model,
        train_model=train_model,
        eval_model=ema.module if ema else model,
        task=task,
        optimizer=optimizer,
        ema=ema,
        augment=augment,
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
        params=count_params(model),
        model_name=model.model_name if cfg.init else cfg.model,
        # the precision the run resolved: `vitlab eval` scores the checkpoint in it again (`run_precision`)
        checkpoint_meta={"precision": run.precision, **({"init": model.pretrained_cfg["init"]} if cfg.init else {})},
    )


def plan_steps(run: Run, splits: DatasetSplits) -> Plan:
    """The batch per process, the steps of an epoch and the schedule; a budget's length waits for its probe."""
    cfg, info = run.cfg, run.info
    batch_size, shrunk = fit_batch(
        len(splits.train), cfg.batch_size, accum_steps=cfg.accum_steps, world_size=info.world_size
    )
    if shrunk:
        run.intro.append(shrunk)
    micro_per_epoch = splits.train.num_batches(batch_size, world_size=info.world_size, drop_last=True, rank=info.rank)
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    plan = Plan(batch_size, steps_per_epoch, global_batch=batch_size * cfg.accum_steps * info.world_size)
    plan_length(run, plan)
    return plan


def plan_length(run: Run, plan: Plan, measuring: dict[str, Any] | None = None) -> None:
    """The schedule's length: the recipe's (steps, or epochs), or a --budget run's, fixed after its first steps by a
    probe; ``measuring``: the state of a probe that had not fixed its count yet at a checkpoint."""
    cfg, info = run.cfg, run.info
    plan.probe = None
    if cfg.budget_s and (not cfg.steps or measuring):
        plan.probe = BudgetProbe(cfg.budget_s, reduce=lambda t: all_reduce_sum(t, info), world_size=info.world_size)
        if measuring:
            plan.probe.load_state_dict(measuring)
    plan.planned = cfg.steps or (2**62 if plan.probe else cfg.epochs * plan.steps_per_epoch)  # 2**62: until timed
    size_schedule(cfg, plan)


def size_schedule(cfg: TrainConfig, plan: Plan) -> None:
    """The plan's steps, learning rates and cadences, from its planned length (again when a budget fixes it)."""
    total = min(plan.planned, cfg.max_steps) if cfg.max_steps else plan.planned
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch) if cfg.warmup_steps is None else cfg.warmup_steps
    every = cfg.eval_every or plan.steps_per_epoch
    if cfg.budget_s:  # a short budget must not spend itself warming up, nor evaluating a tiny split's epochs
        if cfg.warmup_steps is None:
            warmup = budget_warmup(warmup, total, cfg.probe_steps or 0)
        every = cfg.eval_every or max(plan.steps_per_epoch, total // 10)
    probe_steps = cfg.probe_steps or (total if plan.probe is not None else 0)  # lr 0 while the probe times steps
    plan.total_steps, plan.eval_every = total, every
    plan.schedule = Schedule(total, warmup, cfg.lr, cfg.min_lr, probe_steps=probe_steps)
    plan.ckpt_every = cfg.checkpoint_every or every


def start(run: Run) -> RunState:
    """A fresh run: its directory, an empty metrics.jsonl and its config.yaml."""
    if run.info.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(run, [])
    save_config(run)
    barrier(run.info)
    return RunState()


def restore(run: Run, parts: Parts, plan: Plan) -> RunState:
    """The state of ``checkpoints/last``: weights, optimizer, EMA, counters and random generators."""
    saved = torch.load(run.last_dir / STATE_NAME, map_location="cpu", weights_only=False)
    weights = read_state_dict(run.last_dir / "model.safetensors", run.device)
    load_checkpoint_state(parts.model, weights, source=str(run.last_dir))
    parts.optimizer.load_state_dict(saved["optimizer"])
    if parts.ema is not None:
        parts.ema.load_state_dict(saved["ema"])
    state = RunState(
        step=saved["step"],
        best_acc=saved["best_acc"],
        best_step=saved["best_step"],
        train_time=saved["train_time_s"],
        running=own(saved, "running", run),
        stale=saved.get("stale", 0),  # older checkpoints: counting starts again
    )
    state.stop_reason = out_of_patience(run.cfg, state)  # a run that stopped early stays stopped
    set_rng_state(own(saved, "rng", run))
    if run.cfg.budget_s:  # the count as the checkpoint knew it: one still to fix is fixed where it would have been
        for key in BUDGET_RECORDS:
            setattr(run.cfg, key, saved["config"][key])
        plan_length(run, plan, measuring=saved.get("budget"))
    if run.info.is_main:  # drop evaluations logged after this checkpoint: they will be recomputed identically
        write_metrics(run, [m for m in read_metrics(run.metrics_path) if m["step"] <= state.step])
    epoch = state.step / plan.steps_per_epoch
    run.log.message(f"resumed {run.run_dir} at step {state.step}/{plan.total_steps} (epoch {epoch:.2f})")
    save_config(run)  # a budget's records as the checkpoint knew them
    barrier(run.info)
    return state


def own(saved: dict[str, Any], key: str, run: Run) -> Any:
    """This process's part of what every rank saved for itself (its random generators, its training sums)."""
    states = saved[key] if isinstance(saved[key], list) else [saved[key]] * run.info.world_size  # older runs
    if len(states) != run.info.world_size:
        raise VitlabError(
            f"{run.run_dir} was trained by {len(states)} processes; resume it with as many "
            f"(torchrun --nproc_per_node {len(states)}), not {run.info.world_size}"
        )
    return states[run.info.rank]


def step_until_done(loop: Loop, state: RunState) -> RunState:
    """Epochs of optimizer steps, with evaluations and checkpoints on the way, until the planned steps are taken or
    a stop (max_steps, the time budget, patience) comes first."""
    announce(loop)
    loop.progress.start(state.step)
    loop.logs.start(state.step)
    state.window_t = time.perf_counter()
    while state.step < loop.plan.total_steps and state.stop_reason is None:
        train_epoch(loop, state)
    loop.progress.close()
    if state.stop_reason:
        loop.run.log.message(f"stopped early: {state.stop_reason}")
    return state


def report(loop: Loop, state: RunState) -> dict[str, Any]:
    """The test split (the validation split when there is none) scored with the best checkpoint: summary.json."""
    run, splits, task = loop.run, loop.splits, loop.parts.task
    split, split_name = held_out(splits)
    result: dict[str, Any] = {"accuracy": None, "loss": None, "count": 0}
    if split is None:
        run.log.message("no held-out data: no test accuracy")
    else:
        best = from_pretrained(run.best_dir).to(run.device)
        result = task.evaluate(
            best,
            split,
            splits=splits,
            batch_size=max(run.cfg.batch_size, 256),
            device=run.device,
            precision=run.precision,
            dist_info=run.info,
        )
    metrics = read_metrics(run.metrics_path) if run.info.is_main else []
    rates = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    summary = {
        "model": loop.parts.model_name,
        "data": splits.name,
        "test_split": split_name,
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_count": result["count"],
        "train_images": len(splits.train),
        **result.get("report", {}),
        "best_val_accuracy": state.best_acc if len(splits.val) else None,
        "best_step": state.best_step,
        "steps": state.step,
        "stop_reason": state.stop_reason,
        "epochs": round(state.step / loop.plan.steps_per_epoch, 4),
        "train_time_s": round(state.train_time, 2),
        "images_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "params": loop.parts.params,
        "task": task.describe(),
        "precision": run.precision,
        "processes": run.info.world_size,
        "run_dir": str(run.run_dir),
    }
    if run.info.is_main:
        write_json(run.run_dir / "summary.json", summary)
        plot_curves(metrics, run.run_dir / "curves.png")
        curves, confusion = run.run_dir / "curves.png", result.get("confusion")
        loop.logs.on_report(summary, curves=curves, confusion=confusion, class_names=splits.class_names)
        loop.logs.close()
    return summary


def held_out(splits: DatasetSplits) -> tuple[Any, str]:
    """The split the test report scores, and its name: test, else validation, else none (never an empty one)."""
    if splits.test is not None and len(splits.test):
        return splits.test, "test"
    if len(splits.val):
        return splits.val, "val (no test split)"
    return None, "none (no held-out data)"


# --- inside the loop ---------------------------------------------------------------------------------------------
def announce(loop: Loop) -> None:
    run, plan, splits = loop.run, loop.plan, loop.splits
    if not run.info.is_main:
        return
    for line in run.intro:
        loop.progress.message(line)
    cfg = run.cfg
    length = f"{plan.total_steps} steps" if plan.probe is None else f"steps sized to {format_duration(cfg.budget_s)}"
    loop.progress.message(
        f"training {loop.parts.model_name} ({loop.parts.params:,} parameters) on {splits.name}: "
        f"{len(splits.train)} train / {len(splits.val)} val images, {length} of {plan.global_batch} images, "
        f"{run.precision}, {run.device}; {loop.parts.task.describe()}"
    )


def train_epoch(loop: Loop, state: RunState) -> None:
    """The rest of the epoch the run stands in, or less when the run ends inside it."""
    run, cfg, plan, parts = loop.run, loop.run.cfg, loop.plan, loop.parts
    epoch = state.step // plan.steps_per_epoch
    first = (state.step % plan.steps_per_epoch) * cfg.accum_steps
    parts.task.start_epoch(epoch)
    batches = loop.splits.train.loader(  # the order is (seed, epoch)'s on every rank, each taking its share
        plan.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=epoch,
        start_batch=first,
        rank=run.info.rank,
        world_size=run.info.world_size,
        drop_last=True,
        num_workers=cfg.num_workers,
    )
    parts.train_model.train()
    if cfg.freeze == "backbone":
        hold_backbone_in_eval(parts.model)
    amp = autocast(run.device, run.precision)
    t_step = time.perf_counter()
    for micro, (images, labels) in enumerate(batches, start=first):
        if micro >= plan.steps_per_epoch * cfg.accum_steps:
            break
        last_micro = (micro + 1) % cfg.accum_steps == 0
        loss_value, again = forward_backward(loop, state, images, labels, amp=amp, sync=last_micro)
        if not last_micro:
            continue
        lr = optimizer_step(loop, state, loss_value, epoch, again)
        now = time.perf_counter()
        state.train_time += now - t_step
        state.window_images += plan.global_batch
        finished = after_step(loop, state, lr=lr, now=now)
        t_step = time.perf_counter()  # evaluation and checkpointing are not training time
        if finished:
            return


def forward_backward(
    loop: Loop, state: RunState, images, labels, *, amp, sync: bool
) -> tuple[float, Callable[[], None]]:
    """One micro-batch: augmented, mixed, forward and backward (gradients synchronised when ``sync``); its loss, and
    the forward and backward of the same batch again (SAM's second pass, at the perturbed weights)."""
    run, cfg, parts = loop.run, loop.run.cfg, loop.parts
    x = to_float(images.to(run.device, non_blocking=True), parts.in_chans, parts.img_size)
    if parts.augment is not None:
        x = parts.augment(x)
    x = normalize(x, parts.mean, parts.std)
    y = labels.to(run.device, non_blocking=True)
    target = y
    if mixes(cfg) or cfg.label_smoothing:
        x, target = mixup_cutmix(
            x,
            y,
            num_classes=loop.splits.num_classes,
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            label_smoothing=cfg.label_smoothing,
        )
    no_sync = parts.train_model.no_sync() if run.info.enabled and not sync else nullcontext()
    with no_sync:
        with amp:
            out = parts.task.loss(parts.train_model, x, target, y)
        (out.loss / cfg.accum_steps).backward()
    loss_value = out.loss.item()  # one host sync per micro-step, shared by the metrics and the NaN check
    state.running += torch.tensor([loss_value * len(y), out.correct.item(), len(y)], dtype=torch.float64)

    def again() -> None:  # SAM runs with accum_steps 1, so this pass always synchronises
        with amp:
            parts.task.loss(parts.train_model, x, target, y).loss.backward()

    return loss_value, again


def optimizer_step(loop: Loop, state: RunState, loss_value: float, epoch: int, again: Callable[[], None]) -> float:
    """One optimizer step at the schedule's learning rate (returned), after the NaN check. SAM steps from the
    gradient at w + e(w): ``again`` recomputes it there."""
    cfg, parts = loop.run.cfg, loop.parts
    lr = loop.plan.schedule.lr_at(state.step)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]  # lr_scale: layer-wise decay (1 without it)
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad or math.inf)
    if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
        loop.progress.close()
        raise VitlabError(
            f"the loss became {loss_value} at step {state.step + 1} (epoch {epoch}); stopped. The last good "
            f"checkpoint is kept in {loop.run.last_dir}. Lower --lr, use --precision fp32 or set clip_grad"
        )
    if isinstance(parts.optimizer, SAM):
        parts.optimizer.first_step(zero_grad=True)
        again()
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad or math.inf)
        parts.optimizer.second_step()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.model)
    state.step += 1
    return lr


def after_step(loop: Loop, state: RunState, *, lr: float, now: float) -> bool:
    """Budget, progress, stops, evaluation and checkpoint after an optimizer step; True when the run is done."""
    run, cfg, plan = loop.run, loop.run.cfg, loop.plan
    fix_budget(loop, state)
    rate = state.window_images / max(now - state.window_t, 1e-9)
    loop.progress.update(
        state.step,
        epoch=state.step / plan.steps_per_epoch,
        loss=state.running[0].item() / max(state.running[2].item(), 1),
        acc=state.running[1].item() / max(state.running[2].item(), 1),
        images_per_s=rate,
        lr=lr,
    )
    if cfg.time_budget_s is not None:  # rank 0's clock decides, so that every rank stops at the same step
        over = torch.tensor([float(state.train_time >= cfg.time_budget_s)], dtype=torch.float64)
        if broadcast(over, run.info).item():
            state.stop_reason = f"time budget of {cfg.time_budget_s:.0f}s reached"
    if cfg.max_steps and state.step >= cfg.max_steps and state.step < plan.planned:
        state.stop_reason = state.stop_reason or f"max_steps={cfg.max_steps} reached"
    finished = state.step == plan.total_steps or state.stop_reason is not None
    if state.step % plan.eval_every == 0 or finished:
        evaluate_and_record(loop, state, lr=lr, rate=rate)
        finished = finished or state.stop_reason is not None  # out of patience: the checkpoint records the stop
    if state.step % plan.ckpt_every == 0 or finished:
        save_last(loop, state)
    barrier(run.info)
    if cfg.freeze == "backbone":  # evaluation put the whole model back in training mode
        hold_backbone_in_eval(loop.parts.model)
    return finished


def fix_budget(loop: Loop, state: RunState) -> None:
    """A --budget run's step count: fixed when its probe has timed the first steps, measured again when the warmup
    ends (`BudgetProbe.after_step`), and recorded in config.yaml, which --resume reads back."""
    cfg, plan, probe = loop.run.cfg, loop.plan, loop.plan.probe
    if probe is None:
        return
    first = probe.rate is None
    counted = probe.after_step(state.step, state.train_time)
    if counted is None:
        return
    fixed, why = counted
    if first:
        cfg.probe_steps = state.step
    cfg.steps = plan.planned = fixed
    size_schedule(cfg, plan)
    if first:  # the warmup is fixed with the first count: a later one leaves the ramp
        cfg.warmup_steps = plan.schedule.warmup_steps
        probe.refit_at = state.step + cfg.warmup_steps if cfg.warmup_steps and fixed > state.step else None
    loop.progress.set_total(plan.total_steps)
    save_config(loop.run)
    loop.progress.message(
        f"budget {format_duration(cfg.budget_s)}: {why} -> {fixed} steps in all, "
        f"{fixed / plan.steps_per_epoch:.1f} epochs (recorded in config.yaml)"
    )


def evaluate_and_record(loop: Loop, state: RunState, *, lr: float, rate: float) -> None:
    """Score the validation split, append the metrics line, keep the best checkpoint."""
    run, cfg, parts, splits = loop.run, loop.run.cfg, loop.parts, loop.splits
    val = {"loss": None, "accuracy": None}  # no validation split: nothing selects, the latest model is the best
    if len(splits.val):
        val = parts.task.evaluate(
            parts.eval_model,
            splits.val,
            splits=splits,
            batch_size=max(cfg.batch_size, 256),
            device=run.device,
            precision=run.precision,
            dist_info=run.info,
            num_workers=cfg.num_workers,
        )
    totals = all_reduce_sum(state.running.clone(), run.info)
    record = {
        "step": state.step,
        "epoch": round(state.step / loop.plan.steps_per_epoch, 4),
        "train_loss": totals[0].item() / max(totals[2].item(), 1),
        "train_acc": None if mixes(cfg) else totals[1].item() / max(totals[2].item(), 1),
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        **val.get("curves", {}),  # what a task measures at every evaluation besides (zero-shot accuracy on scenes)
        "lr": lr,
        "images_per_s": round(rate, 1),
        "time_s": round(state.train_time, 2),
    }
    if loop.on_eval is not None:
        record.update(loop.on_eval(parts.eval_model, splits, record) or {})
    state.running.zero_()
    state.window_t, state.window_images = time.perf_counter(), 0
    if run.info.is_main:
        write_metrics(run, [*read_metrics(run.metrics_path), record])
        loop.logs.on_eval(record)
        scores = f"val_acc {val['accuracy']:.4f} val_loss {val['loss']:.4f} " if val["accuracy"] is not None else ""
        loop.progress.message(f"eval step {state.step}: {scores}train_loss {record['train_loss']:.4f}")
    improved = val["accuracy"] is None or val["accuracy"] > state.best_acc
    if cfg.patience:  # rank 0's verdict counts on every rank, so all stop at the same step (classification's accuracy
        # is reduced over the ranks already; a task that scores each rank's shard apart must not split them)
        improved = bool(broadcast(torch.tensor([float(improved)], dtype=torch.float64), run.info).item())
    state.stale = 0 if improved else state.stale + 1
    state.stop_reason = state.stop_reason or out_of_patience(cfg, state)
    if improved:
        state.best_acc, state.best_step = val["accuracy"] if val["accuracy"] is not None else -1.0, state.step
        if run.info.is_main:
            with atomic_directory(run.best_dir) as tmp:
                write_pretrained(
                    parts.eval_model,
                    tmp,
                    train_config=cfg.to_dict(),
                    step=state.step,
                    val_accuracy=val["accuracy"],
                    dataset=splits.name,
                    **parts.checkpoint_meta,
                )


def out_of_patience(cfg: TrainConfig, state: RunState) -> str | None:
    """Why the run stops early when ``cfg.patience`` evaluations in a row have not raised the best accuracy."""
    if cfg.patience is None or state.stale < cfg.patience:
        return None
    return (
        f"validation accuracy has not improved for {state.stale} evaluations (patience={cfg.patience}); the best, "
        f"{state.best_acc:.4f}, was at step {state.best_step}"
    )


def save_last(loop: Loop, state: RunState) -> None:
    """``checkpoints/last``: what --resume needs to take the very steps an uninterrupted run takes."""
    run, parts = loop.run, loop.parts
    # every rank's generators and training sums since the last evaluation: each resumes its own
    ranks = all_gather_objects({"rng": rng_state(), "running": state.running}, run.info)
    probe = loop.plan.probe
    if not run.info.is_main:
        return
    saved = {
        "optimizer": parts.optimizer.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema else None,
        "step": state.step,
        "best_acc": state.best_acc,
        "best_step": state.best_step,
        "train_time_s": state.train_time,
        "stale": state.stale,
        "running": [r["running"] for r in ranks],
        "rng": [r["rng"] for r in ranks],
        "budget": probe.state_dict() if probe is not None and probe.measuring else None,  # a count still to fix
        "config": run.cfg.to_dict(),
    }
    with atomic_directory(run.last_dir) as tmp:
        write_pretrained(
            parts.model, tmp, train_config=run.cfg.to_dict(), step=state.step, dataset=loop.splits.name,
            **parts.checkpoint_meta,
        )  # fmt: skip
        torch.save(saved, tmp / STATE_NAME)


def save_config(run: Run) -> None:
    if run.info.is_main:
        save_yaml(run.cfg, run.run_dir / "config.yaml")


def mixes(cfg: TrainConfig) -> bool:
    """Mixup or cutmix: targets are mixed, a training accuracy would mean nothing."""
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def write_metrics(run: Run, records: list[dict[str, Any]]) -> None:
    """metrics.jsonl, replaced whole (a kill mid-write leaves the previous file, never a torn line): a run has tens of
    evaluations, rewriting them costs nothing."""
    write_text_atomic(run.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
