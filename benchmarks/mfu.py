"""Model FLOPs utilisation (MFU) per family: useful model work per second against the machine's matmul peak.

For each model, precision and mode (training: forward + cross-entropy + backward + AdamW step; inference: forward
under ``inference_mode``; the steps of benchmarks/throughput.py):

* images/s: the median over --rounds of --iters steps, after --warmup untimed steps;
* model FLOPs per image: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass
  (`vitlab.stats.count_flops`; a multiply-add is 2 FLOPs), times 3 for a training step (the backward pass costs
  two forwards: gradients of the activations and of the weights). The count runs on the meta device, where
  scaled-dot-product attention decomposes into two counted matmuls; on CPU tensors the counter does not know the
  fused CPU attention kernel and would leave attention out. Only matmuls and convolutions count: norms,
  activations, softmax and the optimizer are overhead by this definition;
* peak: the best GFLOP/s of a square matmul (--peak-n, 2048 by default) in the same dtype (fp32, or bf16 for
  bf16 autocast), best over three operand layouts (see `matmul_peak`), measured in the same run;
* MFU = images/s x FLOPs per image / peak.

Then one training step of each --profile model is profiled (torch.profiler), and the top ops by self CPU time are
printed with their share of the step, plus the share of all matmul and convolution kernels together.

This CPU may have no native bf16 (AVX2 only: bf16 matmuls are emulated, and 10-15x slower than fp32); bf16 is
measured all the same, against its own (low) peak.

    python benchmarks/mfu.py --json mfu.json                         # all models, fp32, 2 threads
    python benchmarks/mfu.py --precisions bf16 --rounds 2 --iters 1  # bf16 (slow without native bf16)
    python benchmarks/mfu.py --quick --precisions fp32 bf16          # batch 2, 1 step, a 512^3 peak: runs?
    python benchmarks/mfu.py --models vit_tiny_patch4_28 --precisions fp32 --modes train
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

import vitlab
from throughput import img_s as fmt_img_s
from throughput import make_step, rate  # the same training and inference steps as the HF comparison
from vitlab.stats import count_flops

# (model, batch): batches sized for a 2-core CPU
DEFAULT = [
    ("vit_tiny_patch4_28", 64),
    ("vit_small_patch16_224", 16),
    ("swin_tiny_patch4_window7_224", 16),
    ("cvt_13_224", 16),
    ("convnext_tiny", 16),
    ("resnet50", 16),
    ("cct_7_3x1_32", 64),
]
PROFILED = ["vit_tiny_patch4_28", "vit_small_patch16_224"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the kernels that do the counted FLOPs (self time: their callers, e.g. aten::linear, only dispatch)
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_convolution",
    "aten::thnn_conv2d",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
)


def matmul_peak(precision: str, n: int, repeats: int) -> dict[str, float]:
    """Best FLOP/s of an n x n x n matmul in the precision's dtype, for each operand layout: ``a @ b``, ``a @ b.t()``
    (a linear layer's forward) and ``a.t() @ b`` (its weight gradient). Without native bf16 the emulated kernels
    differ by 10x between layouts, so the peak is the best of the three."""
    a = torch.randn(n, n, dtype=DTYPES[precision])
    b = torch.randn(n, n, dtype=DTYPES[precision])
    layouts = {"a @ b": lambda: a @ b, "a @ b.t()": lambda: a @ b.t(), "a.t() @ b": lambda: a.t() @ b}
    out = {}
    for layout, fn in layouts.items():
        fn()  # warm-up: oneDNN kernel selection
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[layout] = 2 * n**3 / best
    return out


def flops_per_image(name: str) -> int:
    with torch.device("meta"):
        model = vitlab.create_model(name)
    return count_flops(model.eval(), tuple(model.default_cfg["input_size"]))


def images_per_s(name: str, batch: int, precision: str, mode: str, rounds: int, iters: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = vitlab.create_model(name)
    x = torch.randn(batch, *model.default_cfg["input_size"])
    y = torch.randint(0, model.num_classes, (batch,))
    step = make_step(model, x, y, mode, precision)
    rate(step, batch, warmup)
    return statistics.median(rate(step, batch, iters) for _ in range(rounds))


def profile_step(name: str, batch: int, precision: str, top: int) -> dict[str, Any]:
    """Self CPU time per op over one training step, after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = vitlab.create_model(name)
    x = torch.randn(batch, *model.default_cfg["input_size"])
    y = torch.randint(0, model.num_classes, (batch,))
    step = make_step(model, x, y, "train", precision)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)  # microseconds, every op once (self times do not overlap)
    rows = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in ops[:top]
    ]
    matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / total
    return {
        "model": name,
        "batch": batch,
        "precision": precision,
        "step_ms": total / 1e3,
        "matmul_share": matmul,
        "top": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m, _ in DEFAULT])
    p.add_argument("--batch", type=int, nargs="*", help="one per model, or one for all (default: 64 small, 16 at 224)")
    p.add_argument(
        "--precisions",
        nargs="*",
        default=["fp32"],
        choices=list(DTYPES),
        help="fp32 by default: without native bf16 (AVX2 CPUs) a bf16 run at full settings takes about an hour",
    )
    p.add_argument("--modes", nargs="*", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--profile", nargs="*", default=PROFILED, help="models whose training step is profiled")
    p.add_argument("--top", type=int, default=15, help="ops listed per profile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-n", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument("--quick", action="store_true", help="batch 2, 1 round of 1 step, a 512^3 peak")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.iters, a.warmup, a.batch, a.peak_n = 1, 1, 1, [2], 512
    torch.set_num_threads(a.threads)
    defaults = dict(DEFAULT)
    if a.batch and len(a.batch) not in (1, len(a.models)):
        p.error("--batch takes one value, or one per model")
    batches = (a.batch * len(a.models) if len(a.batch) == 1 else a.batch) if a.batch else None
    batches = dict(zip(a.models, batches or [defaults.get(m, 16) for m in a.models]))

    machine = f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}"
    print(machine)
    layouts = {pr: matmul_peak(pr, a.peak_n, repeats=3) for pr in a.precisions}
    peaks = {pr: max(by_layout.values()) for pr, by_layout in layouts.items()}
    for pr, by_layout in layouts.items():
        each = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in by_layout.items())
        print(f"matmul peak {pr}: {peaks[pr] / 1e9:.1f} GFLOP/s ({a.peak_n}^3, best of 3 per layout: {each})")
    print(f"\n{a.rounds} rounds of {a.iters} steps after {a.warmup} warm-up; FLOPs per image x3 for training\n")
    print("| model | input | batch | precision | mode | img/s | GFLOP / img | GFLOP/s | peak GFLOP/s | MFU |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for name in a.models:
        flops = flops_per_image(name)
        with torch.device("meta"):
            size = "x".join(map(str, vitlab.create_model(name).default_cfg["input_size"]))
        for precision in a.precisions:
            for mode in a.modes:
                img_s = images_per_s(name, batches[name], precision, mode, a.rounds, a.iters, a.warmup)
                work = flops * (3 if mode == "train" else 1)
                r = {
                    "model": name,
                    "input": size,
                    "batch": batches[name],
                    "precision": precision,
                    "mode": mode,
                    "img_s": img_s,
                    "gflop_per_img": work / 1e9,
                    "gflop_s": img_s * work / 1e9,
                    "peak_gflop_s": peaks[precision] / 1e9,
                    "mfu": img_s * work / peaks[precision],
                }
                results.append(r)
                print(
                    f"| {name} | {size} | {r['batch']} | {precision} | {mode} | {fmt_img_s(img_s)} | "
                    f"{r['gflop_per_img']:.2f} | {r['gflop_s']:.1f} | {r['peak_gflop_s']:.1f} | "
                    f"**{r['mfu']:.0%}** |",
                    flush=True,
                )
    profiles = []
    for name in a.profile:
        for precision in a.precisions:
            prof = profile_step(name, batches.get(name, defaults.get(name, 16)), precision, a.top)
            profiles.append(prof)
            print(
                f"\none training step of {name}, batch {prof['batch']}, {precision}: {prof['step_ms']:.0f} ms of "
                f"op self time, {prof['matmul_share']:.0%} in matmul / convolution kernels\n"
            )
            print("| op | self ms | share | calls |\n| --- | ---: | ---: | ---: |")
            for row in prof["top"]:
                print(f"| {row['op']} | {row['self_ms']:.1f} | {row['share']:.1%} | {row['calls']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "peaks": layouts, "results": results, "profiles": profiles}, f, indent=2)


if __name__ == "__main__":
    main()
