"""Caption checkpoints at work: `evaluate_captioner` (`vitlab caption eval`) scores the captions a checkpoint
generates for its run's held-out images, and `caption_images` (`vitlab caption predict`) captions image files and
draws where the decoder looked for each word (Xu et al. 2015, figures 2-3: the image under each word's map).

`nearest_neighbour_captions` is the baseline of Devlin et al., "Exploring Nearest Neighbor Approaches for Image
Captioning" (arXiv:1505.04467, 2015): an image takes a caption of its nearest training images, no decoder at all
(`vitlab caption eval --baseline nearest-encoder|nearest-pixels`, scored by the same metrics).

Training is the loop's (`vitlab.train.captioning`); the metrics are `vitlab.metrics.captioning`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import to_model_input
from vitlab.errors import VitlabError
from vitlab.metrics.captioning import CAPTION_METRICS, attention_correctness, caption_scores, metrics_unavailable
from vitlab.models.text import WORD_UNK


def load_captioner(checkpoint: str | Path) -> nn.Module:
    """A caption checkpoint (`vitlab caption train`'s), in eval mode; anything else is one line."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.models.caption import CaptionModel

    model = from_pretrained(checkpoint)
    if not isinstance(model, CaptionModel):
        raise VitlabError(f"{checkpoint} is not a caption model (vitlab caption train writes them)")
    if model.tokenizer is None:
        raise VitlabError(f"{checkpoint} has no tokenizer.json beside its weights: a captioner needs it to write words")
    return model.eval()


def _model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> the model's normalised input (its size, channels, mean and std)."""
    in_chans, h, w = model.default_cfg["input_size"]
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]  # the run's data's, set by from_pretrained
    return to_model_input(images, in_chans=in_chans, img_size=(h, w), mean=mean, std=std)


@torch.no_grad()
def generate_captions(model: nn.Module, dataset: Any, *, beam_size: int = 3, batch_size: int = 64) -> dict[str, Any]:
    """Captions of every image of ``dataset`` in its order: ``texts``, the token ids of each (``tokens``, up to
    <eos>), the attention of each token (``maps`` [T, L] each, None for a decoder without maps) and the ``grid``."""
    texts, tokens, maps, grid = [], [], [], None
    for images, _ in dataset.loader(batch_size, shuffle=False):
        out = model.generate(_model_input(model, images), beam_size=beam_size)
        texts += model.texts(out.tokens)
        for i, row in enumerate(out.tokens.tolist()):
            n = row.index(model.eos_id) if model.eos_id in row else len(row)
            tokens.append(row[:n])
            if out.attention is not None:
                maps.append(out.attention[i, :n].cpu())
        grid = out.grid
    return {"texts": texts, "tokens": tokens, "maps": maps if maps else None, "grid": grid}


def named_positions(
    model: nn.Module, tokens: list[int], items: Sequence[tuple[str, Sequence[int]]]
) -> list[tuple[int, Sequence[int]]]:
    """(position, box) of each generated token that names one of the image's ``items`` (name, box): the name's last
    token ("boot" of "ankle boot"), where the tokens before it spell the rest of the name, split by the model's own
    vocabulary. An item named that the image does not hold counts nowhere, and a name the vocabulary cannot spell
    (an <unk> in it) names nothing: it would match any rare word."""
    unk = model.tokenizer.tokenizer.token_to_id(WORD_UNK)
    found = []
    for name, box in items:
        spelled = model.tokenize(name)[0].tolist()
        name_ids = [i for i in spelled if i not in (model.bos_id, model.eos_id, model.pad_id)]
        if unk in name_ids:
            continue
        n = len(name_ids)
        found += [(t + n - 1, box) for t in range(len(tokens) - n + 1) if tokens[t : t + n] == name_ids]
    return found


def scene_items(splits: Any, split: str, dataset: Any) -> list[list[tuple[str, list[int]]]] | None:
    """Each image's (item name, box) of a scenes split (`vitlab.data.scenes`), or None for other data or a split
    that is not the scenes' own (a subset)."""
    scenes = getattr(splits, "scenes", {}).get(split)
    if scenes is None or len(scenes) != len(dataset) or scenes.captions != dataset.captions:
        return None
    return [
        [(scenes.item_names[k], box) for k, box in zip(classes.tolist(), boxes.tolist()) if k >= 0]
        for classes, boxes in zip(scenes.item_classes, scenes.boxes)
    ]


