"""Training configuration: one flat dataclass, filled from defaults < YAML recipe < command-line flags.

The configuration stops here: the trainer reads it and passes plain keyword arguments to the model builder,
the datasets and the optimizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitlab.errors import VitlabError, closest
from vitlab.train.budget import parse_duration
from vitlab.train.precision import PRECISIONS

FREEZE_CHOICES = ("backbone",)


@dataclass
class TrainConfig:
    # what to train on what
    model: str = "auto"  # auto: chosen from the data (vitlab.train.defaults), with the schedule the user left out
    model_args: dict[str, Any] = field(default_factory=dict)  # overrides for create_model (depth, embed_dim, ...)
    data: str = "fashion-mnist"
    data_dir: str | None = None
    fallback_data: str | None = None  # trained on instead, saying so, when `data` cannot be had (e.g. offline)
    val_fraction: float = 0.1
    classes: str | int | list[str | int] | None = None  # a class subset, e.g. "0-5" or "cat,dog" (relabelled 0..k-1)
    train_images: int | None = None  # a stratified subset of the training split of this size (small-data studies)
    test_images: int | None = None  # the test report on a stratified subset of the test split (quick studies)
    skip_bad_images: bool = False
    num_workers: int = 2  # folder datasets only; in-memory datasets are batched by indexing
    # schedule
    epochs: int = 10
    batch_size: int = 128  # per process
    accum_steps: int = 1
    lr: float = 1e-3  # peak learning rate for the whole batch (batch_size * accum_steps * processes)
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 1.0
    ema_decay: float | None = None  # e.g. 0.999; evaluation and the best checkpoint then use the EMA weights
    drop_path_rate: float = 0.0
    # transfer (ViT paper, section 3.2): start from a pretrained checkpoint with a new head
    init: str | None = None  # a checkpoint (vitlab, HF, timm, hf-hub:ORG/REPO) or a model name with published weights
    freeze: str | None = None  # backbone: train only the classifier (a linear probe)
    layer_decay: float | None = None  # e.g. 0.75: learning rate x layer_decay ** (depth of the head - depth)
    # augmentation (all off by default: short CPU runs do better without)
    random_resized_crop: float | None = None  # minimum crop scale, e.g. 0.35
    hflip: bool = False
    randaugment: tuple[int, int] | None = None  # (number of ops, magnitude)
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    # distillation (DeiT): a teacher checkpoint (vitlab, HF or timm; any architecture), hard or soft
    teacher: str | None = None
    distill: str | None = None  # hard | soft; hard (the paper's best) when a teacher is given
    distill_tau: float = 3.0  # soft: temperature (the paper's 3.0)
    distill_alpha: float = 0.1  # soft: weight of the teacher term (the paper's 0.1)
    # CLIP (vitlab clip train): a text tower makes the run contrastive image-text training on a caption set
    # (data: captions:...); `model` is then the image tower. clip_args: embed_dim, lock_text, lock_image,
    # text_args (tower sizes), bpe_vocab_size; see vitlab.train.contrastive
    text_model: str | None = None
    clip_args: dict[str, Any] = field(default_factory=dict)
    # execution
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware has it natively
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads; default: torch's choice
    seed: int = 0
    # run directory and bookkeeping
    out: str | None = None
    eval_every: int | None = None  # steps; default once per epoch
    checkpoint_every: int | None = None  # steps; default at every evaluation
    log_every: int | None = None  # steps between plain progress lines when not on a terminal
    max_steps: int | None = None  # stop early (for tests and time budgets)
    time_budget_s: float | None = None  # stop training after this many seconds
    # a schedule sized to a budget of training time (600, "90s", "10m"): warmup and cosine end at the budget
    budget_s: float | str | None = None
    steps: int | None = None  # the schedule's length in optimizer steps (instead of epochs); --budget records it
    probe_steps: int | None = None  # --budget: the first steps, at lr 0, whose throughput sized the schedule
    warmup_steps: int | None = None  # the warmup in optimizer steps (instead of warmup_epochs); --budget records it

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        values: dict[str, Any] = {}
        if yaml_file is not None:
            values.update(load_yaml(yaml_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise VitlabError(f"unknown training option {key!r}.{closest(key, names)}")
        cfg = cls(**values)
        cfg.validate()
        cfg.given = set(values)  # what the recipe and flags set; `model: auto` fills in only the rest
        return cfg

    def explicit_fields(self) -> set[str]:
        """The fields a user set: those `from_dict` was given, else (a TrainConfig built in Python) those that
        differ from their defaults."""
        given = getattr(self, "given", None)
        if given is not None:
            return set(given)
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)}

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise VitlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise VitlabError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise VitlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise VitlabError(f"lr must be positive, got {self.lr}")
        if self.freeze is not None and self.freeze not in FREEZE_CHOICES:
            raise VitlabError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise VitlabError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.distill is not None and self.distill not in ("hard", "soft"):
            raise VitlabError(f"distill must be hard or soft, got {self.distill!r}")
        if self.distill is not None and not self.teacher:
            raise VitlabError(f"--distill {self.distill} needs a teacher: add --teacher CHECKPOINT")
        if self.teacher and self.distill is None:
            self.distill = "hard"
        if self.distill_tau <= 0:
            raise VitlabError(f"distill_tau must be positive, got {self.distill_tau}")
        if not 0 <= self.distill_alpha <= 1:
            raise VitlabError(f"distill_alpha must be between 0 and 1, got {self.distill_alpha}")
        if self.budget_s is not None:
            self.budget_s = parse_duration(self.budget_s)
        if self.steps is not None and self.steps < 1:
            raise VitlabError(f"steps must be at least 1, got {self.steps}")
        if self.betas is not None:
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.randaugment is not None:
            self.randaugment = tuple(self.randaugment)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VitlabError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise VitlabError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VitlabError(f"config file {str(path)!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
