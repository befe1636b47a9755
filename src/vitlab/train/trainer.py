"""The training loop, top to bottom: data -> task -> model -> optimizer -> (resume) -> steps with periodic evaluation
and atomic checkpoints -> test report.

What is learned is the task's business (`vitlab.train.tasks`): the loop hands it each batch and backpropagates the
loss it returns (classification, distillation from a teacher, ...); it never branches on the kind of model.

Exact resume: the sample order of an epoch depends only on (seed, epoch), every other random draw (augmentation,
dropout, stochastic depth, mixup) comes from torch's global generator whose state is checkpointed, and the
learning rate is a function of the step. A teacher is named in the run's config and runs deterministically in eval
mode. So a run resumed from ``checkpoints/last`` takes bit-identical steps to one that never stopped (on CPU, with the
same thread count).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab._io import atomic_directory, recover_directory, write_json
from vitlab._registry import get_variant
from vitlab.checkpoint import from_pretrained, load_checkpoint_state, read_state_dict, write_pretrained
from vitlab.data import (
    build_augment,
    build_dataset,
    limit_images,
    mixup_cutmix,
    normalize,
    subset_classes,
    to_float,
)
from vitlab.errors import VitlabError
from vitlab.layers import to_2tuple
from vitlab.stats import count_params
from vitlab.train.budget import BudgetProbe, Schedule, budget_warmup
from vitlab.train.config import TrainConfig, save_yaml
from vitlab.train.defaults import apply_data_defaults
from vitlab.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vitlab.train.evaluate import autocast
from vitlab.train.optim import ModelEma, build_optimizer
from vitlab.train.precision import resolve_precision
from vitlab.train.report import Progress, format_duration, plot_curves, read_metrics
from vitlab.train.tasks import build_task
from vitlab.train.transfer import freeze_backbone, hold_backbone_in_eval, init_model

STATE_NAME = "trainer_state.pt"
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
        return _train(cfg, resume, info, on_eval)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, resume: bool, info: DistInfo, on_eval: OnEval | None) -> dict[str, Any]:
    chosen = None
    if cfg.data.startswith("captions:") and not cfg.text_model:  # caption sets train CLIP, not a classifier
        raise VitlabError(f"{cfg.data} is a caption set: train a CLIP model on it with `vitlab clip train`")
    if cfg.model == "auto" and not cfg.init:  # a model and schedule that fit the data, recorded in config.yaml
        values, chosen = apply_data_defaults(cfg.to_dict(), cfg.explicit_fields(), world_size=info.world_size)
        cfg = TrainConfig.from_dict(values)
    device = pick_device(cfg.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    last_dir, best_dir = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best"
    for d in (last_dir, best_dir):  # a run killed inside a checkpoint swap left the previous one at <dir>.old
        recover_directory(d)
    if not resume and (last_dir / STATE_NAME).exists():
        raise VitlabError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --out")
    if resume and not (last_dir / STATE_NAME).exists():
        raise VitlabError(f"nothing to resume in {run_dir}: {last_dir / STATE_NAME} does not exist")
    log = Progress(0, enabled=info.is_main)
    # what the run chose and adapted, said once it has started (a user error before it stays one line)
    intro = [chosen] if chosen else []
    precision, why = resolve_precision(cfg.precision, device)
    intro.append(f"precision {precision} ({why})")

    # --- data ---------------------------------------------------------------------------------------------
    if cfg.init:  # the init checkpoint's architecture decides the input; a folder is decoded at its defaults
        in_chans, img = cfg.model_args.get("in_chans"), cfg.model_args.get("img_size")
    else:
        _, model_kwargs, model_cfg = get_variant(cfg.model)
        in_chans = cfg.model_args.get("in_chans", model_kwargs.get("in_chans", model_cfg["input_size"][0]))
        img = cfg.model_args.get("img_size", model_kwargs.get("img_size", model_cfg["input_size"][1:]))
    img_size = None if img is None else to_2tuple(img)
    data_args = dict(
        img_size=img_size,
        in_chans=in_chans,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        skip_bad_images=cfg.skip_bad_images,
    )
    try:
        splits = build_dataset(cfg.data, data_dir=cfg.data_dir, **data_args)
    except VitlabError as e:
        if not cfg.fallback_data:
            raise
        log.message(f"{cfg.data} is not available here ({e}); training on {cfg.fallback_data} instead")
        splits = build_dataset(cfg.fallback_data, **data_args)
    if splits.skipped:
        log.message(f"skipped {len(splits.skipped)} unreadable images (--skip-bad-images)")
    if cfg.classes is not None:
        splits = subset_classes(splits, cfg.classes)
        intro.append(
            f"training on {splits.num_classes} classes ({', '.join(splits.class_names)}), relabelled 0-"
            f"{splits.num_classes - 1}"
        )
    if cfg.train_images is not None or cfg.test_images is not None:
        splits = limit_images(splits, train=cfg.train_images, test=cfg.test_images, seed=cfg.seed)
    intro += splits.notes
    mean, std = splits.mean, splits.std
    num_classes = splits.num_classes

    # --- task, model, optimizer ---------------------------------------------------------------------------
    pretrained = None
    if cfg.init:  # transfer: architecture, input size and normalisation come from the pretrained checkpoint
        if cfg.drop_path_rate:
            raise VitlabError("--init keeps the checkpoint's architecture; drop_path_rate cannot be set with it")
        seed_everything(cfg.seed)  # a family whose new classifier is not zero-initialised draws it here
        pretrained, why = init_model(
            cfg.init, splits, model_args=cfg.model_args, resume_dir=last_dir if resume else None
        )
        intro.append(why)
        in_chans, img_size = pretrained.default_cfg["input_size"][0], tuple(pretrained.default_cfg["input_size"][1:])
        mean, std = tuple(pretrained.pretrained_cfg["mean"]), tuple(pretrained.pretrained_cfg["std"])
    # the task (and its teacher) before seeding: building a teacher draws random numbers, the student's init must not
    # depend on whether there is one
    task = build_task(
        cfg,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
        device=device,
        splits=splits,
    )
    seed_everything(cfg.seed)
    # transfer starts from the pretrained model; otherwise the task builds its model (a classifier, a CLIP pair)
    model = pretrained if pretrained is not None else task.build_model(cfg, splits)
    model.to(device)
    task.setup(model)
    if cfg.freeze == "backbone":
        intro.append(f"--freeze backbone: training only the classifier ({freeze_backbone(model):,} parameters)")
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
    optimizer = build_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, layer_decay=cfg.layer_decay
    )
    params = count_params(model)
    model_name = model.model_name if cfg.init else cfg.model
    checkpoint_meta = {"init": model.pretrained_cfg["init"]} if cfg.init else {}
    train_model: torch.nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

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
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0

    batch_size, shrunk = fit_batch(
        len(splits.train), cfg.batch_size, accum_steps=cfg.accum_steps, world_size=info.world_size
    )
    if shrunk:
        intro.append(shrunk)
    micro_per_epoch = splits.train.num_batches(batch_size, world_size=info.world_size, drop_last=True, rank=info.rank)
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    planned = cfg.steps or cfg.epochs * steps_per_epoch  # --budget fixes cfg.steps after its first steps
    probe, refit_at = None, None  # refit_at: the warmup's end, where the run that probed measures again
    if cfg.budget_s and not cfg.steps:
        probe = BudgetProbe(cfg.budget_s, reduce=lambda t: all_reduce_sum(t, info), world_size=info.world_size)
        planned = 2**62  # until the first steps have been timed

    def sized_schedule() -> tuple[int, Schedule, int]:
        """Steps, learning rates and evaluation cadence; a budget's are known once its probe has timed steps."""
        total = min(planned, cfg.max_steps) if cfg.max_steps else planned
        warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_steps is None else cfg.warmup_steps
        every = cfg.eval_every or steps_per_epoch
        if cfg.budget_s:  # a short budget must not spend itself warming up, nor evaluating a tiny split's epochs
            if cfg.warmup_steps is None:
                warmup = budget_warmup(warmup, total, cfg.probe_steps or 0)
            every = cfg.eval_every or max(steps_per_epoch, total // 10)
        probe_steps = cfg.probe_steps or (total if probe is not None else 0)  # lr 0 while the probe times steps
        return total, Schedule(total, warmup, cfg.lr, cfg.min_lr, probe_steps=probe_steps), every

    total_steps, schedule, eval_every = sized_schedule()
    ckpt_every = cfg.checkpoint_every or eval_every
    global_batch = batch_size * cfg.accum_steps * info.world_size

    # --- state (fresh or resumed) -------------------------------------------------------------------------
    step, best_acc, best_step, train_time = 0, -1.0, 0, 0.0
    running = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count since the last evaluation
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        state = torch.load(last_dir / STATE_NAME, map_location="cpu", weights_only=False)
        load_checkpoint_state(model, read_state_dict(last_dir / "model.safetensors", device), source=str(last_dir))
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, best_acc, best_step = state["step"], state["best_acc"], state["best_step"]
        train_time, running = state["train_time_s"], state["running"]
        set_rng_state(state["rng"])
        if info.is_main:  # drop evaluations logged after this checkpoint: they will be recomputed identically
            kept = [m for m in read_metrics(metrics_path) if m["step"] <= step]
            metrics_path.write_text("".join(_json_line(m) for m in kept))
        log.message(f"resumed {run_dir} at step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f})")
    elif info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    if info.is_main:  # on resume too: flags may have extended the run (--epochs)
        save_yaml(cfg, run_dir / "config.yaml")
    barrier(info)

    def save_last() -> None:
        if not info.is_main:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema else None,
            "step": step,
            "best_acc": best_acc,
            "best_step": best_step,
            "train_time_s": train_time,
            "running": running,
            "rng": rng_state(),
            "config": cfg.to_dict(),
        }
        with atomic_directory(last_dir) as tmp:
            write_pretrained(model, tmp, train_config=cfg.to_dict(), step=step, dataset=splits.name, **checkpoint_meta)
            torch.save(state, tmp / STATE_NAME)

    # --- the loop ----------------------------------------------------------------------------------------------
    progress = Progress(total_steps, enabled=info.is_main, log_every=cfg.log_every)
    if info.is_main:
        for line in intro:
            progress.message(line)
        length = f"{total_steps} steps" if probe is None else f"steps sized to {format_duration(cfg.budget_s)}"
        progress.message(
            f"training {model_name} ({params:,} parameters) on {splits.name}: {len(splits.train)} train / "
            f"{len(splits.val)} val images, {length} of {global_batch} images, {precision}, {device}; "
            f"{task.describe()}"
        )
    progress.start(step)
    amp = autocast(device, precision)
    eval_model = ema.module if ema else model
    stop_reason = None
    window_t, window_images = time.perf_counter(), 0
    while step < total_steps and stop_reason is None:
        epoch = step // steps_per_epoch
        first = (step % steps_per_epoch) * cfg.accum_steps
        batches = splits.train.loader(
            batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
            start_batch=first,
            rank=info.rank,
            world_size=info.world_size,
            drop_last=True,
            num_workers=cfg.num_workers,
        )
        train_model.train()
        if cfg.freeze == "backbone":
            hold_backbone_in_eval(model)
        t_step = time.perf_counter()
        for micro, (images, labels) in enumerate(batches, start=first):
            if micro >= steps_per_epoch * cfg.accum_steps:
                break
            x = to_float(images.to(device, non_blocking=True), in_chans, img_size)
            if augment is not None:
                x = augment(x)
            x = normalize(x, mean, std)
            y = labels.to(device, non_blocking=True)
            if mixing or cfg.label_smoothing:
                x, target = mixup_cutmix(
                    x,
                    y,
                    num_classes=num_classes,
                    mixup_alpha=cfg.mixup_alpha,
                    cutmix_alpha=cfg.cutmix_alpha,
                    label_smoothing=cfg.label_smoothing,
                )
            else:
                target = y
            last_micro = (micro + 1) % cfg.accum_steps == 0
            sync = train_model.no_sync() if info.enabled and not last_micro else nullcontext()
            with sync:
                with amp:
                    out = task.loss(train_model, x, target, y)
                (out.loss / cfg.accum_steps).backward()
            loss_value = out.loss.item()  # one host sync per micro-step, shared by the metrics and the NaN check
            running += torch.tensor([loss_value * len(y), out.correct.item(), len(y)], dtype=torch.float64)
            if not last_micro:
                continue

            # one optimizer step
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # lr_scale: layer-wise decay (1 without it)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
            if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
                progress.close()
                raise VitlabError(
                    f"the loss became {loss_value} at step {step + 1} (epoch {epoch}); stopped. The last good "
                    f"checkpoint is kept in {last_dir}. Lower --lr, use --precision fp32 or set clip_grad"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            now = time.perf_counter()
            train_time += now - t_step
            t_step = now
            window_images += global_batch
            fixed, why = None, ""  # a budget's step count: fixed by the probe, then measured once more
            if probe is not None and probe.rate is None:
                if (fixed := probe.observe(step, train_time)) is not None:
                    cfg.probe_steps = step
                    why = f"{probe.rate:.2f} steps/s over the first {step} steps (at lr 0)"
                    if fixed == step:
                        why += "; measuring took the whole budget, no step is left to learn: raise --budget"
            elif step == refit_at:
                fixed, refit_at = probe.refit(step, train_time), None
                why = f"{probe.rate:.2f} steps/s over the first {step} steps (the warmup), {cfg.steps} before"
            if fixed is not None:
                cfg.steps = planned = fixed
                total_steps, schedule, eval_every = sized_schedule()
                if cfg.probe_steps == step:  # the warmup is fixed with the first count: a later one leaves the ramp
                    cfg.warmup_steps = schedule.warmup_steps
                    refit_at = step + cfg.warmup_steps if cfg.warmup_steps and fixed > step else None
                ckpt_every = cfg.checkpoint_every or eval_every
                progress.set_total(total_steps)
                if info.is_main:  # the count is part of the recipe from now on: --resume reads it back
                    save_yaml(cfg, run_dir / "config.yaml")
                progress.message(
                    f"budget {format_duration(cfg.budget_s)}: {why} -> {fixed} steps in all, "
                    f"{fixed / steps_per_epoch:.1f} epochs (recorded in config.yaml)"
                )
            rate = window_images / max(now - window_t, 1e-9)
            progress.update(
                step,
                epoch=step / steps_per_epoch,
                loss=running[0].item() / max(running[2].item(), 1),
                acc=running[1].item() / max(running[2].item(), 1),
                images_per_s=rate,
                lr=lr,
            )
            if cfg.time_budget_s is not None and train_time >= cfg.time_budget_s:
                stop_reason = f"time budget of {cfg.time_budget_s:.0f}s reached"
            if cfg.max_steps and step >= cfg.max_steps and step < planned:
                stop_reason = stop_reason or f"max_steps={cfg.max_steps} reached"
            finished = step == total_steps or stop_reason is not None

            if step % eval_every == 0 or finished:
                val = task.evaluate(
                    eval_model,
                    splits.val,
                    splits=splits,
                    batch_size=max(cfg.batch_size, 256),
                    device=device,
                    precision=precision,
                    dist_info=info,
                    num_workers=cfg.num_workers,
                )
                totals = all_reduce_sum(running.clone(), info)
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "train_loss": totals[0].item() / max(totals[2].item(), 1),
                    "train_acc": None if mixing else totals[1].item() / max(totals[2].item(), 1),
                    "val_loss": val["loss"],
                    "val_acc": val["accuracy"],
                    "lr": lr,
                    "images_per_s": round(rate, 1),
                    "time_s": round(train_time, 2),
                }
                if on_eval is not None:
                    record.update(on_eval(eval_model, splits, record) or {})
                running.zero_()
                window_t, window_images = time.perf_counter(), 0
                if info.is_main:
                    with metrics_path.open("a") as f:
                        f.write(_json_line(record))
                    progress.message(
                        f"eval step {step}: val_acc {val['accuracy']:.4f} val_loss {val['loss']:.4f} "
                        f"train_loss {record['train_loss']:.4f}"
                    )
                if val["accuracy"] > best_acc:
                    best_acc, best_step = val["accuracy"], step
                    if info.is_main:
                        with atomic_directory(best_dir) as tmp:
                            write_pretrained(
                                eval_model,
                                tmp,
                                train_config=cfg.to_dict(),
                                step=step,
                                val_accuracy=best_acc,
                                dataset=splits.name,
                                **checkpoint_meta,
                            )
            if step % ckpt_every == 0 or step % eval_every == 0 or finished:
                save_last()
            barrier(info)
            if cfg.freeze == "backbone":  # evaluation put the whole model back in training mode
                hold_backbone_in_eval(model)
            t_step = time.perf_counter()  # evaluation and checkpointing are not training time
            if finished:
                break
    progress.close()
    if stop_reason:
        log.message(f"stopped early: {stop_reason}")

    # --- final report on the test split, with the best checkpoint -------------------------------------------
    summary = final_report(
        run_dir,
        splits,
        device,
        cfg,
        info,
        params=params,
        train_time=train_time,
        step=step,
        steps_per_epoch=steps_per_epoch,
        best_acc=best_acc,
        best_step=best_step,
        task=task,
        precision=precision,
        model_name=model_name,
    )
    return summary


