"""Throughput of vitlab's ViT against HF transformers' ViT with the same configuration, measured in one run.

For each model, precision and mode (training: forward + cross-entropy + backward + AdamW step; inference: forward
under inference_mode), the two implementations alternate in rounds so that both see the same machine state; the
median images/s over rounds is reported with the ratio vitlab / HF.

    python benchmarks/throughput.py                       # the default set, 2 threads
    python benchmarks/throughput.py --models vit_tiny_patch4_28 --precisions bf16 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import vitlab

DEFAULT = [("vit_tiny_patch4_28", 128), ("vit_small_patch16_224", 32)]


def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    """HF ViTForImageClassification with the same architecture (and sdpa attention, HF's fastest on CPU)."""
    from transformers import ViTConfig, ViTForImageClassification

    a = model.init_kwargs
    cfg = ViTConfig(
        hidden_size=a["embed_dim"],
        num_hidden_layers=a["depth"],
        num_attention_heads=a["num_heads"],
        intermediate_size=int(a["embed_dim"] * a.get("mlp_ratio", 4.0)),
        image_size=a["img_size"],
        patch_size=a["patch_size"],
        num_channels=a["in_chans"],
        num_labels=a["num_classes"],
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return ViTForImageClassification(cfg)


def make_step(model, x, y, mode: str, precision: str) -> Callable[[], None]:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    is_hf = not hasattr(model, "forward_features")
    forward = (lambda: model(pixel_values=x).logits) if is_hf else (lambda: model(x))
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), amp:
                forward()

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with amp:
            loss = F.cross_entropy(forward(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def rate(step: Callable[[], None], batch: int, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t)


def bench(name: str, batch: int, precision: str, mode: str, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    ours = vitlab.create_model(name)
    theirs = hf_twin(ours)
    x = torch.randn(batch, *ours.default_cfg["input_size"])
    y = torch.randint(0, ours.num_classes, (batch,))
    steps = {"vitlab": make_step(ours, x, y, mode, precision), "hf": make_step(theirs, x, y, mode, precision)}
    for s in steps.values():  # warm-up: allocator, oneDNN kernel selection
        rate(s, batch, 2)
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            rates[k].append(rate(s, batch, iters))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "model": name,
        "batch": batch,
        "precision": precision,
        "mode": mode,
        "vitlab_img_s": med["vitlab"],
        "hf_img_s": med["hf"],
        "ratio": med["vitlab"] / med["hf"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m, _ in DEFAULT])
    p.add_argument("--batch", type=int, nargs="*", help="batch per model (default: 128 for 28x28, 32 for 224)")
    p.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="*", default=["train", "infer"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    batches = a.batch or [dict(DEFAULT).get(m, 32) for m in a.models]
    print(f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':24s} {'batch':>5s} {'prec':>5s} {'mode':>6s} {'vitlab img/s':>13s} {'HF img/s':>9s} {'ratio':>6s}")
    results = []
    for name, batch in zip(a.models, batches):
        for precision in a.precisions:
            for mode in a.modes:
                r = bench(name, batch, precision, mode, a.rounds, a.iters)
                results.append(r)
                print(
                    f"{name:24s} {batch:5d} {precision:>5s} {mode:>6s} {r['vitlab_img_s']:13.1f} "
                    f"{r['hf_img_s']:9.1f} {r['ratio']:5.2f}x",
                    flush=True,
                )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
