"""Semantic segmentation (LSeg, Li et al. 2022, arXiv:2201.03546) through the training loop's task seam.

The loop (`vitlab.train.trainer`) owns data order, precision, accumulation, optimizer, checkpoints, resume and DDP.
This task supplies what differs:

* the data: a segmentation split (`vitlab.data.segmentation`) whose batches carry sample indices; the task looks
  up their label maps (int64, -1 where unlabelled);
* the model: `vitlab.models.lseg.create_lseg` over the run's image model (``cfg.model``, sized by ``model_args``).
  With a text encoder (``cfg.text_model``: ``all_minilm_l6_v2``, the packaged MiniLM, or a vitlab CLIP checkpoint)
  it is LSeg, the language head: the frozen encoder embeds the class names once and every pixel is scored against
  them; without one it is the classifier-head `DPTSegmenter` with the same encoder and decoder;
* the loss: per-pixel cross-entropy, unlabelled pixels (-1) left out (`segmentation_loss`). The logits are resized
  to the label map when the model's input size differs from the stored images'. Training "accuracy" is the mean
  over the batch's images of their pixel accuracy;
* evaluation: mIoU and pixel accuracy from the confusion matrix summed over the split (`SegmentationMeter`, as
  PyTorch-Encoding); ``accuracy``, which selects the best checkpoint, is the mIoU;
* zero-shot folds: ``model_args.unseen`` (class names) holds classes out of training: their pixels are unlabelled
  and their names are not in the training label set, so the model never sees them; `evaluate_fold` then scores
  them in the ``['others', class]`` episodes of LSeg's zero-shot protocol (mIoU over the fold and FB-IoU, HSNet's).

The decoder's sizes come with ``model_args`` keys ``features``, ``reassemble_dims`` (and ``readout``, ``hooks``,
``use_bn``), LSeg's pixel / label width with ``label_dim`` (its ``embed_dim``, 512); every other key sizes the
encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import to_model_input
from vitlab.data.segmentation import IGNORE, SegmentationSplits
from vitlab.errors import VitlabError
from vitlab.metrics import SegmentationMeter
from vitlab.models.lseg import LabelEncoder, LSeg, create_lseg, segmentation_loss
from vitlab.train.config import TrainConfig
from vitlab.train.distributed import DistInfo, all_reduce_sum
from vitlab.train.evaluate import autocast
from vitlab.train.tasks import TaskOutput, unwrap

DECODER_ARGS = ("features", "reassemble_dims", "readout", "hooks", "use_bn")
LABEL_DIM = "label_dim"  # model_args key of LSeg's pixel / label width (its ``embed_dim``; the encoder has its own)
UNSEEN = "unseen"  # model_args key of the classes held out of training (a zero-shot fold)
TASK_ARGS = (*DECODER_ARGS, LABEL_DIM, UNSEEN)


def unseen_classes(model_args: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The class names ``model_args.unseen`` holds out (a list, or a comma-separated string), checked."""
    unseen = model_args.get(UNSEEN) or []
    unseen = [u.strip() for u in unseen.split(",")] if isinstance(unseen, str) else [str(u) for u in unseen]
    unknown = [u for u in unseen if u not in names]
    if unknown:
        raise VitlabError(f"model_args.unseen names {unknown[0]!r}, not a class of the data ({', '.join(names)})")
    return unseen


def seen_classes(names: Sequence[str], unseen: Sequence[str]) -> tuple[list[str], torch.Tensor | None]:
    """(the classes trained and scored, the map from the data's class k to its index among them, -1 when held out;
    None when nothing is held out)."""
    seen = [n for n in names if n not in unseen]
    if not unseen:
        return seen, None
    index = {n: i for i, n in enumerate(seen)}
    return seen, torch.tensor([index.get(n, IGNORE) for n in names])


def remap_masks(masks: torch.Tensor, remap: torch.Tensor | None) -> torch.Tensor:
    """Label maps in the data's classes -> in the trained classes (``remap[k]``, -1 for a held-out class)."""
    if remap is None:
        return masks
    return torch.where(masks >= 0, remap.to(masks.device)[masks.clamp(min=0)], masks)


MINILM_NAMES = ("all_minilm_l6_v2", "minilm")


