"""Training-speed levers (issue 13), each against the plain training step in one run: which ones pay on this machine.

One training step is forward + cross-entropy + backward + AdamW step, as in benchmarks/throughput.py. Variants:

* ``base``: ``torch.optim.AdamW`` with its default multi-tensor (foreach) implementation, what the trainer uses;
* ``fused``: ``AdamW(fused=True)``, the single fused kernel (on CPU since torch 2.4); not bit-identical to foreach
  (a different order of floating-point operations), so it is a lever only if it pays;
* ``channels_last``: weights and inputs in channels-last layout (CNNs only);
* ``compile``: ``torch.compile(model)`` (inductor: fused LayerNorm / GELU / residual kernels); the first call's
  compile time is printed apart from the timed steps.

Variants alternate in rounds and the table gives each one's median images/s and its ratio to ``base``. Also the
AdamW step alone (foreach against fused) on the parameters of each model, since the step's share of a training
step is largest where the model is small and the batch short.

    python benchmarks/levers.py                                     # ViT-Ti@28, ViT-S/16, ResNet-50, ConvNeXt-T
    python benchmarks/levers.py --models vit_tiny_patch4_28 --variants base fused compile
    python benchmarks/levers.py --quick                             # batch 2, one round: does it run?
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F

import vitlab

DEFAULT = [("vit_tiny_patch4_28", 64), ("vit_small_patch16_224", 16), ("resnet50", 16), ("convnext_tiny", 16)]
CNNS = ("resnet", "convnext")


def training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build(name: str, batch: int, variant: str) -> tuple[Callable[[], None], float]:
    """The step of one variant, after one untimed call (whose seconds are returned: compile time for compile)."""
    torch.manual_seed(0)
    model = vitlab.create_model(name).train()
    x = torch.randn(batch, *model.default_cfg["input_size"])
    y = torch.randint(0, model.num_classes, (batch,))
    if variant == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)
    step = training_step(model, x, y, fused=variant == "fused")
    t = time.perf_counter()
    step()
    return step, time.perf_counter() - t


def optimizer_step_ms(name: str, fused: bool, repeats: int) -> float:
    torch.manual_seed(0)
    params = [p for p in vitlab.create_model(name).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    opt.step()  # creates the state
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m, _ in DEFAULT])
    p.add_argument("--batch", type=int, nargs="*", help="one per model, or one for all (default: 64 small, 16 at 224)")
    p.add_argument("--variants", nargs="*", default=["base", "fused", "channels_last", "compile"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 2, 1 round of 1 step")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    defaults = dict(DEFAULT)
    batches = a.batch or [defaults.get(m, 16) for m in a.models]
    if len(batches) == 1:
        batches = batches * len(a.models)
    if a.quick:
        batches, a.rounds, a.iters = [2] * len(a.models), 1, 1
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {cpu}, {a.threads} threads, {date.today()}")
    rows: list[dict[str, Any]] = []
    for name, batch in zip(a.models, batches):
        variants = [v for v in a.variants if v != "channels_last" or name.startswith(CNNS)]
        steps = {}
        for v in variants:
            steps[v], first = build(name, batch, v)
            if v == "compile":
                print(f"{name}: compile + first step {first:.1f} s (not timed below)")
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(a.rounds):
            for v in variants:
                t = time.perf_counter()
                for _ in range(a.iters):
                    steps[v]()
                rates[v].append(batch * a.iters / (time.perf_counter() - t))
        base = statistics.median(rates["base"]) if "base" in rates else None
        opt_ms = {f: optimizer_step_ms(name, f, 3 if a.quick else 10) for f in (False, True)}
        for v in variants:
            r = statistics.median(rates[v])
            ratio = r / base if base else None
            rows.append({"model": name, "batch": batch, "variant": v, "img_s": r, "vs_base": ratio})
        rows.append({"model": name, "adamw_ms_foreach": opt_ms[False], "adamw_ms_fused": opt_ms[True]})
    print("\n| model | batch | variant | train img/s | vs base |\n| --- | ---: | --- | ---: | ---: |")
    for r in rows:
        if "variant" in r:
            ratio = f"{r['vs_base']:.2f}x" if r["vs_base"] else ""
            print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['img_s']:.1f} | {ratio} |")
    print("\n| model | AdamW step, foreach (ms) | fused (ms) | fused / foreach time |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        if "adamw_ms_fused" in r:
            f, u = r["adamw_ms_foreach"], r["adamw_ms_fused"]
            print(f"| {r['model']} | {f:.1f} | {u:.1f} | {u / f:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
