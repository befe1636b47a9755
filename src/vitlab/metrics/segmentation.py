"""Semantic segmentation scores as LSeg reports them: mIoU and pixel accuracy, and FB-IoU for zero-shot folds.

**mIoU and pixel accuracy** reproduce PyTorch-Encoding's ``SegmentationMetric`` (``encoding/utils/metrics.py``:
``batch_intersection_union``, ``batch_pix_accuracy`` and ``get``), which LSeg's ``test_lseg.py`` scores with. The
intersection and union of each class are summed over every pixel of the dataset (not averaged per image), then::

    IoU_c          = inter_c / (eps + union_c)          union_c = pred_c + target_c - inter_c, eps = np.spacing(1)
    miou           = mean of IoU_c over ALL num_classes classes
    pixel_accuracy = correct / (eps + labeled)

Pixels whose target is ``ignore_index`` are left out of every count (PyTorch-Encoding's ignore label is -1, the
default here). A class absent from both prediction and ground truth has union 0, so IoU 0, and still counts in the
mean: a dataset that never shows class c lowers mIoU. torchmetrics differs there: ``MulticlassJaccardIndex`` with
``average="macro"`` leaves such classes out of the mean (and ``zero_division`` only sets their per-class value under
``average=None``), so on the same pixels its mIoU is the same or higher.

**FB-IoU and the zero-shot mIoU** reproduce HSNet's evaluation (``common/evaluation.py`` and ``AverageMeter`` in
``common/logger.py``), which LSeg copied into ``fewshot_data/`` and scores its zero-shot folds with
(``test_lseg_zs.py``). Each episode is a binary map, 0 for 'others' and 1 for the episode's class; intersections and
unions of the two labels are summed over the episodes, and::

    FB-IoU = (IoU_background + IoU_foreground) / 2   with both IoUs from the sums over ALL episodes of the fold
    mIoU   = mean over the fold's classes c of IoU_foreground(c)   each from the sums over the episodes of class c

HSNet prints both times 100 and divides by ``max(union, 1)``; here they are fractions and the guard is
``np.spacing(1)`` as above, which changes nothing but a union of 0 (0 either way).

All inputs are integer label maps of any shape (one image, a batch, a whole dataset), numpy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vitlab.errors import VitlabError
from vitlab.metrics._arrays import as_numpy


def confusion_matrix(pred: Any, target: Any, *, num_classes: int, ignore_index: int = -1) -> np.ndarray:
    """Pixel counts ``[num_classes, num_classes]`` (int64): rows the target class, columns the predicted class.

    Pixels whose target is `ignore_index` are left out; their prediction may be anything.
    """
    p = as_numpy(pred, name="pred", kind="int")
    t = as_numpy(target, name="target", kind="int")
    if p.shape != t.shape:
        raise VitlabError(
            f"pred has shape {p.shape} but target {t.shape}: give label maps of one shape (argmax the logits first)"
        )
    keep = t != ignore_index
    p, t = p[keep], t[keep]  # (P,) labelled pixels only
    for name, a in (("target", t), ("pred", p)):
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            raise VitlabError(
                f"{name} holds label {int(a[bad][0])} outside 0..{num_classes - 1} (num_classes={num_classes}, "
                f"ignore_index={ignore_index}): pass the right num_classes or mark the pixel with ignore_index"
            )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """``{"miou", "pixel_accuracy", "iou"}`` of a confusion matrix, as PyTorch-Encoding's ``get`` computes them."""
    eps = np.spacing(1)  # PyTorch-Encoding's guard: an empty class scores 0 instead of 0/0
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = inter / (eps + union)  # (C,)
    return {
        "miou": float(iou.mean()),  # over every class, absent ones included
        "pixel_accuracy": float(inter.sum() / (eps + confusion.sum())),
        "iou": [float(v) for v in iou],
    }