# --- the nearest-neighbour baseline (Devlin et al. 2015) ----------------------------------------------------------
BASELINES = ("nearest-encoder", "nearest-pixels")


@torch.no_grad()
def pooled_features(model: nn.Module, dataset: Any, *, features: str, batch_size: int = 64) -> torch.Tensor:
    """One vector per image of ``dataset`` [N, D]: ``encoder``, the mean of the captioner's annotation vectors (what
    the LSTM decoders' initial state and the bag-of-words head read); ``pixels``, the model's normalised input,
    flattened."""
    rows = []
    for images, _ in dataset.loader(batch_size, shuffle=False):
        x = _model_input(model, images)
        rows.append(x.flatten(1) if features == "pixels" else model.encode(x)[0].float().mean(1))  # (B, D)
    return torch.cat(rows)


def consensus_caption(candidates: Sequence[str]) -> str:
    """Devlin et al.'s consensus re-ranking (section 3): the candidate most similar to the other candidates, the
    similarity the mean of BLEU-1..4 (pycocoevalcap's sentence scores, on lower-cased words) against them; the first
    of equals. (Not CIDEr: its document frequencies from a handful of candidates give the words they share, the
    consensus itself, no weight.)"""
    from pycocoevalcap.bleu.bleu import Bleu

    if len(candidates) == 1:
        return candidates[0]
    words = [" ".join(re.findall(r"[\w'-]+", c.lower())) or c for c in candidates]
    gts = {j: [w for i, w in enumerate(words) if i != j] for j in range(len(words))}
    _, per_n = Bleu(4).compute_score(gts, {j: [w] for j, w in enumerate(words)}, verbose=0)  # 4 lists [n]
    similarity = [sum(scores[j] for scores in per_n) / 4 for j in range(len(words))]
    return candidates[max(range(len(words)), key=lambda j: (similarity[j], -j))]


def nearest_neighbour_captions(
    train_features: torch.Tensor, features: torch.Tensor, train_captions: Sequence[Sequence[str]], *, k: int = 1
) -> list[str]:
    """A caption for each row of ``features`` [N, D]: the `consensus_caption` of the captions of its ``k`` nearest
    rows of ``train_features`` [M, D] by cosine similarity (Devlin et al. 2015; k = 1: one of the nearest training
    image's own captions)."""
    if not 1 <= k <= len(train_features):
        raise VitlabError(f"nearest neighbours need 1 <= k <= {len(train_features)} training images, got k={k}")
    sim = F.normalize(features.float(), dim=1) @ F.normalize(train_features.float(), dim=1).t()  # (N, M)
    nearest = sim.topk(k, dim=1).indices.tolist()
    return [consensus_caption([c for j in row for c in train_captions[j]]) for row in nearest]