def final_report(run_dir: Path, splits, device, cfg: TrainConfig, info: DistInfo, **facts: Any) -> dict[str, Any]:
    best = from_pretrained(run_dir / "checkpoints" / "best").to(device)
    split = splits.test if splits.test is not None else splits.val
    result = facts["task"].evaluate(
        best,
        split,
        splits=splits,
        batch_size=max(cfg.batch_size, 256),
        device=device,
        precision=facts["precision"],
        dist_info=info,
    )
    metrics = read_metrics(run_dir / "metrics.jsonl") if info.is_main else []
    rates = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    summary = {
        "model": facts["model_name"],
        "data": splits.name,
        "test_split": "test" if splits.test is not None else "val (no test split)",
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_count": result["count"],
        "train_images": len(splits.train),
        **result.get("report", {}),
        "best_val_accuracy": facts["best_acc"],
        "best_step": facts["best_step"],
        "steps": facts["step"],
        "epochs": round(facts["step"] / facts["steps_per_epoch"], 4),
        "train_time_s": round(facts["train_time"], 2),
        "images_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "params": facts["params"],
        "task": facts["task"].describe(),
        "precision": facts["precision"],
        "processes": info.world_size,
        "run_dir": str(run_dir),
    }
    if info.is_main:
        write_json(run_dir / "summary.json", summary)
        plot_curves(metrics, run_dir / "curves.png")
    return summary


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"
