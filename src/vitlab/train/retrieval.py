"""Text-to-video retrieval (MMT, Gabeur et al. 2020, arXiv:2007.10639) through the training loop's task seam.

The loop (`vitlab.train.trainer`) owns data order, precision, optimizer, checkpoints and resume. Its batches are
placeholders and clip indices (`vitlab.data.clips.VideoFeatureDataset`); this task supplies the rest:

* the model: `vitlab.models.mmt.create_mmt` over the data's experts, with the caption encoder ``cfg.text_model``
  (default all_minilm_l6_v2, the packaged MiniLM, a BERT that adds [CLS] and [SEP]); ``cfg.model`` is ``mmt``;
  ``model_args`` sizes it (``d_model``, ``depth``, ``num_heads``, ``temporal``, ``lock_text``, ``max_seconds``,
  ``aggregation``: ``mean`` for the MoEE baseline, ...), picks ``experts`` (a list of the data's expert names: the
  model sees only those; default all) and names the loss: ``loss`` (``max_margin``, MMT's, or ``infonce``) and
  ``margin`` (0.05);
* the loss: each clip's caption is drawn from a generator of (seed, epoch) (as CLIP's task draws), the [B, B]
  similarities of the batch's captions and clips go through the bidirectional max-margin ranking loss. The batch is
  each process's own (no gathering across processes). Training "accuracy" is in-batch text-to-video top-1;
* evaluation: every caption of every clip of the split against every clip (`retrieval_metrics`, MMT's way: R@k in
  percent, 1-based ranks, ties averaged); ``accuracy``, which selects the best checkpoint, is t2v R@1 / 100.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitlab.data.base import derive_seed
from vitlab.data.clips import VideoSplits
from vitlab.errors import VitlabError
from vitlab.metrics import retrieval_metrics
from vitlab.models.mmt import MMT, create_mmt, infonce_loss, max_margin_ranking_loss
from vitlab.models.text import MINILM
from vitlab.train.config import TrainConfig
from vitlab.train.tasks import TaskOutput, unwrap

FEATURE_MODELS = ("mmt",)  # models of precomputed features: the loop feeds them placeholder images
LOSS_ARGS = ("loss", "margin")


def takes_images(model: str) -> bool:
    return model not in FEATURE_MODELS


def expert_subset(experts: dict[str, int], names: list[str] | str | None) -> dict[str, int]:
    """The data's experts (name -> width) that ``names`` picks, in its order (a list, or one comma-separated string);
    all of them for None."""
    if names is None:
        return dict(experts)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    unknown = [n for n in names if n not in experts]
    if unknown or not names or len(set(names)) != len(names):
        raise VitlabError(
            f"model_args.experts={names}: name each of the data's experts at most once, from {', '.join(experts)}"
        )
    return {n: experts[n] for n in names}


def ranking_loss(sims: torch.Tensor, *, loss: str = "max_margin", margin: float = 0.05) -> torch.Tensor:
    if loss == "max_margin":
        return max_margin_ranking_loss(sims, margin=margin)
    if loss == "infonce":
        return infonce_loss(sims)
    raise VitlabError(f"model_args.loss must be max_margin or infonce, got {loss!r}")


class RetrievalTask:
    def __init__(self, cfg: TrainConfig, splits: Any) -> None:
        if not isinstance(splits, VideoSplits):
            raise VitlabError(f"retrieval trains on clips (clips:digits or videofeatures:DIR), not {cfg.data!r}")
        if cfg.model not in FEATURE_MODELS:
            raise VitlabError(f"retrieval trains an MMT model: --set model=mmt, not {cfg.model!r}")
        if cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing or cfg.teacher:
            raise VitlabError("mixup, cutmix, label smoothing and distillation have no meaning for retrieval")
        self.loss_args = {k: v for k, v in cfg.model_args.items() if k in LOSS_ARGS}
        ranking_loss(torch.zeros(2, 2), **self.loss_args)  # a wrong loss name is refused before the run starts
        self.experts = expert_subset(splits.experts, cfg.model_args.get("experts"))  # a wrong name too
        self.text_model = cfg.text_model or MINILM
        self.train = splits.train
        self.counts = torch.tensor([len(c) for c in self.train.captions])
        self.seed = cfg.seed
        self.start_epoch(0)

    def describe(self) -> str:
        loss = self.loss_args.get("loss", "max_margin")
        return f"text-to-video retrieval (MMT, {', '.join(self.experts)}; {self.text_model} captions, {loss} loss)"

    def build_model(self, cfg: TrainConfig, splits: Any) -> nn.Module:
        args = {k: v for k, v in cfg.model_args.items() if k not in (*LOSS_ARGS, "experts")}
        model = create_mmt(self.experts, text_model=self.text_model, drop_path_rate=cfg.drop_path_rate, **args)
        model.pretrained_cfg = {"mean": [0.0], "std": [1.0]}
        return model

    def setup(self, model: nn.Module) -> None:
        pass

    def start_epoch(self, epoch: int) -> None:
        """One uniform draw per clip from a generator of (seed, epoch): the caption each clip trains with."""
        generator = torch.Generator().manual_seed(derive_seed("captions", self.seed, epoch))
        self.draws = torch.rand(len(self.counts), generator=generator)

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        idx = labels.cpu()
        pick = (self.draws[idx] * self.counts[idx]).long()
        texts = [self.train.captions[i][j] for i, j in zip(idx.tolist(), pick.tolist())]
        ids = unwrap(model).tokenize(texts)
        sims = model(ids, *self.train.batch(idx, x.device))  # (B, B): caption i, clip j
        loss = ranking_loss(sims, **self.loss_args)
        return TaskOutput(loss, (sims.argmax(1) == torch.arange(len(idx), device=sims.device)).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, *, splits: Any, **kwargs: Any) -> dict[str, Any]:
        r = evaluate_retrieval(unwrap(model), dataset, batch_size=kwargs.get("batch_size", 64),
                               device=kwargs.get("device", "cpu"), loss_args=self.loss_args)  # fmt: skip
        return r


@torch.no_grad()
def similarities(model: MMT, dataset: Any, *, batch_size: int = 64, device: Any = "cpu") -> tuple[torch.Tensor, int]:
    """(sims [N * q, N] of every clip's first q captions against every clip, q): q is the fewest captions a clip
    has, so that each clip has as many queries (MMT's layout)."""
    q = min(len(c) for c in dataset.captions)
    texts = [c[k] for c in dataset.captions for k in range(q)]
    videos, available = [], []
    for i in range(0, len(dataset), batch_size):
        v, a = model.encode_video(*dataset.batch(torch.arange(i, min(i + batch_size, len(dataset))), device))
        videos.append(v)
        available.append(a)
    video = (torch.cat(videos), torch.cat(available))
    rows = []
    for i in range(0, len(texts), batch_size):
        rows.append(model.similarity(model.encode_text(model.tokenize(texts[i : i + batch_size])), video).float())
    return torch.cat(rows).cpu(), q


def evaluate_retrieval(
    model: nn.Module, dataset: Any, *, batch_size: int = 64, device: Any = "cpu", loss_args: dict | None = None
) -> dict[str, Any]:
    """R@1/5/10, median and mean rank both ways over a split; the ranking loss of its first captions."""
    was_training = model.training
    model.eval()
    sims, q = similarities(model, dataset, batch_size=batch_size, device=device)
    model.train(was_training)
    metrics = retrieval_metrics(sims, queries_per_item=q)
    first = sims[::q]  # (N, N): each clip's first caption
    loss = ranking_loss(first, **(loss_args or {})).item() if len(first) > 1 else 0.0
    return {"loss": loss, "accuracy": metrics["t2v_r1"] / 100, "count": len(dataset), "report": metrics}
