"""Contrastive image-text training (CLIP, Radford et al. 2021, arXiv:2103.00020) through the training loop's task seam.

The loop is the classification loop (`vitlab.train.trainer`): data order, augmentation of the images, precision,
accumulation, optimizer, checkpoints, exact resume and DDP are its own. This task supplies what differs:

* the model: `vitlab.models.clip.create_clip` with the run's image model (``cfg.model``) and text tower
  (``cfg.text_model``); a text transformer trained from scratch gets a byte-level BPE trained on the training
  captions, deterministically (the same on every process and on resume);
* the loss: each batch's labels are sample indices of a caption set (`vitlab.data.captions`); each image gets one
  of its captions, drawn from a generator of (seed, epoch) that every process shares (so resume is exact and N
  processes draw what one does), and the
  symmetric cross-entropy of the paper's Figure 3 is taken over the *global* batch: under DDP every process
  all-gathers the embeddings with `torch.distributed.nn.functional.all_gather`, which passes gradients back to the
  process that computed them, and scores its own images against every text and its own texts against every image.
  The mean over processes is then exactly the loss of one process holding the whole batch, and DDP's gradient
  average is its gradient. Training "accuracy" is in-batch image-to-text top-1 over the global batch;
* evaluation: image-text retrieval on a held-out split (`vitlab.zeroshot`); ``accuracy`` (which selects the best
  checkpoint) is image-to-text recall@1, the summary adds recall@1/5/10 both ways and, for a built-in caption set,
  zero-shot accuracy on seen and unseen classes; on scenes, the zero-shot accuracy on the single-item scenes' items
  (`vitlab.zeroshot.item_zero_shot_set`, the measure the captioning task computes too), ``val_zero_shot`` in
  metrics.jsonl.

``cfg.clip_args``: ``embed_dim`` (512), ``lock_text`` / ``lock_image`` (frozen towers, LiT-style), ``text_args``
(text tower sizes), ``bpe_vocab_size`` (8192; the BPE stops earlier on a small caption set).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vitlab.data.base import derive_seed
from vitlab.data.captions import CaptionSplits
from vitlab.errors import VitlabError
from vitlab.models.clip import CLIP, contrastive_loss, create_clip
from vitlab.models.text import TEXT_TRANSFORMERS, TextTokenizer, train_bpe_tokenizer
from vitlab.train.config import TrainConfig
from vitlab.train.evaluate import autocast
from vitlab.train.tasks import TaskOutput, unwrap
from vitlab.zeroshot import (
    caption_positives,
    class_embeddings,
    class_prompts,
    embed_images,
    embed_texts,
    item_zero_shot_set,
    recall_at_k,
    zero_shot_accuracy,
)

CLIP_ARGS = {"embed_dim", "lock_text", "lock_image", "text_args", "bpe_vocab_size", "init_logit_scale"}


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of every process, concatenated in rank order; this process's first row in it). Gradients flow
    back to each process's own rows. One process: (x, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]  # equal shards: the loop drops the last partial batch


class ContrastiveTask:
    def __init__(self, cfg: TrainConfig, splits: Any) -> None:
        if not isinstance(splits, CaptionSplits):
            raise VitlabError(
                f"CLIP trains on a caption set (captions:FILE or captions:fashion-mnist), not {cfg.data!r}"
            )
        if cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing:
            raise VitlabError("mixup, cutmix and label smoothing mix class labels; contrastive training has none")
        if cfg.teacher:
            raise VitlabError("distillation and CLIP training do not combine; drop --teacher")
        unknown = set(cfg.clip_args) - CLIP_ARGS
        if unknown:
            raise VitlabError(f"unknown clip_args {sorted(unknown)}; known: {', '.join(sorted(CLIP_ARGS))}")
        self.text_model = cfg.text_model
        self.args = dict(cfg.clip_args)
        self.captions = splits.train.captions
        self.counts = torch.tensor([len(c) for c in self.captions])
        self.seed = cfg.seed
        self.start_epoch(0)
        self.tokenizer: TextTokenizer | None = None
        if cfg.text_model in TEXT_TRANSFORMERS:
            from vitlab.models.text import text_tower_args

            context = text_tower_args(cfg.text_model, **self.args.get("text_args", {}))["context_length"]
            texts = [c for caps in self.captions for c in caps]
            self.tokenizer = train_bpe_tokenizer(
                texts, vocab_size=int(self.args.get("bpe_vocab_size", 8192)), context_length=context
            )

    def describe(self) -> str:
        locked = [n for n in ("image", "text") if self.args.get(f"lock_{n}")]
        lock = f", {' and '.join(locked)} tower locked" if locked else ""
        return f"contrastive image-text (CLIP) with a {self.text_model} text tower{lock}"

    def build_model(self, cfg: TrainConfig, splits: Any) -> nn.Module:
        args = {k: v for k, v in self.args.items() if k != "bpe_vocab_size"}
        model = create_clip(
            cfg.model,
            cfg.text_model,
            image_args={**cfg.model_args, "drop_path_rate": cfg.drop_path_rate},
            tokenizer=self.tokenizer,
            **args,
        )
        model.pretrained_cfg = {"mean": list(splits.mean), "std": list(splits.std)}
        return model

    def setup(self, model: nn.Module) -> None:
        self.tokenizer = model.tokenizer  # a pretrained tower's own

    # --- training ------------------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """This epoch's caption draws: one uniform number per sample, from a generator of (seed, epoch) that every
        process shares. An epoch visits each sample once, so each process picks for its samples the captions one
        process with the whole batch would, and a resumed epoch picks them again with no saved state."""
        generator = torch.Generator().manual_seed(derive_seed("captions", self.seed, epoch))
        self.draws = torch.rand(len(self.captions), generator=generator)

    def batch_texts(self, labels: torch.Tensor) -> list[str]:
        """One caption per sample index, drawn uniformly among the sample's captions (`start_epoch`)."""
        idx = labels.cpu()
        pick = (self.draws[idx] * self.counts[idx]).long()
        return [self.captions[i][j] for i, j in zip(idx.tolist(), pick.tolist())]

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        assert self.tokenizer is not None
        ids = self.tokenizer(self.batch_texts(labels)).to(x.device)
        out = model(x, ids)
        all_images, offset = gather_with_grad(out.image_embeds)
        all_texts, _ = gather_with_grad(out.text_embeds)
        # this process's rows of the global [n, n] similarity matrix and of its transpose
        logits_per_image = out.logit_scale * out.image_embeds @ all_texts.t()  # (b, n)
        logits_per_text = out.logit_scale * out.text_embeds @ all_images.t()  # (b, n)
        target_idx = torch.arange(len(ids), device=x.device) + offset
        loss = contrastive_loss(logits_per_image, logits_per_text, target_idx)
        return TaskOutput(loss, (logits_per_image.argmax(-1) == target_idx).sum())

    # --- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, *, splits: Any, **kwargs: Any) -> dict[str, Any]:
        """Retrieval over the split (every process computes it whole: held-out splits are small), the contrastive
        loss of its images with their first captions in batches, and zero-shot accuracy for a built-in set."""
        clip: CLIP = unwrap(model)
        was_training = clip.training
        clip.eval()
        device, batch_size = kwargs.get("device", "cpu"), kwargs.get("batch_size", 256)
        with autocast(torch.device(device), kwargs.get("precision", "fp32")):
            workers = kwargs.get("num_workers", 0)
            image_emb = embed_images(clip, dataset, batch_size=batch_size, device=device, num_workers=workers)
            texts, positives = caption_positives(dataset.captions)
            text_emb = embed_texts(clip, texts, batch_size=batch_size)
            first = embed_texts(clip, [c[0] for c in dataset.captions], batch_size=batch_size)
        recall = recall_at_k(image_emb, text_emb, positives)
        scale = clip.scale().item()
        losses = [
            contrastive_loss(scale * image_emb[i : i + batch_size] @ first[i : i + batch_size].t()).item()
            for i in range(0, len(image_emb), batch_size)
        ]
        report: dict[str, Any] = {f"{way}_recall@{k}": v for way, by_k in recall.items() for k, v in by_k.items()}
        report["logit_scale"] = scale
        classes = getattr(dataset, "classes", None)
        info = getattr(splits, "class_captions", None)
        if classes is not None and info is not None:
            unseen = [splits.class_names.index(c) for c in splits.unseen]
            present = sorted(set(classes.tolist()))
            for kind in ("names", "descriptions"):
                prompts = class_prompts(
                    info.prompt_names, templates=info.templates, descriptions=info.descriptions, kind=kind
                )
                with autocast(torch.device(device), kwargs.get("precision", "fp32")):
                    class_emb = class_embeddings(clip, prompts)
                # the split's classes only: the val split has no unseen images
                zs = zero_shot_accuracy(image_emb, classes, class_emb, unseen=[u for u in unseen if u in present])
                report.update({f"zero_shot_{kind}_{k}": v for k, v in zs.items()})
        items = item_zero_shot_set(splits, dataset)
        if items is not None:  # scenes: their items' classes, with the prompts every objective is read by
            subset, labels, _, prompts = items
            with autocast(torch.device(device), kwargs.get("precision", "fp32")):
                item_emb = embed_images(clip, subset, batch_size=batch_size, device=device)
                class_emb = class_embeddings(clip, prompts)
            report["zero_shot"] = zero_shot_accuracy(item_emb, labels, class_emb)["accuracy"]
        clip.train(was_training)
        return {
            "loss": sum(losses) / max(len(losses), 1),
            "accuracy": recall["image_to_text"][1],
            "count": len(dataset),
            "report": report,
            "curves": {"val_zero_shot": report["zero_shot"]} if items is not None else {},
        }
