"""The analysis commands as library functions: each reads a checkpoint (and data), computes, and writes its
pictures and numbers into an output directory. `vitlab explain`, `inspect`, `erf` and `probe` call these."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitlab._io import write_json
from vitlab.analysis.attention import attention_maps, attention_rollout
from vitlab.analysis.distance import (
    mean_attention_distance,
    neighbour_contrast,
    patch_distances,
    pos_embed_similarity,
    reference_similarities,
)
from vitlab.analysis.erf import conv_stack, effective_receptive_field
from vitlab.analysis.figures import (
    distance_figure,
    erf_figure,
    explain_figure,
    head_grid_figure,
    pos_embed_figure,
)
from vitlab.analysis.probe import extract_features, few_shot_probe
from vitlab.checkpoint import CONFIG_NAME, from_pretrained
from vitlab.data import build_dataset, to_model_input
from vitlab.data.images import decode_image
from vitlab.errors import VitlabError


def _pooling(model: nn.Module) -> tuple[int, str]:
    """(prefix tokens, "token" or "avg"): how the model's head reads its tokens."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    pool = getattr(model, "global_pool", "token" if prefix else "avg")
    return prefix, "token" if pool == "token" and prefix else "avg"


def _grid(model: nn.Module, n: int) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n:
        return tuple(grid)
    side = math.isqrt(n)
    if side * side != n:
        raise VitlabError(f"cannot lay {n} tokens out on a square grid")
    return side, side


def _final_maps(maps: list[Tensor]) -> list[Tensor]:
    """The square maps of the final sequence length (the tokens the head reads)."""
    square = [m for m in maps if m.shape[-1] == m.shape[-2]]
    n = square[-1].shape[-1]
    return [m for m in square if m.shape[-1] == n]


def describe(source: str | Path, *, width: int = 44, data: str | None = None) -> str:
    """What a figure says a model is, so that two checkpoints both named ``best`` cannot be confused: the variant
    with the sizes its run changed, the data it trained on (or ``data``, for a figure over several runs' class
    subsets) and the step of the checkpoint ("untrained" for a registered name). Wrapped to ``width`` characters a
    line."""
    from vitlab import list_models

    if str(source) in list_models():
        return f"{source} (untrained)"
    file = Path(source) / CONFIG_NAME
    config = json.loads(file.read_text()) if file.is_file() else {}
    name = config.get("model_name") or Path(source).name
    sizes = (config.get("train_config") or {}).get("model_args") or {}
    if sizes:
        name += " (" + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ")"
    data = data or config.get("dataset")
    trained = [data] if data else []
    if config.get("step") is not None:
        trained.append(f"step {config['step']}")
    return "\n".join(textwrap.wrap(", ".join([name, *trained]), width))