def evaluate_captioner(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    data_dir: str | None = None,
    split: str = "test",
    beam_size: int = 3,
    batch_size: int = 64,
    allow_changed_data: bool = False,
    out: str | Path | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and attention correctness of a checkpoint's generated captions on a split
    of its run's data (by default the run's own held-out split, checked against ``RUN/split.json``), written to
    ``out`` (default CHECKPOINT/eval-SPLIT) as caption_metrics.json, with the captions in captions.json. The
    metrics that need Java are None where it is missing, with the reason (``unavailable``).

    ``baseline`` (`BASELINES`) scores the nearest-neighbour captions instead (`nearest_neighbour_captions` over the
    run's training images, by the checkpoint's encoder features or by pixels; default out
    CHECKPOINT/eval-SPLIT-BASELINE)."""
    if baseline is not None and baseline not in BASELINES:
        raise VitlabError(f"unknown caption baseline {baseline!r}; choose from {', '.join(BASELINES)}")
    from vitlab._io import write_json
    from vitlab.data.manifest import held_out_split, run_dir_of

    path = Path(checkpoint)
    model = load_captioner(path)
    in_chans, h, w = model.default_cfg["input_size"]
    train_cfg = json.loads((path / "config.json").read_text()).get("train_config", {}) if path.is_dir() else {}
    splits, dataset, checked = held_out_split(run_dir_of(path), train_cfg, split=split, data=data, data_dir=data_dir,
                                              img_size=(h, w), in_chans=in_chans,
                                              allow_changed_data=allow_changed_data)  # fmt: skip
    if baseline is None:
        generated = generate_captions(model, dataset, beam_size=beam_size, batch_size=batch_size)
    else:
        features = baseline.removeprefix("nearest-")
        train_features = pooled_features(model, splits.train, features=features, batch_size=batch_size)
        query = pooled_features(model, dataset, features=features, batch_size=batch_size)
        texts = nearest_neighbour_captions(train_features, query, splits.train.captions)
        generated = {"texts": texts, "maps": None}
    unavailable = metrics_unavailable()
    # the raw reference captions, never mapped through the vocabulary (see vitlab.metrics.captioning)
    scores = caption_scores(dataset.captions, generated["texts"]) if unavailable is None else {}
    metrics: dict[str, Any] = {k: scores.get(k) for k in CAPTION_METRICS}
    items = scene_items(splits, split, dataset)
    metrics["attention_correctness"] = None
    if generated["maps"] is not None and items is not None:
        named = [named_positions(model, t, i) for t, i in zip(generated["tokens"], items)]
        size = tuple(splits.scenes[split].images.shape[1:3])
        metrics["attention_correctness"] = attention_correctness(
            generated["maps"], named, grid=generated["grid"], image_size=size
        )
    name = f"eval-{split}" + (f"-{baseline}" if baseline else "")
    where = Path(out) if out else (path if path.is_dir() else path.parent) / name
    result = {**metrics, "data": splits.name, "split": split, "count": len(dataset), "beam_size": beam_size,
              "baseline": baseline, "unavailable": unavailable, "checked": checked}  # fmt: skip
    where.mkdir(parents=True, exist_ok=True)
    write_json(where / "caption_metrics.json", result)
    write_json(where / "captions.json", [{"caption": c, "references": r}
                                         for c, r in zip(generated["texts"], dataset.captions)])  # fmt: skip
    return {**result, "json": str(where / "caption_metrics.json")}


# --- captions of image files ---------------------------------------------------------------------------------------
def caption_images(
    checkpoint: str | Path, images: Sequence[str | Path], *, beam_size: int = 3, attention_out: str | Path | None = None
) -> list[dict[str, Any]]:
    """The caption of each image file, and with ``attention_out`` a figure per image (ATTENTION_OUT/STEM.png) of
    the image under the map of each word. An image that cannot be read is one line naming it."""
    from vitlab.data.images import decode_image

    model = load_captioner(checkpoint)
    in_chans, h, w = model.default_cfg["input_size"]
    results = []
    for file in images:
        image = decode_image(file, in_chans=in_chans, img_size=(h, w))  # (C, H, W) uint8; a bad file: one line
        out = model.generate(_model_input(model, image[None]), beam_size=beam_size)
        caption = model.texts(out.tokens)[0]
        row = out.tokens[0].tolist()
        n = row.index(model.eos_id) if model.eos_id in row else len(row)
        words = [model.tokenizer.tokenizer.id_to_token(i) for i in row[:n]]
        result: dict[str, Any] = {"image": str(file), "caption": caption, "figure": None}
        if attention_out is not None and out.attention is not None:
            figure = Path(attention_out) / f"{Path(file).stem}.png"
            attention_figure(image, words, out.attention[0, :n], out.grid, figure)
            result["figure"] = str(figure)
        results.append(result)
    return results


def attention_figure(
    image: torch.Tensor, words: Sequence[str], maps: torch.Tensor, grid: tuple[int, int], path: str | Path
) -> None:
    """The paper's figure: a grid of panels, the image and then, per word, the image under that word's map [T, L]
    (upsampled from the (h, w) grid onto the image), the word as the panel's title."""
    from vitlab._plot import pyplot

    plt = pyplot()
    C, H, W = image.shape
    picture = image.permute(1, 2, 0).numpy() if C == 3 else image[0].numpy()  # (H, W, 3) or (H, W)
    up = F.interpolate(maps.float().view(len(words), 1, *grid), size=(H, W), mode="bilinear", align_corners=False)
    panels = len(words) + 1
    cols = min(panels, 5)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture, cmap="gray" if C == 1 else None)
    axes.flat[0].set_title("image")
    for ax, word, alpha in zip(axes.flat[1:], words, up[:, 0]):
        ax.imshow(picture, cmap="gray" if C == 1 else None)
        ax.imshow(alpha.numpy(), cmap="gray", alpha=0.6, extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        ax.set_title(word)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
