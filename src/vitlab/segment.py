"""What ``vitlab seg eval`` and ``vitlab seg predict`` call: score a segmentation checkpoint on its run's held-out
split, and paint one image's label map with a legend.

A checkpoint of ``vitlab seg train`` is LSeg (a language head: its run's ``text_model`` names the frozen text
encoder, so any label names can be asked for) or the classifier-head baseline (its trained classes only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab._io import write_json
from vitlab.errors import VitlabError
from vitlab.models.lseg import LabelEncoder, LSeg

METRICS_NAME = "seg_metrics.json"


def parse_labels(text: str | Sequence[str] | None) -> list[str] | None:
    """``"sneaker, bag,grass"`` -> ["sneaker", "bag", "grass"]; None stays None."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise VitlabError('--labels needs label names separated by commas, e.g. --labels "sneaker,bag,grass,other"')
    return names


def load_segmenter(checkpoint: str | Path) -> tuple[nn.Module, LabelEncoder | None, dict[str, Any]]:
    """(model in eval mode, its frozen label encoder or None for a classifier head, its config.json)."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.train.segmentation import label_encoder

    model = from_pretrained(checkpoint, map_location="cpu").eval()
    if not hasattr(model, "decoder"):
        raise VitlabError(f"{checkpoint} is not a segmentation model; train one with `vitlab seg train`")
    path = Path(checkpoint)
    config = json.loads((path / "config.json").read_text()) if path.is_dir() else {}
    train_cfg = config.get("train_config", {})
    encoder = None
    if isinstance(model, LSeg):
        if not train_cfg.get("text_model"):
            raise VitlabError(f"{checkpoint} is an LSeg model whose text encoder is not recorded in its config.json")
        encoder = label_encoder(train_cfg["text_model"])
    return model, encoder, config


def label_features(encoder: LabelEncoder | None, names: list[str], trained: list[str]) -> torch.Tensor | None:
    """The label embeddings to score with: any names for LSeg; the classifier head takes only its own classes."""
    if encoder is not None:
        return encoder(names)
    if names != trained:
        raise VitlabError(
            f"a classifier-head model segments its {len(trained)} trained classes ({', '.join(trained)}) only; "
            "train with --head language to ask for other labels"
        )
    return None


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    labels: str | Sequence[str] | None = None,
    fold: str | Sequence[str] | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """mIoU and pixel accuracy of ``checkpoint`` on its run's held-out ``split`` (checked against RUN/split.json),
    written to ``CHECKPOINT/eval-{split}/seg_metrics.json`` (as every `eval` writes, so best and last keep their own).
    ``labels`` renames the classes, in order (synonyms, paraphrases): LSeg embeds the new names instead. ``fold``
    (default: the classes the run held out, ``model_args.unseen``) adds LSeg's zero-shot episodes: ``fb_iou`` and
    ``fold_miou``."""
    from vitlab.data.manifest import held_out_split, run_dir_of
    from vitlab.data.segmentation import SegmentationSplits
    from vitlab.train.precision import run_precision
    from vitlab.train.segmentation import evaluate_fold, evaluate_segmentation, seen_classes, unseen_classes

    model, encoder, config = load_segmenter(checkpoint)
    train_cfg = config.get("train_config", {})
    run_dir = run_dir_of(checkpoint)
    precision, _ = run_precision(config, run_dir)  # as the run scored it: its test score comes back
    splits, dataset, checked = held_out_split(run_dir, train_cfg, split=split, data=data, data_dir=data_dir,
                                              allow_changed_data=allow_changed_data)  # fmt: skip
    if not isinstance(splits, SegmentationSplits):
        raise VitlabError(f"{splits.name} has no label maps: evaluate on seg:scenes:... or segfolder:DIR")
    trained = list(model.pretrained_cfg.get("class_names") or splits.class_names)
    unseen = unseen_classes(train_cfg.get("model_args", {}), splits.class_names)
    scored, remap = seen_classes(splits.class_names, unseen)  # as the run scored: held-out pixels unlabelled
    names = parse_labels(labels) or scored
    if len(names) != len(scored):
        raise VitlabError(
            f"--labels gives {len(names)} names but {splits.name} has {len(scored)} classes the run trained on "
            f"({', '.join(scored)}); give one name per class, in that order"
        )
    r = evaluate_segmentation(model, dataset, label_features=label_features(encoder, names, trained),
                              class_names=names, batch_size=batch_size, precision=precision,
                              remap=remap)  # fmt: skip
    result = {"checkpoint": str(checkpoint), "data": splits.name, "split": split, "count": r["count"],
              "checked": checked, "labels": names, "miou": r["report"]["miou"],
              "pixel_accuracy": r["report"]["pixel_accuracy"], "iou": r["report"]["iou"]}  # fmt: skip
    fold_names = parse_labels(fold) if fold is not None else unseen
    if fold_names:
        if encoder is None:
            raise VitlabError("zero-shot folds name their classes: they need a language-head (LSeg) model")
        every = splits.class_names
        unknown = [c for c in fold_names if c not in every]
        if unknown:
            raise VitlabError(f"--fold names {unknown[0]!r}, not one of the classes ({', '.join(every)})")
        f = evaluate_fold(model, dataset, encoder=encoder, fold=fold_names, class_names=every,
                          batch_size=batch_size, precision=precision)  # fmt: skip
        result.update(fb_iou=f["fb_iou"], fold_miou=f["miou"], fold_iou=f["iou"], fold=fold_names)
    out = (Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent) / f"eval-{split}" / METRICS_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return {**result, "path": str(out)}


# --- one image -------------------------------------------------------------------------------------------------------
def predict_image(
    checkpoint: str | Path,
    image: str | Path,
    *,
    labels: str | Sequence[str] | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Segment ``image`` among ``labels`` (any names for LSeg; default the trained classes) and write the image, its
    colour mask and a legend side by side to ``out`` (default IMAGE-seg.png). Returns each label's pixel share."""
    from vitlab.data import to_model_input
    from vitlab.data.segmentation import read_image
    from vitlab.train.segmentation import segment

    model, encoder, _ = load_segmenter(checkpoint)
    trained = list(model.pretrained_cfg.get("class_names") or [])
    names = parse_labels(labels) or trained
    features = label_features(encoder, names, trained)
    pixels = read_image(Path(image))  # (H, W, 3)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W)
    in_chans, h, w = model.default_cfg["input_size"]
    norm = model.pretrained_cfg
    x = to_model_input(x, in_chans=in_chans, img_size=(h, w), mean=norm["mean"], std=norm["std"])
    with torch.no_grad():
        logits = segment(model, x, features)  # (1, K, h, w)
        logits = torch.nn.functional.interpolate(logits, size=pixels.shape[:2], mode="bilinear", align_corners=False)
    label_map = logits.argmax(1)[0].numpy()  # (H, W)
    path = Path(out) if out else Path(image).with_name(Path(image).stem + "-seg.png")
    draw_prediction(pixels, label_map, names, path)
    share = np.bincount(label_map.reshape(-1), minlength=len(names)) / label_map.size
    return {"image": str(image), "out": str(path), "labels": names, "share": dict(zip(names, share.tolist()))}


def label_colours(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8 [n, 3]), the palette `vitlab data scenes` writes masks with."""
    from vitlab.data.scenes import _palette

    return np.array(_palette(n), dtype=np.uint8).reshape(n, 3)


def draw_prediction(image: np.ndarray, label_map: np.ndarray, names: list[str], path: Path) -> None:
    """The image, its colour mask and a legend of the labels, side by side, written atomically as a PNG."""
    import os

    from vitlab._plot import pyplot

    plt = pyplot()
    colours = label_colours(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(colours[label_map])
    axes[1].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c / 255) for c in colours]
    fig.legend(handles, names, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed over the picture: never half written
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
