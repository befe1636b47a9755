"""CLIP's objective claim, measured: one image encoder trained three ways on the same scenes and budget.

    python benchmarks/clip_objectives.py                       # 3 objectives x 6 min of training (about 22 min)
    python benchmarks/clip_objectives.py --budget 8m --count 4000 --out runs/clip_objectives
    python benchmarks/clip_objectives.py --probe               # the same runs (not retrained), and linear probes
    python benchmarks/clip_objectives.py --quick               # 3 x 20 s on 300 scenes: the pipeline, no result

Radford et al. 2021 (CLIP, arXiv:2103.00020), section 2.3 and Figure 2: predicting a caption's exact words with a
transformer language model learned zero-shot ImageNet classification about 3x more slowly (in images seen) than
predicting a bag of its words, and the contrastive objective was about 4x more efficient again. Here, on scenes
(`vitlab.data.scenes`), each objective trains the same image encoder (``--model``, at the scenes' size), with the
same batch, learning rate and time budget, one after the other, through the training loop (`vitlab.train.train`):

* ``caption``: `vitlab caption train --decoder transformer` (the language model reads the image's tokens);
* ``bow``: `vitlab caption train --decoder bow` (a linear head over the vocabulary, Joulin et al. 2016);
* ``contrastive``: `vitlab clip train --text-model text_transformer_tiny`.

Every validation of every run measures the same zero-shot classification (``val_zero_shot`` in the run's
metrics.jsonl; `vitlab.zeroshot.item_zero_shot_set`): the validation scenes holding one item, labelled with its
Fashion-MNIST class among 10, each class prompted by the grammar's sentence for a lone item on each background.
Images seen = step x batch. For each ``--thresholds`` accuracy the table gives the images each objective saw before
its first validation at or above it, and the ratios caption / bow and bow / contrastive beside CLIP's 3x and 4x.

Written: ``--out``/clip_objectives.json, clip_objectives.md (the table) and ``--figure`` (zero-shot accuracy
against images seen, the three curves). Finished runs (a summary.json) are read again, not retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vitlab._io import write_json
from vitlab._plot import pyplot
from vitlab.data.scenes import parse_scene_spec
from vitlab.train import TrainConfig, train
from vitlab.train.budget import parse_duration
from vitlab.train.report import read_metrics

OBJECTIVES = {  # name -> (what it is, the options that make the run that objective)
    "caption": ("transformer language model (caption prediction)", {"caption_args": {"decoder": "transformer"}}),
    "bow": ("bag of words (Joulin et al. 2016)", {"caption_args": {"decoder": "bow"}}),
    "contrastive": ("contrastive (CLIP)", {"text_model": "text_transformer_tiny"}),
}
CLIP_RATIOS = {"caption/bow": 3.0, "bow/contrastive": 4.0}  # Radford et al. 2021, section 2.3


def run_config(objective: str, args: argparse.Namespace) -> TrainConfig:
    """The same encoder, data, batch, learning rate, budget and seed for every objective; only the head differs."""
    size = int(args.data.split("size=")[1].split("&")[0]) if "size=" in args.data else 64
    return TrainConfig.from_sources(
        None,
        model=args.model,
        model_args={"img_size": size},
        data=args.data,
        batch_size=args.batch_size,
        lr=args.lr,
        budget_s=parse_duration(args.budget),
        eval_every=args.eval_every,
        seed=args.seed,
        precision=args.precision,
        out=str(Path(args.out) / objective),
        **OBJECTIVES[objective][1],
    )


def images_to_reach(records: list[dict[str, Any]], threshold: float, batch_size: int) -> int | None:
    """Images seen (step x batch) at the first validation whose zero-shot accuracy is at least ``threshold``; None
    when none is (the run did not reach it within its budget)."""
    for r in records:
        if r.get("val_zero_shot") is not None and r["val_zero_shot"] >= threshold:
            return int(r["step"]) * batch_size
    return None


def ratio(slow: int | None, fast: int | None, slow_seen: int, fast_seen: int) -> str:
    """slow / fast as text: '>x' where only the faster objective reached the accuracy (x from the slower one's whole
    run), '<x' where only the slower one did, 'n/a' where neither."""
    if slow is not None and fast is not None:
        return f"{slow / fast:.2f}"
    if fast is not None:
        return f">{slow_seen / fast:.2f}"
    if slow is not None:
        return f"<{slow / fast_seen:.2f}"
    return "n/a"


def train_objective(objective: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = run_config(objective, args)
    run_dir = Path(cfg.out)
    start = time.perf_counter()
    if not (run_dir / "summary.json").exists():
        print(f"[{objective}] training {run_dir} ({OBJECTIVES[objective][0]})", flush=True)
        train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    return {
        "objective": objective,
        "what": OBJECTIVES[objective][0],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "wall_s": round(time.perf_counter() - start, 1),
        "images_per_s": summary["images_per_s"],
        "curve": [(int(r["step"]) * args.batch_size, r.get("val_zero_shot")) for r in records],
        "records": records,
    }


def table(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    rows, lines = [], []
    seen = {k: r["steps"] * args.batch_size for k, r in runs.items()}
    lines.append("| zero-shot accuracy | caption (LM) | bag of words | contrastive | caption / bow (CLIP: 3x) "
                 "| bow / contrastive (CLIP: 4x) |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")
    for t in args.thresholds:
        need = {k: images_to_reach(r["records"], t, args.batch_size) for k, r in runs.items()}
        row = {
            "threshold": t,
            **{f"images_{k}": v for k, v in need.items()},
            "caption/bow": ratio(need["caption"], need["bow"], seen["caption"], seen["bow"]),
            "bow/contrastive": ratio(need["bow"], need["contrastive"], seen["bow"], seen["contrastive"]),
        }
        rows.append(row)
        cells = [f"{need[k]:,}" if need[k] is not None else f"not reached in {seen[k]:,}" for k in OBJECTIVES]
        lines.append(f"| {t:.2f} | " + " | ".join(cells) + f" | {row['caption/bow']} | {row['bow/contrastive']} |")
    best = {k: max((v for _, v in r["curve"] if v is not None), default=float("nan")) for k, r in runs.items()}
    lines.append("")
    lines.append("best zero-shot accuracy: " + ", ".join(f"{k} {best[k]:.3f}" for k in OBJECTIVES))
    return rows, "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], args: argparse.Namespace, chance: float | None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in runs.values():
        xs = [x for x, v in r["curve"] if v is not None]
        ax.plot(xs, [v for _, v in r["curve"] if v is not None], marker="o", markersize=3, label=r["what"])
    for t in args.thresholds:
        ax.axhline(t, color="grey", linewidth=0.5, linestyle=":")
    if chance is not None:
        ax.axhline(chance, color="black", linewidth=0.8, linestyle="--", label="most frequent class")
    ax.set_xlabel("training images seen (step x batch)")
    ax.set_ylabel("zero-shot accuracy")
    size = parse_scene_spec(args.data)[1]["size"]  # the encoder sees the scenes at their size
    ax.set_title(f"{args.model} at {size} px, {args.data}\n{args.budget} of training per objective, batch "
                 f"{args.batch_size}, seed {args.seed}; zero-shot: the single-item\nvalidation scenes' items, 10 "
                 "classes", fontsize=8)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=90)
    plt.close(fig)


def chance_level(args: argparse.Namespace) -> float | None:
    """The share of the most frequent class among the validation scenes' single items (what a constant answer
    scores)."""
    from vitlab.data.scenes import build_scene_dataset
    from vitlab.zeroshot import item_zero_shot_set

    splits = build_scene_dataset(args.data, data_dir=None, val_fraction=0.1)
    items = item_zero_shot_set(splits, splits.val)
    return None if items is None else torch.bincount(items[1]).max().item() / len(items[1])


@torch.no_grad()
def probe_encoders(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """What the zero-shot read-out may miss: a logistic-regression probe of the item's class from each trained image
    encoder's mean token (its last checkpoint), fitted on the training split's single-item scenes and scored on the
    validation split's (the zero-shot measure's scenes), beside the same encoder untrained."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vitlab import create_model
    from vitlab.checkpoint import from_pretrained
    from vitlab.data import to_model_input
    from vitlab.data.scenes import build_scene_dataset
    from vitlab.models.caption import annotation_grid
    from vitlab.zeroshot import item_zero_shot_set

    splits = build_scene_dataset(args.data, data_dir=None, val_fraction=0.1)
    (fit, y_fit, _, _), (score, y_score, _, _) = (item_zero_shot_set(splits, d) for d in (splits.train, splits.val))
    size = tuple(splits.img_size)
    encoders = {"untrained": create_model(args.model, img_size=size[0], num_classes=0)}
    for k in runs:
        model = from_pretrained(Path(args.out) / k / "checkpoints" / "last")
        encoders[k] = model.image_encoder if hasattr(model, "image_encoder") else model.encoder

    def features(encoder: torch.nn.Module, dataset: Any) -> torch.Tensor:
        rows = []
        for images, _ in dataset.loader(256, shuffle=False):
            x = to_model_input(images, in_chans=3, img_size=size, mean=splits.mean, std=splits.std)
            rows.append(annotation_grid(encoder, encoder.eval().forward_features(x), size)[0].float().mean(1))
        return torch.cat(rows).numpy()

    out = {}
    for k, encoder in encoders.items():
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        probe.fit(features(encoder, fit), y_fit.numpy())
        out[k] = float(probe.score(features(encoder, score), y_score.numpy()))
        print(f"linear probe of the item's class, {k} encoder: {out[k]:.3f} ({len(y_score)} val scenes)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="scenes:fashion-mnist?count=4000&size=64")
    p.add_argument("--model", default="cct_2_3x2_32")
    p.add_argument("--budget", default="6m", help="Training time per objective (vitlab train --budget).")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25, help="Steps between validations (points of the curves).")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--out", default="runs/clip_objectives")
    p.add_argument("--figure", default="docs/figures/clip_objectives.png")
    p.add_argument("--probe", action="store_true", help="Also probe each trained encoder (and an untrained one).")
    p.add_argument("--quick", action="store_true", help="20 s each on 300 scenes: checks the pipeline only.")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.budget, args.eval_every = "scenes:fashion-mnist?count=300&size=64", "20s", 5
        args.out, args.figure = "runs/clip_objectives_quick", "runs/clip_objectives_quick/clip_objectives.png"
    runs = {k: train_objective(k, args) for k in args.objectives}
    chance = chance_level(args)
    result: dict[str, Any] = {"command": "python " + shlex.join(sys.argv), "chance": chance,
                              "args": {k: v for k, v in vars(args).items()}, "runs": runs}  # fmt: skip
    if set(runs) == set(OBJECTIVES):
        result["rows"], text = table(runs, args)
        print(text)
        (Path(args.out) / "clip_objectives.md").write_text(text + "\n")
    if args.probe:
        result["probe"] = probe_encoders(runs, args)
    plot(runs, args, chance)
    write_json(Path(args.out) / "clip_objectives.json", result)
    print(f"chance (most frequent class): {chance:.3f}" if chance is not None and not math.isnan(chance) else "")
    print(f"written: {args.out}/clip_objectives.json, {args.figure}")


if __name__ == "__main__":
    main()
