"""Training from a pretrained checkpoint, as the ViT paper transfers (Dosovitskiy et al., ICLR 2021,
arXiv:2010.11929, section 3.2 and appendix B.1.1): `vitlab train --init CHECKPOINT_OR_NAME`.

* `init_model`: the pretrained model with a fresh zero-initialised classifier for the data's classes, its input
  channels adapted to the data's, at the checkpoint's input size (or ``model_args``' ``img_size``; the data is
  resized to it on the device, as the paper fine-tunes CIFAR's 32-pixel images at 384); see
  `vitlab.checkpoint.load_for_finetuning`. Normalisation: the checkpoint's mean and std when the channels match
  (the features were learned on inputs normalised that way), the data's when the stem was adapted to other
  channels. Both choices and the checkpoint's origin are recorded in the new checkpoint.
* `freeze_backbone` / `hold_backbone_in_eval`: a linear probe trains only the classifier (the parameters under the
  model's ``head_names``); the frozen backbone runs as at inference (BatchNorm statistics kept, no dropout).
* Layer-wise learning-rate decay (BEiT, Bao et al. 2022) is `vitlab.train.optim.param_groups(..., layer_decay=)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from vitlab.checkpoint import CONFIG_NAME, from_pretrained, load_for_finetuning
from vitlab.data import DatasetSplits
from vitlab.errors import VitlabError
from vitlab.layers import to_2tuple

INIT_MODEL_ARGS = ("img_size", "in_chans")  # what model_args may still change in a model read from --init


def init_model(
    source: str, splits: DatasetSplits, *, model_args: dict[str, Any], resume_dir: Path | None = None
) -> tuple[nn.Module, str]:
    """The model a run with ``--init source`` trains, and a line saying what was done.

    On a fresh start it comes from ``source``; on resume from the run's own checkpoint (``resume_dir``), whose
    architecture, normalisation and origin were recorded at the start, so that ``source`` is never read again.
    ``model.pretrained_cfg`` holds class names, mean, std and ``init`` (the origin) for `write_pretrained`."""
    extra = sorted(set(model_args) - set(INIT_MODEL_ARGS))
    if extra:
        raise VitlabError(
            f"--init takes the architecture from {source!r}; model_args may only set {' and '.join(INIT_MODEL_ARGS)}, "
            f"not {', '.join(extra)}"
        )
    if resume_dir is not None:
        model = from_pretrained(resume_dir)
        recorded = json.loads((resume_dir / CONFIG_NAME).read_text()).get("init")
        model.pretrained_cfg["init"] = recorded or {"source": str(source)}
        return model.train(), f"continuing the fine-tuning of {source!r} from {resume_dir}"
    img = model_args.get("img_size")
    model = load_for_finetuning(
        source,
        num_classes=splits.num_classes,
        img_size=to_2tuple(img) if img is not None else None,
        in_chans=model_args.get("in_chans", splits.in_chans),
    )
    in_chans = model.default_cfg["input_size"][0]
    mean, std = model.default_cfg.get("mean"), model.default_cfg.get("std")
    # load_for_finetuning keeps the checkpoint's statistics only when the channels did not change
    if mean is not None and std is not None and len(mean) == len(std) == in_chans:
        normalisation = "the checkpoint's (same channels)"
    else:
        mean, std, normalisation = splits.mean, splits.std, f"the data's ({in_chans}-channel stem adapted)"
    model.pretrained_cfg = {
        "class_names": list(splits.class_names),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "init": {"source": str(source), "architecture": model.arch, "normalisation": normalisation},
    }
    size = "x".join(map(str, model.default_cfg["input_size"]))
    return model.train(), (
        f"fine-tuning {source!r} ({model.arch}): a new zero-initialised head for {splits.num_classes} classes, "
        f"input {size} (the data is resized to it), normalisation {normalisation}"
    )


def head_parameter_names(model: nn.Module) -> list[str]:
    heads = getattr(model, "head_names", ("head",))
    return [n for n, _ in model.named_parameters() if any(n.startswith(f"{h}.") for h in heads)]


def freeze_backbone(model: nn.Module) -> int:
    """Train only the classifier (a linear probe); returns the number of parameters left trainable."""
    heads = set(head_parameter_names(model))
    if not heads:
        raise VitlabError(f"{type(model).__name__} has no classifier parameters to train (num_classes=0?)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in heads)
    return sum(p.numel() for n, p in model.named_parameters() if n in heads)


def hold_backbone_in_eval(model: nn.Module) -> None:
    """Switch a frozen backbone back to inference mode after ``model.train()``: BatchNorm keeps its statistics and
    dropout and stochastic depth are off, so the probe learns on the features the backbone computes at test time."""
    model.eval()
    for head in getattr(model, "head_names", ("head",)):
        try:
            model.get_submodule(head).train()
        except AttributeError:  # a head name the model does not have (e.g. ViT's pre_logits after fine-tuning)
            continue
