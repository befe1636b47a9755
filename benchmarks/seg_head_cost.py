"""Where a segmentation training step goes: LSeg's language head against the classifier head on one encoder/decoder.

The model is `vitlab seg train`'s default (vit_tiny_patch16_224 with 8-pixel patches at 64 px, a DPT decoder of 64
features, batch 32); each step is a forward and backward of the per-pixel cross-entropy under bf16 autocast (fp32
with --precision fp32), timed as the median of --steps after one warm-up step:

* classifier: `DPTSegmenter`, a 1x1 conv from the 64 features to the 13 classes;
* language: `LSeg.forward`, the cosine of LSeg's 512-wide pixel embeddings with the 13 label embeddings, computed
  from the 64-wide decoder map (`LSeg.cosine`);
* language, 512-wide map: the same logits the way LSeg's code (and vitlab before 2026-12-01) computes them, the
  1x1 conv to 512 channels at every pixel, normalised, then the dot with the labels (`LSeg.pixel_embeddings`);
* encoder + decoder: `forward_features` alone (backward of its sum), the part both heads share.

The label embeddings are random [13, 384] features (MiniLM's width): the frozen text encoder is not part of a step
(a run embeds its label names once). With --profile, torch.profiler's top operators of each language variant.

    python benchmarks/seg_head_cost.py                 # 2 threads, bf16, 4 timed steps each
    python benchmarks/seg_head_cost.py --profile --json cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from vitlab.models.lseg import create_lseg, segmentation_loss, upsample

ENCODER = {"patch_size": 8, "img_size": [64, 64]}


def wide_map_logits(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """LSeg's logits through the 512-wide normalised pixel map [B, 512, h, w] (the reference computation)."""
    pixels = model.pixel_embeddings(x)  # (B, E, h, w)
    labels = model.label_embeddings(text).to(pixels.dtype)  # (K, E)
    return upsample(model.logit_scale * torch.einsum("behw,ke->bkhw", pixels, labels), x.shape[-2:])


def time_steps(step: Callable[[], None], steps: int) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top operators per language variant")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lang = create_lseg("vit_tiny_patch16_224", encoder_args=ENCODER, features=64, text_dim=384).train()
    cls = create_lseg("vit_tiny_patch16_224", encoder_args=ENCODER, features=64, classifier_classes=13).train()
    x, y = torch.randn(args.batch_size, 3, 64, 64), torch.randint(0, 13, (args.batch_size, 64, 64))
    text = torch.randn(13, 384)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def step(model: torch.nn.Module, logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                out = logits()
            segmentation_loss(out, y).backward()

        return run

    def trunk() -> None:
        lang.zero_grad(set_to_none=True)
        with autocast():
            features = lang.forward_features(x)  # (B, 64, 64, 64)
        features.float().sum().backward()

    variants = {
        "classifier head": step(cls, lambda: cls(x)),
        "language head": step(lang, lambda: lang(x, text)),
        "language head, 512-wide map": step(lang, lambda: wide_map_logits(lang, x, text)),
        "encoder + decoder only": trunk,
    }
    timings = {}
    for name, run in variants.items():
        timings[name] = time_steps(run, args.steps)
        print(f"{name:<30} {timings[name]:.3f} s a step  ({args.batch_size / timings[name]:.0f} img/s)", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("language head, 512-wide map", "language head"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    variants[name]()
            print(f"\n{name}: 2 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=36))
    if args.json:
        meta = {"threads": args.threads, "batch_size": args.batch_size, "precision": args.precision}
        with open(args.json, "w") as f:
            json.dump({**meta, "seconds_per_step": timings}, f, indent=2)


if __name__ == "__main__":
    main()