def _check_classes(num_classes: int, ignore_index: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise VitlabError(f"num_classes must be a positive integer, not {num_classes!r}")
    if 0 <= ignore_index < num_classes:
        raise VitlabError(
            f"ignore_index {ignore_index} is one of the {num_classes} classes: "
            f"pass an index outside 0..{num_classes - 1} (-1 or 255)"
        )


class SegmentationMeter:
    """A confusion matrix summed batch by batch; `compute` scores everything seen so far.

    ``meter.update(pred, target)`` for each batch, then ``meter.compute()`` equals `segmentation_metrics` on all the
    batches concatenated. ``meter.confusion`` is the running ``[num_classes, num_classes]`` count (rows: target), to
    sum across processes before `compute` in data-parallel evaluation.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = -1) -> None:
        _check_classes(num_classes, ignore_index)
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        self.confusion += confusion_matrix(pred, target, num_classes=self.num_classes, ignore_index=self.ignore_index)

    def compute(self) -> dict[str, Any]:
        return scores_from_confusion(self.confusion)


def segmentation_metrics(pred: Any, target: Any, num_classes: int, ignore_index: int = -1) -> dict[str, Any]:
    """``{"miou", "pixel_accuracy", "iou"}`` of integer label maps of any shape, as PyTorch-Encoding scores them.

    ``iou`` is the list of per-class IoUs; ``miou`` their mean over all `num_classes` (a class absent from both
    `pred` and `target` counts as 0); both from the intersections and unions summed over every pixel, so a batch
    or a whole dataset gives the dataset's score, not a mean of per-image scores.
    """
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index)
    meter.update(pred, target)
    return meter.compute()


def fb_iou(pred: Any, target: Any, ignore_index: int = -1) -> float:
    """FB-IoU of binary maps (0: background / 'others', 1: the class): the mean of the background IoU and the
    foreground IoU, each from the intersections and unions summed over all pixels given (HSNet, LSeg zero-shot).

    Pass every episode of a fold at once (or use `FoldMeter`): FB-IoU pools the fold's episodes, it is not a mean
    of per-episode scores. HSNet marks ignored pixels 255; pass ``ignore_index=255`` for such masks.
    """
    return segmentation_metrics(pred, target, 2, ignore_index)["miou"]


class FoldMeter:
    """Zero-shot fold scores batch by batch, HSNet's ``AverageMeter``: ``update(pred, target, class_ids)`` with one
    class id per episode (the first dimension of the binary maps), then ``compute()`` gives ``{"miou", "fb_iou",
    "iou"}``: the mean over classes of each class's foreground IoU, the FB-IoU of all episodes pooled, and the
    foreground IoU per class id. The mean runs over the classes seen in `update`.
    """

    def __init__(self, *, ignore_index: int = -1) -> None:
        _check_classes(2, ignore_index)
        self.ignore_index = ignore_index
        self.confusion: dict[int, np.ndarray] = {}  # class id -> [2, 2] counts of its episodes

    def update(self, pred: Any, target: Any, class_ids: Sequence[int] | Any) -> None:
        ids = as_numpy(class_ids, name="class_ids", kind="int").reshape(-1)
        p = as_numpy(pred, name="pred", kind="int")
        t = as_numpy(target, name="target", kind="int")
        if p.shape != t.shape or p.ndim < 1 or len(ids) != len(p):
            raise VitlabError(
                f"pred {p.shape}, target {t.shape} and class_ids ({len(ids)},) disagree: give binary maps of one "
                "shape [episodes, ...] and one class id per episode"
            )
        for c in np.unique(ids):
            m = confusion_matrix(p[ids == c], t[ids == c], num_classes=2, ignore_index=self.ignore_index)
            self.confusion[int(c)] = self.confusion.get(int(c), 0) + m

    def compute(self) -> dict[str, Any]:
        if not self.confusion:
            raise VitlabError("FoldMeter.compute() before any update(): score at least one episode")
        fg = {c: scores_from_confusion(m)["iou"][1] for c, m in sorted(self.confusion.items())}
        pooled = sum(self.confusion.values())
        return {"miou": float(np.mean(list(fg.values()))), "fb_iou": scores_from_confusion(pooled)["miou"], "iou": fg}


def fold_metrics(pred: Any, target: Any, class_ids: Sequence[int] | Any, ignore_index: int = -1) -> dict[str, Any]:
    """``{"miou", "fb_iou", "iou"}`` of a zero-shot fold's binary maps ``[E, ...]`` and their class ids ``[E]``
    (see `FoldMeter`), as LSeg's ``test_lseg_zs.py`` reports them (there times 100)."""
    meter = FoldMeter(ignore_index=ignore_index)
    meter.update(pred, target, class_ids)
    return meter.compute()
