"""The CPU kernel measurements behind vitlab's speed choices (docs/benchmarks.md, "what limits it").

1. attention: PyTorch's fused SDPA against the same attention composed of two batched matmuls and an fp32 softmax,
   forward + backward, fp32 and bf16 (why low-precision CPU training takes the composed path);
2. GEMM layouts: a bf16 matmul with and without a transposed first operand (the layout of weight gradients);
3. with --profile: the share of a ViT-S/16 bf16 training step spent in matmuls;
4. with --compile: one bf16 training step of the Fashion-MNIST recipe's model, eager against torch.compile.

    python benchmarks/cpu_kernels.py [--profile] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def ms(fn: Callable[[], object], iters: int = 10, rounds: int = 3) -> float:
    fn()
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t) / iters * 1e3)
    return statistics.median(times)


def attention_ms(shape: tuple[int, int, int, int], dtype: torch.dtype) -> tuple[float, float]:
    """(fused, composed) milliseconds for one forward + backward at ``shape`` = (B, heads, N, head dim)."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    scale = shape[-1] ** -0.5

    def fused() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def composed() -> None:
        p = ((q * scale) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32).to(dtype)
        (p @ v).sum().backward()

    return ms(fused), ms(composed)


def attention() -> None:
    print("attention forward + backward, ms per call (B, heads, N, head dim)")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((128, 3, 50, 64), (32, 6, 197, 64)):
            a, b = attention_ms(shape, dtype)
            print(f"  {dtype!s:15s} {shape}: fused {a:7.2f}  composed {b:7.2f}  fused/composed {a / b:4.1f}x")


def gemm() -> None:
    M, K, N = 6304, 384, 1536  # ViT-S/16 at batch 32: tokens x width x MLP width
    flops = 2 * M * K * N
    a, b = torch.randn(M, K).bfloat16(), torch.randn(K, N).bfloat16()
    a_t = torch.randn(K, M).bfloat16().t()  # same shape as `a`, transposed layout
    print(f"bf16 GEMM {M}x{K}x{N}, GFLOP/s")
    print(f"  a @ b      {flops / ms(lambda: a @ b) / 1e6:7.0f}")
    print(f"  a.t() @ b  {flops / ms(lambda: a_t @ b) / 1e6:7.0f}  (the layout of a weight gradient)")


def compiled_step() -> None:
    import vitlab

    model = vitlab.create_model("vit_tiny_patch7_28", depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

        return run

    compiled = torch.compile(model)
    t = time.perf_counter()
    step(compiled)()
    print(f"torch.compile: first step (compiling) {time.perf_counter() - t:.0f} s")
    eager_ms, compiled_ms = ms(step(model), iters=5), ms(step(compiled), iters=5)
    print(
        f"  training step, batch 128: eager {eager_ms:.0f} ms, compiled {compiled_ms:.0f} ms "
        f"({eager_ms / compiled_ms:.2f}x)"
    )


def gemm_share() -> None:
    """Share of one bf16 training step of ViT-S/16 (batch 32) spent in matmuls, from torch.profiler."""
    from torch.profiler import profile

    import vitlab

    model = vitlab.create_model("vit_small_patch16_224")
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    step()
    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"ViT-S/16 bf16 training step (forward + backward, batch 32): {mm / total:.0%} of CPU time in matmuls")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also profile a ViT-S/16 training step")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (about a minute of compiling)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads")
    attention()
    gemm()
    if a.profile:
        gemm_share()
    if a.compile:
        compiled_step()


if __name__ == "__main__":
    main()
