"""Training configuration: one flat dataclass, filled from defaults < YAML recipe < command-line flags.

The configuration stops here: the trainer reads it and passes plain keyword arguments to the model builder,
the datasets and the optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitlab._io import write_text_atomic
from vitlab.errors import VitlabError, closest
from vitlab.train.budget import parse_duration
from vitlab.train.precision import PRECISIONS

FREEZE_CHOICES = ("backbone",)
# where evaluations go: metrics.jsonl always (--resume and the curves read it), TensorBoard event files when asked
LOG_BACKENDS = ("jsonl", "tensorboard")
ATTN_INITS = ("default", "mimetic")
# model_args keys the trainer sets itself: num_classes (the data's), drop_path_rate (its own option), weights (--init)
RESERVED_MODEL_ARGS = {
    "num_classes": "comes from the data (choose a class subset with --classes)",
    "drop_path_rate": "is the training option drop_path_rate: set it there, once",
    "pretrained": "is --init: fine-tune from published weights with --init MODEL_NAME",
}


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
    # small-data levers (docs/small_data.md): sharpness-aware minimisation (rho > 0 turns it on; adaptive: ASAM) and
    # the self-attention initialisation (default: the model's own; mimetic: Trockman & Kolter 2023)
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    attn_init: str = "default"
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
    # captioning (vitlab caption train): caption_args (decoder, decoder_args, tokenizer, min_count, ...; see
    # vitlab.train.captioning.CAPTION_ARGS) make the run train a caption decoder on a caption set over `model`
    caption_args: dict[str, Any] = field(default_factory=dict)
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
    log: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl, tensorboard (RUN/tensorboard/, rank 0)
    max_steps: int | None = None  # stop early (for tests and time budgets)
    # stop once this many evaluations in a row have not raised the best validation accuracy (None: never)
    patience: int | None = None
    time_budget_s: float | None = None  # stop training after this many seconds
    # a schedule sized to a budget of training time (600, "90s", "10m"): warmup and cosine end at the budget
    budget_s: float | str | None = None
    steps: int | None = None  # the schedule's length in optimizer steps (instead of epochs); --budget records it
    probe_steps: int | None = None  # --budget: the first steps, at lr 0, whose throughput sized the schedule
    warmup_steps: int | None = None  # the warmup in optimizer steps (instead of warmup_epochs); --budget records it

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        recipe = load_yaml(yaml_file) if yaml_file is not None else {}
        return cls.from_dict(merge_options(recipe, {k: v for k, v in overrides.items() if v is not None}))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise VitlabError(f"unknown training option {key!r}.{closest(key, names)}")
        cfg = cls(**values)  # __post_init__ reads each value as its field's type and validates
        cfg.given = set(values)  # what the recipe and flags set; `model: auto` fills in only the rest
        return cfg

    def __post_init__(self) -> None:
        self.validate()

    def explicit_fields(self) -> set[str]:
        """The fields a user set: those `from_dict` was given, else (a TrainConfig built in Python) those that
        differ from their defaults."""
        given = getattr(self, "given", None)
        if given is not None:
            return set(given)
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)}

    def validate(self) -> None:
        for f, kind in _field_types().items():  # "1e-3" from a flag or a YAML 1.1 reader is the float 0.001
            setattr(self, f, coerce(f, getattr(self, f), kind))
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
        if not 0 <= self.drop_path_rate < 1:
            raise VitlabError(
                f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}: at 1 the last block is always dropped"
            )
        self._validate_model_args()
        self._validate_log()
        self._validate_levers()
        if self.distill_tau <= 0:
            raise VitlabError(f"distill_tau must be positive, got {self.distill_tau}")
        if not 0 <= self.distill_alpha <= 1:
            raise VitlabError(f"distill_alpha must be between 0 and 1, got {self.distill_alpha}")
        if self.budget_s is not None:
            self.budget_s = parse_duration(self.budget_s)
        if self.patience is not None and self.patience < 1:
            raise VitlabError(f"patience must be at least 1 evaluation (or unset), got {self.patience}")
        if self.steps is not None and self.steps < 1:
            raise VitlabError(f"steps must be at least 1, got {self.steps}")
        if self.betas is not None:
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.randaugment is not None:
            self.randaugment = tuple(self.randaugment)  # type: ignore[assignment]

    def _validate_model_args(self) -> None:
        for key, value in self.model_args.items():
            if key in RESERVED_MODEL_ARGS:
                raise VitlabError(f"model_args.{key} {RESERVED_MODEL_ARGS[key]}")
            # a dropout or drop-path probability of 1 zeroes every activation it touches
            if key.endswith("drop_rate") and not (isinstance(value, int | float) and 0 <= value < 1):
                raise VitlabError(f"model_args.{key} must be a probability in [0, 1), got {value!r}")

    def _validate_levers(self) -> None:
        if self.sam_rho < 0:
            raise VitlabError(f"sam_rho must be 0 (off) or positive, got {self.sam_rho}")
        if self.sam_rho and self.accum_steps > 1:
            raise VitlabError("sam_rho needs accum_steps=1: SAM's second pass would have to replay every micro-batch")
        if self.attn_init not in ATTN_INITS:
            raise VitlabError(f"attn_init must be one of {', '.join(ATTN_INITS)}, got {self.attn_init!r}")
        if self.attn_init != "default" and self.init:
            raise VitlabError(f"attn_init={self.attn_init} would overwrite the --init checkpoint's attention weights")

    def _validate_log(self) -> None:
        for backend in self.log:
            if backend not in LOG_BACKENDS:
                hint = closest(backend, LOG_BACKENDS)
                raise VitlabError(f"log: no backend {backend!r}; choose among {', '.join(LOG_BACKENDS)}.{hint}")
        self.log = ["jsonl", *dict.fromkeys(b for b in self.log if b != "jsonl")]  # jsonl is always written

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
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
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a kill mid-write leaves the old file


# --- reading values: YAML numbers as YAML 1.2 reads them, no key twice, each field's type --------------------------
class DuplicateKeyError(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes. Numbers like ``1e-3`` and ``1E-5`` are floats, as in YAML 1.2 (PyYAML
    implements YAML 1.1, whose floats need a dot and a signed exponent, ``1.0e-3``, and reads ``1e-3`` as a string).
    A key given twice in one mapping is an error: YAML forbids it, and PyYAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKeyError(f"{key!r} is given twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text to Python values, as every recipe and ``--set`` value is read (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """Options from ``--set KEY=VALUE`` items: VALUE is read as YAML; ``KEY.SUB=VALUE`` sets one key of a mapping
    option (``model_args.depth=6``). Giving a key twice, in any spelling, is an error rather than last wins."""
    out: dict[str, Any] = {}
    given: set[str] = set()
    for item in items:
        if "=" not in item:
            raise VitlabError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        key = key.replace("-", "_")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as e:
            raise VitlabError(f"--set {key}: cannot read {text!r}: {str(e).splitlines()[0]}") from None
        name, dot, sub = key.partition(".")
        if dot:
            if name not in _MAPPING_FIELDS:
                raise VitlabError(f"--set {key}: {name} is not a mapping option; write --set {name}=VALUE")
            value = {sub: value}
        keys = [f"{name}.{k}" for k in value] if name in _MAPPING_FIELDS and isinstance(value, dict) else [name]
        for k in keys:  # model_args.depth clashes with model_args.depth, and with a whole model_args=...
            if k in given or k.partition(".")[0] in given or any(g.startswith(f"{k}.") for g in given):
                raise VitlabError(f"--set gives {k} twice; give each option once")
        given.update(keys)
        out = merge_options(out, {name: value})
    return out


def merge_options(*layers: dict[str, Any]) -> dict[str, Any]:
    """Options from several sources, later ones winning (defaults < recipe < flags). A mapping option (model_args,
    clip_args) merges key by key, so that a flag changes one model argument without dropping the recipe's others."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merge = key in _MAPPING_FIELDS and isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = {**out[key], **value} if merge else value
    return out


