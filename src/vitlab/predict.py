"""Using a trained checkpoint: evaluation on a dataset split and top-k prediction on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitlab._io import write_json
from vitlab.checkpoint import from_pretrained
from vitlab.data import build_dataset, subset_classes, to_model_input
from vitlab.data.images import decode_image
from vitlab.errors import VitlabError


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str,
    *,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    precision: str = "auto",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split of a dataset, writing confusion_matrix.png and .json into ``out``."""
    from vitlab.train.evaluate import evaluate
    from vitlab.train.precision import resolve_precision
    from vitlab.train.report import plot_confusion

    precision, precision_reason = resolve_precision(precision, "cpu")

    checkpoint = Path(checkpoint)
    model = _classifier(from_pretrained(checkpoint), checkpoint)
    in_chans, h, w = model.default_cfg["input_size"]
    train_cfg = (
        json.loads((checkpoint / "config.json").read_text()).get("train_config", {}) if checkpoint.is_dir() else {}
    )
    # the run's seed and validation fraction give back the same split the model was selected on
    splits = build_dataset(
        data,
        data_dir=data_dir,
        img_size=(h, w),
        in_chans=in_chans,
        seed=train_cfg.get("seed", 0),
        val_fraction=train_cfg.get("val_fraction", 0.1),
    )
    if train_cfg.get("classes") is not None:  # the class subset the model was trained on
        splits = subset_classes(splits, train_cfg["classes"])
    dataset = splits.test if split == "test" else splits.val
    if dataset is None:
        raise VitlabError(f"{splits.name} has no test split; use --split val")
    names = model.pretrained_cfg.get("class_names") or splits.class_names
    if len(names) != model.num_classes or splits.num_classes != model.num_classes:
        raise VitlabError(f"the checkpoint has {model.num_classes} classes but {splits.name} has {splits.num_classes}")
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]  # the checkpoint's, set by from_pretrained
    r = evaluate(
        model, dataset, num_classes=model.num_classes, mean=mean, std=std, batch_size=batch_size, precision=precision
    )
    out = Path(out) if out else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "confusion_matrix.png", out / "confusion_matrix.json"
    plot_confusion(r["confusion"], names, png, title=f"{splits.name} {split}: accuracy {r['accuracy']:.4f}")
    write_json(
        js,
        {
            "data": splits.name,
            "split": split,
            "accuracy": r["accuracy"],
            "count": r["count"],
            "class_names": names,
            "per_class_accuracy": r["per_class_accuracy"],
            "confusion": r["confusion"].tolist(),
        },
    )
    return {
        **r,
        "data": splits.name,
        "class_names": names,
        "png": str(png),
        "json": str(js),
        "precision": precision,
        "precision_reason": precision_reason,
    }


class TorchClassifier:
    """A checkpoint in eager PyTorch with the interface of `OnnxClassifier`: ``logits(x)`` on normalised
    ``[B, C, H, W]`` input, ``model_name``, ``class_names``, ``input_size``, ``mean``, ``std``; ``model`` is the
    module (for attention maps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.model_name = str(getattr(model, "model_name", type(model).__name__))
        self.input_size = tuple(int(v) for v in model.default_cfg["input_size"])
        self.mean = tuple(model.default_cfg["mean"])  # the checkpoint's, set by from_pretrained
        self.std = tuple(model.default_cfg["std"])
        self.class_names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(model.num_classes)]

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def load_classifier(checkpoint: str | Path, *, runtime: str = "torch"):
    """A `TorchClassifier` (``runtime="torch"``: anything `from_pretrained` reads) or an `OnnxClassifier`
    (``"onnx"``: a ``.onnx`` file, or a checkpoint that `vitlab export` has written ``model.onnx`` for)."""
    if runtime == "torch":
        return TorchClassifier(_classifier(from_pretrained(checkpoint), checkpoint))
    if runtime == "onnx":
        from vitlab.export import OnnxClassifier, resolve_onnx

        return OnnxClassifier(resolve_onnx(checkpoint))
    raise VitlabError(f"runtime must be torch or onnx, got {runtime!r}")


def preprocess(image: torch.Tensor, classifier) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` images -> the classifier's normalised float input."""
    in_chans, h, w = classifier.input_size
    return to_model_input(image, in_chans=in_chans, img_size=(h, w), mean=classifier.mean, std=classifier.std)


def top_classes(probs: torch.Tensor, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """``[{"class", "probability"}, ...]`` for the ``k`` most probable classes of one image's ``probs``."""
    p, idx = probs.topk(min(k, probs.numel()))
    return [{"class": class_names[i], "probability": round(v, 6)} for v, i in zip(p.tolist(), idx.tolist())]


def predict_files(
    checkpoint: str | Path, images: list[str], *, top_k: int = 5, runtime: str = "torch"
) -> list[dict[str, Any]]:
    classifier = load_classifier(checkpoint, runtime=runtime)
    in_chans, h, w = classifier.input_size
    results = []
    for path in images:
        image = decode_image(path, in_chans=in_chans, img_size=(h, w))  # the decoder training uses
        probs = classifier.logits(preprocess(image[None], classifier)).softmax(-1)[0]
        results.append({"image": str(path), "top": top_classes(probs, classifier.class_names, top_k)})
    return results


def _classifier(model: torch.nn.Module, source: str | Path) -> torch.nn.Module:
    if not hasattr(model, "num_classes"):  # an image-text model (CLIP) has no classes of its own
        raise VitlabError(f"{source} is not a classifier; a CLIP model classifies with `vitlab zeroshot`")
    return model
