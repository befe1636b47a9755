"""Using a trained checkpoint: evaluation on a dataset split and top-k prediction on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitlab._io import write_json
from vitlab.checkpoint import from_pretrained
from vitlab.data import to_model_input
from vitlab.data.images import decode_image
from vitlab.data.subset import class_order, relabel
from vitlab.errors import VitlabError


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    precision: str | None = None,
    out: str | Path | None = None,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split, writing confusion_matrix.png and .json into ``out``.

    By default the split is its run's own held-out one (``data``: the run's data; checked against ``RUN/split.json``,
    see `vitlab.data.manifest.held_out_split`), measured in the run's precision and evaluation batch size, so the
    test accuracy is the run's own, image for image. ``precision`` / ``batch_size`` override them."""
    from vitlab.data.manifest import held_out_split, run_dir_of
    from vitlab.train.evaluate import evaluate
    from vitlab.train.precision import resolve_precision, run_precision
    from vitlab.train.report import plot_confusion

    checkpoint = Path(checkpoint)
    model = _classifier(from_pretrained(checkpoint), checkpoint)
    in_chans, h, w = model.default_cfg["input_size"]
    config = json.loads((checkpoint / "config.json").read_text()) if checkpoint.is_dir() else {}
    train_cfg = config.get("train_config", {})
    run_dir = run_dir_of(checkpoint)
    if precision is None:
        precision, precision_reason = run_precision(config, run_dir)
    else:
        precision, precision_reason = resolve_precision(precision, "cpu")
    batch_size = batch_size or max(train_cfg.get("batch_size", 0), 256)  # the trainer's test report's batch
    # the run's data, options and split (its class subset, skipped files, split sizes), checked against its manifest
    splits, dataset, checked = held_out_split(run_dir, train_cfg, split=split, data=data, data_dir=data_dir,
                                              img_size=(h, w), in_chans=in_chans,
                                              allow_changed_data=allow_changed_data)  # fmt: skip
    # classes checked by name: the same ones in another order are scored in the model's order, others refused
    model_names = model.pretrained_cfg.get("class_names")
    order = class_order(model_names, splits.class_names, num_classes=model.num_classes,
                        model=f"the checkpoint {checkpoint}", data=splits.name)  # fmt: skip
    if order is not None:
        dataset = relabel(dataset, order)
    names = list(model_names or splits.class_names)
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
        "split": split,
        "checked": checked,
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
