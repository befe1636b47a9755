"""Latency and peak memory of one attention layer against image size: full attention against the cheaper ones.

Each layer runs on the [B, H, W, D] token grid of an S x S image cut into P x P patches (H = W = S / P; --patch 1
attends over pixels), at ViT-Ti width (D = 192, 3 heads) unless told otherwise:

* full:  vitlab's `Attention` over all N = HW tokens, N^2 pairs (fused SDPA kernel: the N x N map is never stored);
* axial: `AxialAttention2d`, height then width with relative position logits, N (H + W) pairs;
* local: `LocalSelfAttention`, each token's k x k neighbourhood with relative embeddings, N k^2 pairs (computed in
  8 x 8 query blocks that share a (8 + k - 1)^2 halo of keys);
* window: Swin's `WindowAttention` inside non-overlapping M x M windows (not shifted; the grid zero-padded to whole
  windows) with its relative position bias, N M^2 pairs.

Every point runs in a fresh process, so that one measurement's allocations do not hide the next one's peak: on
CUDA the peak is `torch.cuda.max_memory_allocated` above what the module and input hold; on CPU it is the growth
of the process's peak resident set (ru_maxrss) during the first step. Latency is the median over rounds of the
mean step time (forward + backward of the sum in ``train`` mode, forward under inference_mode in ``infer``).
A point that runs past --timeout seconds or out of memory is reported as such and the sizes go on.

    python benchmarks/attention_cost.py                          # sizes 32 .. 512, patch 4, training step
    python benchmarks/attention_cost.py --quick                  # two small sizes: checks that it runs
    python benchmarks/attention_cost.py --mode infer --precision bf16 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import (
    Attention,
    AxialAttention2d,
    LocalSelfAttention,
    WindowAttention,
    window_partition,
    window_reverse,
)

KINDS = ("full", "axial", "local", "window")


class FullGridAttention(nn.Module):
    """Full self-attention over the H*W tokens of a [B, H, W, D] grid."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        return self.attn(x.reshape(B, H * W, D)).view(B, H, W, D)


class WindowGridAttention(nn.Module):
    """Swin's W-MSA over the M x M windows of a [B, H, W, D] grid, zero-padded to whole windows as Swin does."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.window = (window, window)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        x = F.pad(x, (0, 0, 0, -W % self.window[1], 0, -H % self.window[0]))  # (B, Hp, Wp, D)
        Hp, Wp = x.shape[1], x.shape[2]
        windows = self.attn(window_partition(x, self.window), window=self.window)  # (B * nW, M * M, D)
        return window_reverse(windows, self.window, Hp, Wp)[:, :H, :W]


def build(kind: str, dim: int, heads: int, grid: tuple[int, int], kernel: int) -> nn.Module:
    if kind == "full":
        return FullGridAttention(dim, heads)
    if kind == "axial":
        return AxialAttention2d(dim, num_heads=heads, grid_size=grid)
    if kind == "local":
        return LocalSelfAttention(dim, num_heads=heads, kernel_size=kernel)
    if kind == "window":
        return WindowGridAttention(dim, heads, kernel)
    raise SystemExit(f"unknown attention {kind!r}; choose from {', '.join(KINDS)}")


def pairs(kind: str, h: int, w: int, kernel: int) -> int:
    """Query-key pairs of the attention's function (local: counting the masked ones past the border; its blocked
    implementation also scores the rest of each block's halo, (8 + k - 1)^2 keys per query; window: of the grid
    padded to whole windows)."""
    n = h * w
    padded = -(-h // kernel) * kernel * -(-w // kernel) * kernel
    return {"full": n * n, "axial": n * (h + w), "local": n * kernel**2, "window": padded * kernel**2}[kind]


def measure(kind: str, size: int, a: dict[str, Any]) -> dict[str, Any]:
    """One (attention, image size) point; runs in its own process."""
    device = torch.device(a["device"])
    if device.type == "cpu":
        torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    h = w = size // a["patch"]
    module = build(kind, a["dim"], a["heads"], (h, w), a["kernel"]).to(device)
    train = a["mode"] == "train"
    module.train(train)
    x = torch.randn(a["batch"], h, w, a["dim"], device=device, requires_grad=train)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a["precision"] == "bf16" else nullcontext()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:
        if train:
            with amp:
                out = module(x)
            out.float().sum().backward()
        else:
            with torch.inference_mode(), amp:
                module(x)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step()  # the first step reaches the peak (gradients allocated) and warms kernels up
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    step()
    sync()
    times = []
    for _ in range(a["rounds"]):
        t = time.perf_counter()
        for _ in range(a["iters"]):
            step()
        sync()
        times.append((time.perf_counter() - t) / a["iters"] * 1e3)
    return {"ms": statistics.median(times), "peak_mib": peak / 2**20}


def run_point(ctx, kind: str, size: int, a: dict[str, Any]) -> dict[str, Any]:
    h = w = size // a["patch"]
    row = {"attention": kind, "image": size, "grid": f"{h}x{w}", "tokens": h * w}
    row["pairs"] = pairs(kind, h, w, a["kernel"])
    with ctx.Pool(1) as pool:
        job = pool.apply_async(measure, (kind, size, a))
        try:
            row.update(job.get(timeout=a["timeout"]))
        except mp.TimeoutError:
            row["note"] = f"over {a['timeout']} s"
        except RuntimeError as e:  # CUDA out of memory comes back from the worker as a RuntimeError
            if "out of memory" not in str(e):
                raise
            row["note"] = "out of memory"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128, 256, 512], help="image sides in pixels")
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    p.add_argument("--patch", type=int, default=4, help="patch side: the grid is (size / patch)^2 tokens")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--kernel", type=int, default=7, help="local neighbourhood and window side (SASA and Swin: 7)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per point before it is abandoned")
    p.add_argument("--quick", action="store_true", help="sizes 32 and 64, one round of two steps")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.rounds, a.iters = [32, 64], 1, 2
    for s in a.sizes:
        if s % a.patch:
            raise SystemExit(f"image size {s} is not divisible by patch {a.patch}")
    args = vars(a)
    cpu = f"{platform.processor() or platform.machine()}, {a.threads} threads"
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu
    print(f"torch {torch.__version__}, {where}; D={a.dim}, {a.heads} heads, batch {a.batch}, {a.mode}, {a.precision}")
    print(f"{'attention':>9s} {'image':>5s} {'grid':>7s} {'tokens':>7s} {'pairs':>13s} {'ms':>9s} {'peak MiB':>9s}")
    ctx = mp.get_context("spawn")  # a fresh process per point (and CUDA cannot fork)
    rows = []
    for size in a.sizes:
        for kind in a.kinds:
            r = run_point(ctx, kind, size, args)
            rows.append(r)
            tail = f"{r['ms']:9.2f} {r['peak_mib']:9.1f}" if "ms" in r else f"{r['note']:>19s}"
            print(f"{kind:>9s} {size:5d} {r['grid']:>7s} {r['tokens']:7d} {r['pairs']:13,d} {tail}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
