"""What the papers score with, computed the references' way from numpy arrays or torch tensors.

- `segmentation_metrics` / `SegmentationMeter`: mIoU and pixel accuracy as PyTorch-Encoding (LSeg) computes them.
- `fb_iou`, `fold_metrics` / `FoldMeter`: FB-IoU and mIoU of zero-shot folds as HSNet (LSeg zero-shot) computes them.
- `caption_scores`: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap, against the raw references;
  `attention_correctness`: a word's attention mass inside the box of the item it names.
- `retrieval_metrics`: R@1/5/10, median and mean rank, text-to-video and video-to-text, as MMT computes them.
"""

from vitlab.metrics.captioning import attention_correctness, caption_scores
from vitlab.metrics.retrieval import retrieval_metrics
from vitlab.metrics.segmentation import (
    FoldMeter,
    SegmentationMeter,
    confusion_matrix,
    fb_iou,
    fold_metrics,
    scores_from_confusion,
    segmentation_metrics,
)

__all__ = [
    "FoldMeter",
    "SegmentationMeter",
    "attention_correctness",
    "caption_scores",
    "confusion_matrix",
    "fb_iou",
    "fold_metrics",
    "retrieval_metrics",
    "scores_from_confusion",
    "segmentation_metrics",
]
