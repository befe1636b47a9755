"""Using a CLIP model: zero-shot classification with prompts, image-text retrieval, and its checkpoint's CLI.

Zero-shot (Radford et al. 2021, section 3.1.4): a class is represented by its name in prompt templates ("a photo of
a {}."); the normalised text embeddings of a class's prompts are averaged and renormalised ("ensembling ... in
embedding space instead of probability space", so it costs one text embedding per class), and an image takes the
class whose embedding is nearest. Descriptions of a class's look ("a flat shoe with a strap") are prompts too,
ensembled the same way.

Retrieval: recall@k from image to text and from text to image over a held-out caption set. Texts are the distinct
captions; an image matches every caption it was given (COCO's five, or its class's captions in a built-in set) and a
caption every image it was given to, so a hit at k is any match among the k nearest.

On scenes (`vitlab.data.scenes`), `item_zero_shot_set` is the one zero-shot measure that every objective is read
by in CLIP's objective comparison (Radford et al. 2021, section 2.3: contrastive here, caption and bag-of-words
prediction in `vitlab.train.captioning`): the single-item scenes of a held-out split, each labelled with its item's
class, and per class the grammar's sentence for a lone item on each background.

Zero-shot learning is measured as in Xian et al., "Zero-Shot Learning - The Good, the Bad and the Ugly" (CVPR 2017):
seen and unseen classes separately (candidates: that group only), and the generalized setting where every class is
a candidate, summarised by the harmonic mean of the seen and unseen accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import to_model_input
from vitlab.errors import VitlabError

RECALL_AT = (1, 5, 10)


def _input_spec(model: nn.Module) -> tuple[int, tuple[int, int], Sequence[float], Sequence[float]]:
    in_chans, h, w = model.default_cfg["input_size"]
    return in_chans, (h, w), model.default_cfg["mean"], model.default_cfg["std"]


@torch.no_grad()
def embed_images(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    features: bool = False,
    num_workers: int = 0,
) -> torch.Tensor:
    """Unit image embeddings [N, embed_dim] of a dataset split in its order (``features=True``: the image tower's
    pre-logits features instead, for probes), with the model's input size and normalisation."""
    in_chans, size, mean, std = _input_spec(model)
    out = []
    for images, _ in dataset.loader(batch_size, shuffle=False, num_workers=num_workers):
        x = to_model_input(images.to(device), in_chans=in_chans, img_size=size, mean=mean, std=std)
        out.append((model.image_features(x) if features else model.encode_image(x)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: nn.Module, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings [T, embed_dim]."""
    return torch.cat(
        [model.encode_text(list(texts[i : i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    )


def class_embeddings(model: nn.Module, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """One unit embedding per class [K, embed_dim]: the renormalised mean of its prompts' unit embeddings."""
    flat = [p for group in prompts for p in group]
    if not flat or any(len(group) == 0 for group in prompts):
        raise VitlabError("every class needs at least one prompt")
    emb = embed_texts(model, flat)
    out, start = [], 0
    for group in prompts:
        out.append(F.normalize(emb[start : start + len(group)].mean(0), dim=-1))
        start += len(group)
    return torch.stack(out)


def name_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    for t in templates:
        if "{}" not in t:
            raise VitlabError(f"prompt template {t!r} has no {{}} for the class name")
    return [[t.format(n) for t in templates] for n in names]


def recall_at_k(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, dict[int, float]]:
    """Image->text and text->image recall@k. ``positives`` [N_images, N_texts] is True where a text describes an
    image; every image and every text needs at least one match."""
    positives = positives.bool()
    if not (positives.any(1).all() and positives.any(0).all()):
        raise VitlabError("every image needs a matching text and every text a matching image")
    sim = image_emb.float() @ text_emb.float().t()  # (N_images, N_texts)
    out: dict[str, dict[int, float]] = {}
    for name, s, pos in (("image_to_text", sim, positives), ("text_to_image", sim.t(), positives.t())):
        top = s.topk(min(max(ks), s.shape[1]), dim=1).indices  # (rows, k)
        hits = pos.gather(1, top)  # (rows, k): is the j-th nearest a match
        out[name] = {k: hits[:, :k].any(1).float().mean().item() for k in ks}
    return out


def caption_positives(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions of a split and the [N_images, N_texts] match matrix."""
    texts = sorted({c for caps in captions for c in caps})
    index = {t: j for j, t in enumerate(texts)}
    positives = torch.zeros(len(captions), len(texts), dtype=torch.bool)
    for i, caps in enumerate(captions):
        positives[i, [index[c] for c in caps]] = True
    return texts, positives


@torch.no_grad()
def retrieval(model: nn.Module, dataset, *, batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Recall@1/5/10 both ways on a caption split (`vitlab.data.captions.CaptionDataset`)."""
    texts, positives = caption_positives(dataset.captions)
    image_emb = embed_images(model, dataset, batch_size=batch_size, device=device)
    return recall_at_k(image_emb, embed_texts(model, texts, batch_size=batch_size), positives)


def zero_shot_accuracy(
    image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, *, unseen: Sequence[int] = ()
) -> dict[str, float]:
    """Top-1 accuracy of nearest-class prediction. With ``unseen`` class indices: seen and unseen accuracy with the
    candidates restricted to that group, and the generalized setting (every class a candidate): accuracy on seen and
    on unseen images and their harmonic mean."""
    labels = labels.long()

    def acc(mask: torch.Tensor, candidates: torch.Tensor) -> float:
        if not mask.any():
            return float("nan")
        logits = image_emb[mask].float() @ class_emb[candidates].float().t()
        return (candidates[logits.argmax(1)] == labels[mask]).float().mean().item()

    every = torch.arange(class_emb.shape[0])
    out = {"accuracy": acc(torch.ones_like(labels, dtype=torch.bool), every)}
    if len(unseen):
        u = torch.tensor(sorted(unseen))
        s = every[~torch.isin(every, u)]
        is_u = torch.isin(labels, u)
        gs, gu = acc(~is_u, every), acc(is_u, every)
        out.update(
            seen=acc(~is_u, s),
            unseen=acc(is_u, u),
            generalized_seen=gs,
            generalized_unseen=gu,
            harmonic_mean=0.0 if gs + gu == 0 else 2 * gs * gu / (gs + gu),
        )
    return out


def item_zero_shot_set(splits: Any, dataset: Any) -> tuple[Any, torch.Tensor, list[str], list[list[str]]] | None:
    """(the single-item scenes of ``dataset`` as a dataset, their item's class [n], the class names, the prompts
    [K][P]: `vitlab.data.scenes.item_zero_shot`), or None when ``dataset`` is not a split of scenes or has no
    single-item scene."""
    from vitlab.data.scenes import item_zero_shot, scenes_of

    scenes = scenes_of(splits, dataset)
    if scenes is None:
        return None
    index, labels, prompts = item_zero_shot(scenes)
    if not len(index):
        return None
    idx = torch.from_numpy(index)
    return dataset.subset(idx, idx), torch.from_numpy(labels), list(scenes.item_names), prompts


def class_prompts(
    names: Sequence[str], *, templates: Sequence[str], descriptions: Sequence[Sequence[str]] | None, kind: str
) -> list[list[str]]:
    """Prompts per class: ``names`` (names in the templates), ``descriptions`` (the class's descriptions) or
    ``both``."""
    if kind not in ("names", "descriptions", "both"):
        raise VitlabError(f"prompts must be names, descriptions or both, got {kind!r}")
    if kind != "names" and not descriptions:
        raise VitlabError("description prompts need descriptions of the classes (a built-in set has them)")
    named = name_prompts(names, templates)
    if kind == "names":
        return named
    described = [list(d) for d in descriptions]  # type: ignore[union-attr]
    return described if kind == "descriptions" else [a + b for a, b in zip(named, described)]


# --- what the CLI calls --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_images(
    checkpoint: str | Path, images: Sequence[str], classes: Sequence[str], *, templates: Sequence[str], top_k: int = 5
) -> list[dict[str, Any]]:
    """Zero-shot class probabilities of image files among ``classes``."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.data.images import decode_image

    model = _clip(from_pretrained(checkpoint), checkpoint)
    in_chans, size, mean, std = _input_spec(model)
    class_emb = class_embeddings(model, name_prompts(classes, templates))
    results = []
    for path in images:
        x = to_model_input(decode_image(path, in_chans=in_chans, img_size=size)[None], in_chans=in_chans, img_size=size,
                           mean=mean, std=std)  # fmt: skip
        probs = (model.scale() * model.encode_image(x) @ class_emb.t()).softmax(-1)[0]
        p, idx = probs.topk(min(top_k, len(classes)))
        results.append({"image": str(path), "top": [{"class": classes[i], "probability": round(v, 6)}
                                                    for v, i in zip(p.tolist(), idx.tolist())]})  # fmt: skip
    return results


def evaluate_clip(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    data_dir: str | None = None,
    split: str = "test",
    prompts: str = "names",
    templates: Sequence[str] | None = None,
    unseen: str | None = None,
    retrieval_too: bool = True,
    batch_size: int = 256,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy (a dataset with classes) and retrieval recall (a caption set) of a CLIP checkpoint on a
    split of ``data``: a classification dataset (fashion-mnist, a folder, ...) or a caption set (captions:...). By
    default the run's own data and held-out split, checked against ``RUN/split.json`` (`vitlab.data.manifest`)."""
    import json

    from vitlab.checkpoint import from_pretrained
    from vitlab.data.captions import BUILTIN, DEFAULT_TEMPLATES, CaptionSplits, resolve_classes
    from vitlab.data.manifest import held_out_split, run_dir_of

    model = _clip(from_pretrained(checkpoint), checkpoint)
    in_chans, size, _, _ = _input_spec(model)
    path = Path(checkpoint)
    train_cfg = json.loads((path / "config.json").read_text()).get("train_config", {}) if path.is_dir() else {}
    # the run's data and options (seed, validation fraction, bad-row policy) give back the split it held out
    splits, dataset, checked = held_out_split(run_dir_of(path), train_cfg, split=split, data=data, data_dir=data_dir,
                                              img_size=size, in_chans=in_chans,
                                              allow_changed_data=allow_changed_data)  # fmt: skip
    result: dict[str, Any] = {"data": splits.name, "split": split, "count": len(dataset), "checked": checked}
    is_captions = isinstance(splits, CaptionSplits)
    if is_captions and retrieval_too:
        result["retrieval"] = retrieval(model, dataset, batch_size=batch_size)
    labels = getattr(dataset, "classes", None) if is_captions else dataset.labels
    if labels is not None and splits.class_names:
        base = splits.name.removeprefix("captions:").split("?")[0].lower()
        info = splits.class_captions if is_captions else BUILTIN.get(base)
        names = list(info.prompt_names) if info else splits.class_names
        tmpl = templates or (info.templates if info else DEFAULT_TEMPLATES)
        class_emb = class_embeddings(
            model, class_prompts(names, templates=tmpl, descriptions=info.descriptions if info else None, kind=prompts)
        )
        held_out = splits.unseen if is_captions and unseen is None else (unseen or "")
        unseen_idx = resolve_classes(held_out, splits.class_names, tuple(names))
        image_emb = embed_images(model, dataset, batch_size=batch_size)
        result["zero_shot"] = zero_shot_accuracy(image_emb, labels, class_emb, unseen=unseen_idx)
        result.update(classes=splits.class_names, unseen=[splits.class_names[k] for k in unseen_idx], prompts=prompts)
    if "retrieval" not in result and "zero_shot" not in result:
        raise VitlabError(f"{splits.name} has neither classes nor captions to evaluate a CLIP model on")
    return result


def _clip(model: nn.Module, source: Any) -> nn.Module:
    if not hasattr(model, "encode_text"):
        raise VitlabError(f"{source} is not a CLIP model (it has no text tower); zero-shot needs one")
    if model.tokenizer is None:
        raise VitlabError(f"{source} has no tokenizer.json beside its weights: CLIP needs it to read prompts")
    return model