_NULL = ("none", "null", "~", "")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` read as the type ``kind`` (a field's annotation): ``"1e-3"`` -> 0.001, ``"1_000"`` -> 1000,
    ``"None"`` -> None for an optional field, ``[0.9, 0.99]`` -> a tuple; else a one-line `VitlabError` naming
    ``key`` and the type it takes."""
    try:
        return _as(value, kind)
    except (TypeError, ValueError):
        raise VitlabError(f"{key} must be {_describe(kind)}, got {value!r}") from None


def _as(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL)):
            return None
        options = [a for a in args if a is not type(None)]
        # a value of one of the types stays that type (classes: 3 is an index, "3" a name); then conversions
        for a in sorted(options, key=lambda a: not _is(value, a)):
            try:
                return _as(value, a)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        return _exactly(value, bool)
    if kind is int:
        number = _as(value, float)
        if not number.is_integer():
            raise ValueError(value)
        return int(number) if not isinstance(value, int) else value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError(value)
        number = float(value.strip() if isinstance(value, str) else value)  # "1e-3", ".5", "1_000"
        if math.isnan(number):
            raise ValueError(value)
        return number
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError(value)
        return str(value)
    if origin in (tuple, list):
        items = _items(value)
        if origin is list:
            return [_as(v, args[0]) for v in items]
        if len(items) != len(args):
            raise ValueError(value)
        return tuple(_as(v, a) for v, a in zip(items, args))
    if origin is dict:
        return dict(_exactly(value, dict))
    return value


def _is(value: Any, kind: Any) -> bool:
    base = typing.get_origin(kind) or kind
    if not isinstance(base, type) or (isinstance(value, bool) and base is not bool):
        return False
    return isinstance(value, base)


def _exactly(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(value)
    return value


def _items(value: Any) -> list[Any]:
    """A list or tuple as is; ``"0.9,0.999"`` or ``"(0.9, 0.999)"`` (a flag's text) split at the commas."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.strip().strip("()[]").split(",")]
    raise TypeError(value)


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(options + ["null"] * (type(None) in args))
    if origin is tuple and len(set(args)) == 1:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ')}s"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return "a list"
    words = {float: "a number", int: "a whole number", bool: "true or false", str: "a string", dict: "a mapping"}
    return words.get(origin or kind, str(kind))


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


_MAPPING_FIELDS = {name for name, kind in _field_types().items() if typing.get_origin(kind) is dict}