def explain(
    checkpoint: str | Path,
    images: list[str],
    out: str | Path,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> list[dict[str, Any]]:
    """Per image: ``<name>_rollout.png`` (the image with the rollout heat map, the prediction in the title) and
    ``<name>_heads.png`` (per-layer, per-head attention of the class token, or of the mean token, over the
    patches)."""
    model = from_pretrained(checkpoint)
    in_chans, h, w = model.default_cfg["input_size"]
    names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(model.num_classes)]
    prefix, pool = _pooling(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        image = decode_image(path, in_chans=in_chans, img_size=(h, w))
        x = to_model_input(image[None], in_chans=in_chans, img_size=(h, w), **_norm(model))
        maps, logits = attention_maps(model, x, return_output=True)
        relevance = attention_rollout(
            maps, num_prefix_tokens=prefix, pool=pool, head_fusion=head_fusion, discard_ratio=discard_ratio
        )[0]
        grid = _grid(model, relevance.numel())
        prob, idx = logits.softmax(-1)[0].max(0)
        title = f"{Path(path).name}: {names[idx]} ({prob:.1%})"
        stem = Path(path).stem
        explain_figure(image, relevance.view(*grid), title, out / f"{stem}_rollout.png")
        final = _final_maps(maps)
        rows = [(m[0, :, 0, prefix:] if pool == "token" else m[0, :, prefix:, prefix:].mean(1)) for m in final]
        if rows[0].shape[-1] == grid[0] * grid[1]:
            head_grid_figure(
                rows,
                grid,
                f"{title}: {'class token' if pool == 'token' else 'mean token'} attention",
                out / f"{stem}_heads.png",
            )
        results.append(
            {
                "image": str(path),
                "class": names[idx],
                "probability": round(prob.item(), 6),
                "rollout": str(out / f"{stem}_rollout.png"),
            }
        )
    return results


def _norm(model: nn.Module) -> dict[str, Any]:
    return {"mean": model.default_cfg["mean"], "std": model.default_cfg["std"]}


def _splits(model: nn.Module, data: str, data_dir: str | None):
    in_chans, h, w = model.default_cfg["input_size"]
    return build_dataset(data, data_dir=data_dir, img_size=(h, w), in_chans=in_chans)


@torch.no_grad()
def inspect(
    checkpoint: str | Path, data: str, out: str | Path, *, data_dir: str | None = None, images: int = 64
) -> dict[str, Any]:
    """Mean attention distance per head and layer over ``images`` test images, trained and at a fresh
    initialisation of the same architecture (``distance.png``), and the position-embedding similarity grid beside a
    random and a 2-D sine-cosine table's (``pos_embed.png``) when the model has a table; numbers in
    ``inspect.json``."""
    model = from_pretrained(checkpoint)
    splits = _splits(model, data, data_dir)
    in_chans, h, w = model.default_cfg["input_size"]
    split = splits.test if splits.test is not None else splits.val
    batch, _ = next(iter(split.loader(images, shuffle=False)))
    x = to_model_input(batch, in_chans=in_chans, img_size=(h, w), **_norm(model))
    prefix, _ = _pooling(model)
    final = _final_maps(attention_maps(model, x))
    n = final[-1].shape[-1] - prefix
    grid = _grid(model, n)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (h // grid[0], w // grid[1]))
    dist = mean_attention_distance(final, grid, patch, prefix)
    with torch.random.fork_rng():  # a fixed draw, and the caller's random state left alone
        torch.manual_seed(0)
        fresh = _fresh(model)
    init = mean_attention_distance(_final_maps(attention_maps(fresh, x)), grid, patch, prefix)
    uniform = patch_distances(grid, patch).mean().item()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = describe(checkpoint)
    distance_figure(
        dist,
        out / "distance.png",
        f"mean attention distance, {len(x)} {splits.name} test images\n{label}",
        init=init,
        uniform=uniform,
    )
    result: dict[str, Any] = {
        "data": splits.name,
        "images": len(x),
        "grid": list(grid),
        "patch_size": list(patch),
        "mean_attention_distance": dist.tolist(),
        "mean_attention_distance_init": init.tolist(),
        "uniform_attention_distance": uniform,
    }
    try:
        sim, pgrid = pos_embed_similarity(model)
    except VitlabError as e:  # a model without a position table (CPVT, CvT, Swin): say so in the JSON
        result["pos_embed_similarity"] = None
        result["pos_embed_note"] = str(e)
    else:
        tables = {"trained": sim, **reference_similarities(pgrid, model.pos_embed.shape[-1])}
        contrast = {name: neighbour_contrast(t, pgrid) for name, t in tables.items()}
        panels = [
            (f"{name} table\nnear {c['near']:.2f}, far {c['far']:.2f}", tables[name]) for name, c in contrast.items()
        ]
        title = f"position-embedding similarity (mean with the 8 neighbours / 2+ steps away)\n{label}"
        pos_embed_figure(panels, pgrid, out / "pos_embed.png", title)
        result["pos_embed_similarity"] = sim.tolist()
        result["pos_embed_near_far"] = contrast
    write_json(out / "inspect.json", result)
    return result


def erf_study(
    out: str | Path, *, checkpoint: str | None = None, compare: tuple[str, ...] = (), inits: int = 8, size: int = 64
) -> dict[str, Any]:
    """(a) stacks of 3x3 convolutions of increasing depth at random initialisation; (b) ``checkpoint`` before
    (a fresh initialisation of the same architecture) and after training; (c) the models in ``compare`` (registered
    names or checkpoints) side by side. Writes ``erf_depth.png``, ``erf_training.png``, ``erf_compare.png`` and
    ``erf.json`` with the 95%-mass radius and its ratio to the theoretical field."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"depth": {}}
    panels = []
    for depth in (1, 2, 4, 8, 16):
        r = effective_receptive_field(lambda d=depth: conv_stack(d, 32), (1, size, size), inits=inits)
        result["depth"][depth] = _erf_numbers(r)
        panels.append((f"{depth} conv layers\nr95 {r.radius95:.1f} / {r.theoretical_radius:.1f} px", r.grad))
    erf_figure(panels, out / "erf_depth.png", "ERF of 3x3 conv stacks at random initialisation (ReLU)")
    if checkpoint is not None:
        trained = from_pretrained(checkpoint)
        shape = tuple(trained.default_cfg["input_size"])
        before = effective_receptive_field(lambda: _fresh(trained), shape, inits=inits)
        after = effective_receptive_field(trained, shape, inits=inits)
        result["training"] = {"before": _erf_numbers(before), "after": _erf_numbers(after)}
        erf_figure(
            [
                (f"before training\nr95 {before.radius95:.1f} px", before.grad),
                (f"after training\nr95 {after.radius95:.1f} px", after.grad),
            ],
            out / "erf_training.png",
            f"ERF of {describe(checkpoint, width=60)}",
        )
    if compare:
        panels, result["compare"] = [], {}
        for source in compare:
            model = _model(source)
            shape = tuple(model.default_cfg["input_size"])
            r = effective_receptive_field(
                model if Path(source).exists() else (lambda s=source: _model(s)), shape, inits=inits
            )
            label = describe(source, width=30)
            result["compare"][source] = {**_erf_numbers(r), "label": label}
            panels.append((f"{label}\nr95 {r.radius95:.1f} / {r.theoretical_radius:.1f} px", r.grad))
        erf_figure(panels, out / "erf_compare.png", "ERF of the last feature map's centre")
    write_json(out / "erf.json", result)
    return result


def _erf_numbers(r) -> dict[str, float]:
    return {"radius95": r.radius95, "theoretical_radius": r.theoretical_radius, "ratio": r.ratio}


def _fresh(model: nn.Module) -> nn.Module:
    from vitlab._registry import build_model, get_architecture

    return build_model(get_architecture(model.arch), model.model_name, dict(model.init_kwargs), model.default_cfg)


def _model(source: str) -> nn.Module:
    from vitlab import create_model, list_models

    if source in list_models():
        return create_model(source)
    return from_pretrained(source)


def probe(
    checkpoint: str | Path,
    data: str,
    out: str | Path | None = None,
    *,
    data_dir: str | None = None,
    layer: int | None = None,
    shots: tuple = (1, 2, 4, 8, 16, "all"),
    draws: int = 5,
    limit: int | None = 10000,
) -> dict[str, Any]:
    """Few-shot and full linear probes on the checkpoint's frozen features; ``probe.json`` and ``probe.png`` in
    ``out`` (default: beside the checkpoint)."""
    model = from_pretrained(checkpoint)
    splits = _splits(model, data, data_dir)
    test_split = splits.test if splits.test is not None else splits.val
    train = extract_features(model, splits.train, layer=layer, limit=limit)
    test = extract_features(model, test_split, layer=layer, limit=limit)
    res = few_shot_probe(train, test, shots=shots, draws=draws)
    out = Path(out) if out else Path(checkpoint) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "data": splits.name,
        "layer": layer,
        "train_images": len(train[1]),
        "test_images": len(test[1]),
        "shots": res,
    }
    write_json(out / "probe.json", result)
    title = f"linear probe on {splits.name}\nfeatures of {describe(checkpoint, width=60)}"
    _probe_figure(res, splits.num_classes, out / "probe.png", title)
    return result


def _probe_figure(res: dict[str, dict[str, float]], num_classes: int, path: Path, title: str) -> None:
    from vitlab._plot import pyplot

    plt = pyplot()
    ks = [k for k in res if k != "all"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(
        [int(k) for k in ks],
        [res[k]["accuracy"] for k in ks],
        yerr=[res[k]["std"] for k in ks],
        marker="o",
        capsize=3,
        label="k-shot probe",
    )
    if "all" in res:
        ax.axhline(res["all"]["accuracy"], color="k", ls="--", label="all labels")
    ax.axhline(1 / num_classes, color="gray", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="labelled images per class (k)", ylabel="test accuracy")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def openset(
    model: str,
    data: str,
    known: str,
    out: str | Path,
    *,
    data_dir: str | None = None,
    train_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Open-set recognition end to end: train ``model`` on the ``known`` classes of ``data`` only (e.g. "0-5"),
    then score the test images of known and held-out classes by maximum logit and maximum softmax probability.
    Writes ``openset.json`` and one histogram per score into ``out`` (the run directory is ``out/run``)."""
    from vitlab.analysis.figures import histogram_figure
    from vitlab.analysis.openset import auroc, fpr_at_tpr, openset_scores
    from vitlab.data import subset_classes
    from vitlab.train import TrainConfig, train

    out = Path(out)
    cfg = TrainConfig.from_dict(
        {
            "model": model,
            "data": data,
            "data_dir": data_dir,
            "classes": known,
            "out": str(out / "run"),
            **(train_options or {}),
        }
    )
    summary = train(cfg)
    best = from_pretrained(out / "run" / "checkpoints" / "best")
    in_chans, h, w = best.default_cfg["input_size"]
    splits = build_dataset(
        data, data_dir=data_dir, img_size=(h, w), in_chans=in_chans, seed=cfg.seed, val_fraction=cfg.val_fraction
    )
    parts = {"known": subset_classes(splits, known), "unknown": subset_classes(splits, known, exclude=True)}
    scores = {part: _openset_logits(best, s) for part, s in parts.items()}
    label = describe(out / "run" / "checkpoints" / "best", width=60)
    result: dict[str, Any] = {
        "model": model,
        "model_label": label,
        "data": splits.name,
        "class_names": splits.class_names,
        "known_classes": parts["known"].class_names,
        "unknown_classes": parts["unknown"].class_names,
        "closed_set_test_accuracy": summary["test_accuracy"],
        "known_test_images": len(scores["known"][1]),
        "unknown_test_images": len(scores["unknown"][1]),
        "train_time_s": summary["train_time_s"],
        "per_unknown_class": {},
    }
    (known_logits, _), (unknown_logits, unknown_labels) = scores["known"], scores["unknown"]
    k_scores, u_scores = openset_scores(known_logits), openset_scores(unknown_logits)
    for name in ("max_logit", "max_softmax"):
        k, u = k_scores[name], u_scores[name]
        metrics = {"auroc": auroc(k, u), "fpr95": fpr_at_tpr(k, u, 0.95)}
        result[name] = metrics
        histogram_figure(k, u, name, metrics, out / f"openset_{name}.png", model=label)
    # each unknown class against all known images: which unknown classes the model mistakes for known ones
    for c, cname in enumerate(parts["unknown"].class_names):
        result["per_unknown_class"][cname] = {
            name: auroc(k_scores[name], u_scores[name][unknown_labels == c]) for name in ("max_logit", "max_softmax")
        }
    write_json(out / "openset.json", result)
    return result


@torch.no_grad()
def _openset_logits(model: nn.Module, splits) -> tuple[Tensor, Tensor]:
    """fp32 logits ``[B, K]`` and labels ``[B]`` of the test split (val where there is none)."""
    from vitlab.train.evaluate import autocast

    in_chans, h, w = model.default_cfg["input_size"]
    split = splits.test if splits.test is not None else splits.val
    logits, labels = [], []
    for images, y in split.loader(256, shuffle=False):
        x = to_model_input(images, in_chans=in_chans, img_size=(h, w), **_norm(model))
        with autocast(torch.device("cpu"), "fp32"):
            logits.append(model(x).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def openset_splits(
    model: str,
    data: str,
    out: str | Path,
    *,
    splits: int = 5,
    num_known: int = 6,
    seed: int = 0,
    data_dir: str | None = None,
    train_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`openset` over ``splits`` random draws of ``num_known`` known classes (`random_known_splits`, ``seed``),
    one run per split in ``out/split-<i>``, then `summarise_openset_splits`."""
    from vitlab.analysis.openset import random_known_splits
    from vitlab.data.sources import describe_dataset

    num_classes = describe_dataset(data, data_dir=data_dir)["num_classes"]
    out = Path(out)
    for i, known in enumerate(random_known_splits(num_classes, num_known, splits, seed=seed)):
        spec = ",".join(map(str, known))
        openset(model, data, spec, out / f"split-{i}", data_dir=data_dir, train_options=train_options)
    return summarise_openset_splits(out, seed=seed)


def summarise_openset_splits(out: str | Path, *, seed: int | None = None) -> dict[str, Any]:
    """The `openset` runs in ``out/split-<i>`` together: each score's AUROC and the closed-set accuracy averaged
    over the splits, and each class's AUROC as an unknown class averaged over the splits that held it out.
    ``openset.json`` and ``openset_splits.png`` (closed-set accuracy against AUROC per split, Vaze et al.'s link)
    in ``out``."""
    from statistics import mean, pstdev

    out = Path(out)
    dirs = sorted(out.glob("split-*"), key=lambda d: int(d.name.split("-")[1]))
    runs = [json.loads((d / "openset.json").read_text()) for d in dirs]
    if not runs:
        raise VitlabError(f"no split-<i>/openset.json in {str(out)!r}: run vitlab openset --splits N there first")
    # the figure's label: the run's data with one split's class subset replaced by what all the splits share
    first = dirs[0] / "run" / "checkpoints" / "best"
    trained_on = json.loads((first / CONFIG_NAME).read_text()).get("dataset", runs[0]["data"])
    known_label = f" ({len(runs[0]['known_classes'])} random known classes a split)"
    result: dict[str, Any] = {
        "model": runs[0]["model"],
        "model_label": describe(first, width=80, data=re.sub(r" \(classes [^)]*\)", known_label, trained_on)),
        "data": runs[0]["data"],
        "seed": seed,
        "splits": [
            {k: r[k] for k in ("known_classes", "unknown_classes", "closed_set_test_accuracy", "train_time_s")}
            | {name: r[name]["auroc"] for name in ("max_logit", "max_softmax")}
            for r in runs
        ],
        "per_unknown_class": {},
    }
    for key in ("closed_set_test_accuracy", "max_logit", "max_softmax"):
        values = [split[key] for split in result["splits"]]
        result[key] = {"mean": mean(values), "std": pstdev(values)}
    for c in [c for c in runs[0]["class_names"] if any(c in r["per_unknown_class"] for r in runs)]:
        held = [r["per_unknown_class"][c] for r in runs if c in r["per_unknown_class"]]
        result["per_unknown_class"][c] = {"splits": len(held)} | {
            name: mean(h[name] for h in held) for name in ("max_logit", "max_softmax")
        }
    write_json(out / "openset.json", result)
    _openset_splits_figure(result, out / "openset_splits.png")
    return result


def _openset_splits_figure(result: dict[str, Any], path: Path) -> None:
    """Left: closed-set accuracy against AUROC, one dot per split and score; right: AUROC per unknown class."""
    from vitlab._plot import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    acc = [s["closed_set_test_accuracy"] for s in result["splits"]]
    classes = list(result["per_unknown_class"])
    for i, name in enumerate(("max_logit", "max_softmax")):
        left.scatter(acc, [s[name] for s in result["splits"]], label=name.replace("_", " "), color=f"C{i}")
        right.bar(
            np.arange(len(classes)) + (i - 0.5) * 0.4,
            [result["per_unknown_class"][c][name] for c in classes],
            width=0.4,
            color=f"C{i}",
            label=name.replace("_", " "),
        )
    left.set(xlabel="closed-set test accuracy (known classes)", ylabel="AUROC (known vs unknown)")
    left.set_title(f"{len(acc)} random splits", fontsize=8)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.axhline(0.5, color="gray", ls=":", lw=1)
    right.set_xticks(np.arange(len(classes)), classes, rotation=40, ha="right", fontsize=7)
    right.set(ylabel="AUROC as the unknown class", ylim=(0, 1))
    right.set_title("per unknown class, mean over the splits holding it out", fontsize=8)
    fig.suptitle(f"open set: {result['model_label']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
