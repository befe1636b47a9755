"""Time to accuracy: train a recipe under a wall-clock budget and record test accuracy against training time.

The schedule is sized to the budget (`vitlab train --budget`: throughput measured over the first steps, warmup
and cosine ending at the budget), so the recipe's ``epochs`` is replaced by what fits; every ``--eval-every``
epochs the trainer evaluates on the validation split and this script also scores the test split, so the curve
shows what a run stopped at that time would be worth. Evaluation time is not training time.
Model selection uses validation only.

    python benchmarks/time_to_accuracy.py --config configs/fashion_mnist_vit.yaml --budget 600
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from vitlab.train import TrainConfig, evaluate, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion_mnist_vit.yaml")
    p.add_argument("--budget", type=float, default=600.0, help="seconds of training")
    p.add_argument("--eval-every", type=float, default=0.5, help="epochs between evaluations")
    p.add_argument("--out", default="runs/time-to-accuracy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (YAML values)")
    a = p.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = TrainConfig.from_sources(a.config, out=a.out, budget_s=a.budget, threads=a.threads, **overrides)
    probe = TrainConfig.from_sources(a.config)  # steps per epoch: the training split size over the global batch
    from vitlab.data import build_dataset

    n_train = len(build_dataset(probe.data, data_dir=probe.data_dir, seed=probe.seed).train)
    cfg.eval_every = max(1, int(a.eval_every * (n_train // (cfg.batch_size * cfg.accum_steps))))

    def score_test(model, splits, record):
        r = evaluate(
            model,
            splits.test,
            num_classes=splits.num_classes,
            mean=splits.mean,
            std=splits.std,
            batch_size=512,
            precision=cfg.precision,
        )
        print(
            f"  t={record['time_s']:7.1f}s epoch {record['epoch']:.2f}: val {record['val_acc']:.4f} "
            f"test {r['accuracy']:.4f}",
            flush=True,
        )
        return {"test_acc": r["accuracy"]}

    t0 = time.time()
    summary = train(cfg, on_eval=score_test)
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    print(
        f"\n{cfg.model} {cfg.model_args} on {cfg.data}, {cfg.precision}, {a.threads} threads, "
        f"torch {torch.__version__}, {platform.machine()}, {date.today()}"
    )
    print(f"{'train time (s)':>14s} {'epoch':>6s} {'val acc':>8s} {'test acc':>9s}")
    for m in lines:
        print(f"{m['time_s']:14.1f} {m['epoch']:6.2f} {m['val_acc']:8.4f} {m['test_acc']:9.4f}")
    print(
        f"final (best-val checkpoint): test accuracy {summary['test_accuracy']:.4f} after "
        f"{summary['train_time_s']:.0f}s of training ({time.time() - t0:.0f}s wall clock with evaluation)"
    )
    (Path(cfg.out) / "time_to_accuracy.json").write_text(json.dumps({"summary": summary, "curve": lines}, indent=2))


if __name__ == "__main__":
    main()