def label_encoder(text_model: str) -> LabelEncoder:
    """The frozen text encoder a run names: the packaged MiniLM, or the text tower of a vitlab CLIP checkpoint."""
    if text_model in MINILM_NAMES:
        return LabelEncoder.from_minilm()
    from vitlab.checkpoint import from_pretrained

    clip = from_pretrained(text_model, map_location="cpu")
    if not hasattr(clip, "encode_text"):
        raise VitlabError(
            f"{text_model!r} is not a CLIP checkpoint: name all_minilm_l6_v2 or a `vitlab clip train` run"
        )
    return LabelEncoder.from_clip(clip.requires_grad_(False))


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits [B, K, h, w] at the label map's size [H, W] (the model may see the images at another size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def segment(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, K, H, W] of either head: LSeg takes the label embeddings [K, E'], the classifier head none."""
    return model(x) if labels is None else model(x, labels)


class SegmentationTask:
    def __init__(self, cfg: TrainConfig, splits: Any) -> None:
        if not isinstance(splits, SegmentationSplits):
            raise VitlabError(f"segmentation trains on label maps (scenes:... or segfolder:DIR), not {cfg.data!r}")
        if cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing:
            raise VitlabError("mixup, cutmix and label smoothing mix class labels; segmentation has label maps")
        if cfg.random_resized_crop or cfg.hflip or cfg.randaugment:
            raise VitlabError(
                "crops, flips and RandAugment move pixels away from their labels; drop them for segmentation"
            )
        if cfg.teacher:
            raise VitlabError("distillation and segmentation do not combine; drop --teacher")
        unseen = unseen_classes(cfg.model_args, splits.class_names)
        if unseen and not cfg.text_model:
            raise VitlabError("held-out classes (model_args.unseen) are segmented by name: use --head language")
        self.class_names, self.remap = seen_classes(splits.class_names, unseen)
        self.masks = remap_masks(splits.train.masks, self.remap)  # (N, H, W): the batches' labels index it
        self.text_model = cfg.text_model
        self.encoder = label_encoder(cfg.text_model) if cfg.text_model else None
        self.label_features: torch.Tensor | None = None

    def describe(self) -> str:
        head = f"language head ({self.text_model} labels, frozen)" if self.text_model else "classifier head"
        return f"segmentation of {len(self.class_names)} classes, {head}"

    def build_model(self, cfg: TrainConfig, splits: Any) -> nn.Module:
        decoder = {k: v for k, v in cfg.model_args.items() if k in DECODER_ARGS}
        encoder = {k: v for k, v in cfg.model_args.items() if k not in TASK_ARGS}
        encoder["drop_path_rate"] = cfg.drop_path_rate
        if self.encoder is None:
            model = create_lseg(cfg.model, classifier_classes=len(self.class_names), encoder_args=encoder, **decoder)
        else:
            if LABEL_DIM in cfg.model_args:
                decoder["embed_dim"] = cfg.model_args[LABEL_DIM]
            model = create_lseg(cfg.model, encoder_args=encoder, text_dim=self.encoder.dim, **decoder)
        model.pretrained_cfg = {"class_names": self.class_names, "mean": list(splits.mean), "std": list(splits.std)}
        return model

    def setup(self, model: nn.Module) -> None:
        if self.encoder is not None:  # the training labels are embedded once, on the model's device
            device = next(model.parameters()).device
            self.label_features = self.encoder(self.class_names).to(device)

    def start_epoch(self, epoch: int) -> None:
        pass

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        masks = self.masks[labels.cpu()].to(x.device)  # (B, H, W)
        logits = resize_logits(segment(model, x, self.label_features), masks.shape[-2:])  # (B, K, H, W)
        loss = segmentation_loss(logits, masks, ignore_index=IGNORE)
        with torch.no_grad():
            labelled = (masks != IGNORE).sum((1, 2)).clamp(min=1)
            right = ((logits.argmax(1) == masks) & (masks != IGNORE)).sum((1, 2))
            correct = (right / labelled).sum()  # each image's pixel accuracy, summed: the loop divides by B
        return TaskOutput(loss, correct)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, *, splits: Any, **kwargs: Any) -> dict[str, Any]:
        names = kwargs.pop("label_names", None) or self.class_names
        features = self.label_features if names == self.class_names or self.encoder is None else None
        if features is None and self.encoder is not None:
            features = self.encoder(names).to(next(unwrap(model).parameters()).device)
        return evaluate_segmentation(model, dataset, label_features=features, class_names=names, remap=self.remap,
                                     **kwargs)  # fmt: skip


def evaluate_segmentation(
    model: nn.Module,
    dataset: Any,
    *,
    label_features: torch.Tensor | None,
    class_names: Sequence[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
    remap: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Loss, mIoU (as ``accuracy``), pixel accuracy and per-class IoU of a split. Under torchrun each process scores
    its shard and the confusion matrices and loss sums are all-reduced before the scores are taken."""
    info, device = dist_info or DistInfo(), torch.device(device)
    bare = unwrap(model)
    if isinstance(bare, LSeg) != (label_features is not None):
        raise VitlabError("an LSeg model needs label embeddings and a classifier-head model none")
    was_training = bare.training
    bare.eval()
    in_chans, h, w = bare.default_cfg["input_size"]
    norm = getattr(bare, "pretrained_cfg", {})
    K = len(class_names)
    meter = SegmentationMeter(K, ignore_index=IGNORE)
    sums = torch.zeros(2, dtype=torch.float64)  # loss x labelled pixels, labelled pixels
    batches = dataset.loader(batch_size, shuffle=False, rank=info.rank, world_size=info.world_size,
                             num_workers=num_workers)  # fmt: skip
    for images, idx in batches:
        x = to_model_input(images.to(device), in_chans=in_chans, img_size=(h, w), mean=norm["mean"], std=norm["std"])
        masks = remap_masks(dataset.masks[idx], remap).to(device)  # (b, H, W) in the classes scored
        with autocast(device, precision):
            logits = resize_logits(segment(bare, x, label_features), masks.shape[-2:]).float()
        labelled = int((masks != IGNORE).sum())
        if labelled:
            sums += torch.tensor([segmentation_loss(logits, masks, ignore_index=IGNORE).item() * labelled, labelled])
        meter.update(logits.argmax(1).cpu(), masks.cpu())
    confusion = torch.from_numpy(meter.confusion).to(device)
    all_reduce_sum(confusion, info)
    sums = all_reduce_sum(sums.to(device), info).cpu()
    meter.confusion = confusion.cpu().numpy()
    scores = meter.compute()
    bare.train(was_training)
    report = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
              "iou": dict(zip(class_names, scores["iou"]))}  # fmt: skip
    return {"loss": (sums[0] / sums[1].clamp(min=1)).item(), "accuracy": scores["miou"], "count": len(dataset),
            "report": report}  # fmt: skip


