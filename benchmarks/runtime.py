"""Inference runtimes on the CPU: eager PyTorch fp32, eager PyTorch bf16 (autocast) and onnxruntime (fp32, the
graph `vitlab export` writes), for a small (28 x 28) and a 224 x 224 model, in one run.

Two numbers per model and runtime: latency at batch 1 (median milliseconds per call) and throughput at batch 64
(median images/s over rounds). The runtimes alternate within each round so that they see the same machine state.
Weights are random (timing does not depend on them); each ONNX file passes `export_onnx`'s parity check first.

    python benchmarks/runtime.py                          # the default set, 2 threads
    python benchmarks/runtime.py --quick                  # a 1-minute smoke run: shallow models, few iterations
    python benchmarks/runtime.py --models vit_base_patch16_224 --threads 8 --json runtime.json

bf16 is only fast on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX); on an AVX2-only CPU autocast emulates it
and is many times slower than fp32. The run prints the CPU flags it saw.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import vitlab
from vitlab.export import OnnxClassifier, export_onnx

DEFAULT_MODELS = ["vit_tiny_patch4_28", "vit_small_patch16_224"]
RUNTIMES = ["eager fp32", "eager bf16", "onnxruntime"]


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def runners(model: torch.nn.Module, onnx: OnnxClassifier) -> dict[str, Callable[[torch.Tensor], object]]:
    def eager(x):
        with torch.inference_mode():
            return model(x)

    def eager_bf16(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return {"eager fp32": eager, "eager bf16": eager_bf16, "onnxruntime": onnx.logits}


def time_calls(fn: Callable, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, median of ``calls`` timed calls."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    overrides = {"depth": args.depth} if args.depth else {}
    model = vitlab.create_model(name, **overrides).eval()
    shape = tuple(model.default_cfg["input_size"])
    path = export_onnx(model, workdir / f"{name}.onnx")["path"]
    onnx = OnnxClassifier(path, threads=args.threads)
    run = runners(model, onnx)
    x1, xb = torch.randn(1, *shape), torch.randn(args.batch, *shape)
    for fn in run.values():  # warm up: allocator, oneDNN primitives, onnxruntime's arenas
        fn(x1)
        fn(xb)
    latency = {k: [] for k in run}
    throughput = {k: [] for k in run}
    for _ in range(args.rounds):
        for k, fn in run.items():
            latency[k].append(time_calls(fn, x1, args.calls) * 1000)
            throughput[k].append(args.batch / time_calls(fn, xb, args.batch_calls))
    return {
        k: {"latency_ms": statistics.median(latency[k]), "images_per_s": statistics.median(throughput[k])} for k in run
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered names")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="timed batch-1 calls per round")
    p.add_argument("--batch-calls", type=int, default=3, help="timed batch calls per round")
    p.add_argument("--depth", type=int, help="override the models' depth (smoke runs)")
    p.add_argument("--quick", action="store_true", help="shallow models (depth 1), batch 8, 2 rounds: a smoke run")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.depth, args.batch, args.rounds, args.calls, args.batch_calls = args.depth or 1, 8, 2, 5, 2
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = bench_model(name, args, Path(tmp))
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "batch": args.batch,
        "depth_override": args.depth,
    }
    print(
        f"threads {args.threads}, CPU flags: {env['cpu_flags']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}"
    )
    if args.depth:
        print(f"(models cut to depth {args.depth}: a smoke run, not a measurement)")
    b = args.batch
    print(f"| model | runtime | latency, batch 1 (ms) | images/s, batch {b} | vs eager fp32 (batch 1 / {b}) |")
    print("|---|---|---:|---:|---:|")
    for name, rows in results.items():
        base = rows["eager fp32"]
        for k in RUNTIMES:
            r = rows[k]
            speed = f"{base['latency_ms'] / r['latency_ms']:.2f}x / {r['images_per_s'] / base['images_per_s']:.2f}x"
            print(f"| {name} | {k} | {r['latency_ms']:.2f} | {r['images_per_s']:,.0f} | {speed} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
