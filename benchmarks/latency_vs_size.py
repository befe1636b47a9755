"""Inference latency and peak memory against image size: global attention (quadratic in the number of pixels)
against windowed, convolutional, axial and local attention (linear or close to it).

For each model and each square image size S (64 to 512 by default), batch 1:

* latency: the median over --repeats of one forward pass under ``inference_mode`` (after --warmup untimed ones);
* peak memory: the most bytes of tensors held at once by torch's CPU allocator during one forward pass, above what
  was held before it (model weights and the input excluded). It is read off the allocation and free events that
  ``torch.profiler`` records with ``profile_memory=True``, in time order; it covers every tensor, intermediate
  activations included, but not memory that oneDNN or the C library allocate on their own. The fused attention
  kernel never stores the N x N map, so with it a ViT's memory grows linearly; ``--explicit-attention`` runs the
  path that stores every map (and that the analysis tools use), where the quadratic term shows.

A model whose variant takes ``img_size`` (ViT, whose learned position embedding fixes the token count; Swin; CvT;
the axial / local-attention ViTs) is built at each size, as a model fine-tuned at that size would be. vitlab's ViT
refuses other sizes unless built with ``dynamic_img_size=True``, which resamples the position embedding in every
forward pass and would add that interpolation to each measurement. The CNNs run at any size as built. Names that
are not registered are skipped with a note (the axial and local-attention models come from another branch), and a
model stops growing once one forward pass takes longer than --max-seconds.

Writes a JSON of every point and a log-log plot of latency against pixels (and of peak memory), with reference
slopes 1 (linear) and 2 (quadratic) drawn through each panel's smallest point.

    python benchmarks/latency_vs_size.py --out docs/figures/latency_vs_size      # .png and .json
    python benchmarks/latency_vs_size.py --explicit-attention --out docs/figures/latency_vs_size_explicit
    python benchmarks/latency_vs_size.py --quick --out /tmp/latency              # 2 small sizes: runs?
    python benchmarks/latency_vs_size.py --models vit_small_patch16_224 axial_vit_tiny_patch2_32 --sizes 32 64 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import vitlab
from vitlab._plot import pyplot
from vitlab.errors import VitlabError
from vitlab.layers.attention import explicit_attention

DEFAULT_MODELS = [
    "vit_small_patch16_224",  # global attention over (S / 16)^2 tokens
    "swin_tiny_patch4_window7_224",  # 7x7 windows
    "cvt_13_224",  # global attention, keys and values at stride 2
    "axial_vit_tiny_patch2_32",  # rows then columns (another branch; skipped where absent)
    "sasa_vit_tiny_patch2_32",  # 7x7 neighbourhoods (another branch; skipped where absent)
]
DEFAULT_SIZES = [64, 96, 128, 192, 256, 320, 384, 448, 512]


def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """The model for ``size`` x ``size`` inputs, and one input image."""
    with torch.device("meta"):
        takes_size = "img_size" in vitlab.create_model(name).init_kwargs
    model = vitlab.create_model(name, img_size=size) if takes_size else vitlab.create_model(name)
    chans = model.default_cfg["input_size"][0]
    return model.eval(), torch.randn(1, chans, size, size)


def latency_s(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of live tensors allocated during one forward pass (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def measure(
    names: list[str], sizes: list[int], repeats: int, warmup: int, max_seconds: float, explicit: bool
) -> list[dict]:
    known = set(vitlab.list_models())
    points = []
    for name in names:
        if name not in known:
            print(f"skipped {name}: not a registered model in this checkout", flush=True)
            continue
        for size in sizes:
            try:
                model, x = build(name, size)
            except VitlabError as e:  # a size the architecture cannot take (e.g. not a patch multiple)
                print(f"{name} at {size}: skipped ({e})", flush=True)
                continue
            with explicit_attention(model) if explicit else nullcontext():
                t = latency_s(model, x, repeats, warmup)
                mem = peak_bytes(model, x)
            points.append({"model": name, "size": size, "pixels": size * size, "latency_s": t, "peak_bytes": mem})
            print(f"{name:32s} {size:4d}px  {t * 1e3:10.1f} ms  {mem / 2**20:9.1f} MiB", flush=True)
            if t > max_seconds:
                print(f"{name}: stops at {size}px ({t:.1f} s per image > --max-seconds {max_seconds})", flush=True)
                break
    return points


def slope(points: list[dict], key: str) -> float:
    """Least-squares slope of log(key) against log(pixels) over the larger half of the sizes (the asymptote)."""
    import numpy as np

    pts = points[len(points) // 2 :] if len(points) >= 4 else points
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p["pixels"] for p in pts]), np.log([p[key] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot(points: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "latency_s", "latency (s, batch 1)"), (axes[1], "peak_bytes", "peak MiB")):
        scale = 1.0 if key == "latency_s" else 2**-20
        lo = None
        for name in dict.fromkeys(p["model"] for p in points):
            pts = [p for p in points if p["model"] == name]
            ax.loglog(
                [p["pixels"] for p in pts],
                [p[key] * scale for p in pts],
                "o-",
                label=f"{name} (slope {slope(pts, key):.2f})",
            )
            first = (pts[0]["pixels"], pts[0][key] * scale)
            lo = first if lo is None or first[1] < lo[1] else lo
        if lo is not None:  # reference slopes through the lowest first point
            px = sorted({p["pixels"] for p in points})
            for k, style in ((1, ":"), (2, "--")):
                ax.loglog(px, [lo[1] * (q / lo[0]) ** k for q in px], "k" + style, lw=1, label=f"slope {k}")
        ax.set_xlabel("pixels (S x S)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES)
    p.add_argument("--repeats", type=int, default=7, help="timed forward passes per point (the median is kept)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop a model's sizes after a slower pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--explicit-attention",
        action="store_true",
        help="the explicit attention path, which stores every attention map (the fused CPU kernel does not)",
    )
    p.add_argument("--quick", action="store_true", help="sizes 64 and 96, 1 repeat, 1 warm-up pass")
    p.add_argument("--out", default="latency_vs_size", help="writes OUT.json and OUT.png")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.repeats, a.warmup = [64, 96], 1, 1
    torch.set_num_threads(a.threads)
    machine = f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}"
    print(machine)
    points = measure(a.models, a.sizes, a.repeats, a.warmup, a.max_seconds, a.explicit_attention)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    slopes = {
        m: {k: slope([q for q in points if q["model"] == m], k) for k in ("latency_s", "peak_bytes")}
        for m in dict.fromkeys(q["model"] for q in points)
    }
    print("\nslope of log latency / log pixels over the larger sizes (1: linear, 2: quadratic)")
    for m, s in slopes.items():
        print(f"  {m:32s} latency {s['latency_s']:5.2f}  peak memory {s['peak_bytes']:5.2f}")
    meta = {
        "machine": machine,
        "repeats": a.repeats,
        "batch": 1,
        "attention": "explicit" if a.explicit_attention else "fused where the model allows",
        "memory": "peak bytes of live torch tensors during one forward, above those held before it",
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "slopes": slopes, "points": points}, indent=2))
    path = "explicit attention" if a.explicit_attention else "fused attention"
    plot(points, out.with_suffix(".png"), f"inference, batch 1, {path} ({machine})")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