@torch.no_grad()
def evaluate_fold(
    model: nn.Module,
    dataset: Any,
    *,
    encoder: LabelEncoder,
    fold: Sequence[str],
    class_names: Sequence[str],
    batch_size: int = 64,
    precision: str = "fp32",
) -> dict[str, Any]:
    """LSeg's zero-shot protocol (``test_lseg_zs.py``): for each class c of ``fold`` and each image showing it, an
    episode with the labels ['others', c], scored against the binary map (c or not; unlabelled pixels left out).
    Returns `FoldMeter`'s ``{"miou", "fb_iou", "iou"}`` (mIoU over the fold's classes, FB-IoU of all episodes)."""
    from vitlab.metrics import FoldMeter

    bare = unwrap(model).eval()
    in_chans, h, w = bare.default_cfg["input_size"]
    norm = bare.pretrained_cfg
    device = next(bare.parameters()).device
    meter = FoldMeter(ignore_index=IGNORE)
    for name in fold:
        k = list(class_names).index(name)
        features = encoder(["others", name]).to(device)  # (2, E'): LSeg's episode label set
        for images, idx in dataset.loader(batch_size, shuffle=False):
            masks = dataset.masks[idx]
            shows = (masks == k).flatten(1).any(1)  # (b,): the episodes are the images that show the class
            if not shows.any():
                continue
            x = to_model_input(images[shows].to(device), in_chans=in_chans, img_size=(h, w), mean=norm["mean"],
                               std=norm["std"])  # fmt: skip
            target = (masks[shows] == k).long().masked_fill(masks[shows] == IGNORE, IGNORE)  # (e, H, W)
            with autocast(device, precision):
                logits = resize_logits(segment(bare, x, features), target.shape[-2:]).float()
            meter.update(logits.argmax(1).cpu(), target, [k] * int(shows.sum()))
    if not meter.confusion:
        raise VitlabError(f"no image of the split shows {', '.join(fold)}: nothing to score the fold on")
    scores = meter.compute()
    return {"miou": scores["miou"], "fb_iou": scores["fb_iou"],
            "iou": {class_names[c]: v for c, v in scores["iou"].items()}}  # fmt: skip
