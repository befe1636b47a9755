"""Throughput of vitlab against HF transformers for every family both implement, the two measured in one run.

Families: ViT, DeiT (distilled: HF's ``DeiTForImageClassificationWithTeacher``), Swin, CvT, ResNet, ConvNeXt, each at
a small input size and at 224. Training is forward + cross-entropy + backward + AdamW step (a distilled DeiT
averages the cross-entropy of its two heads, on both sides); inference is a forward under ``inference_mode``.

The same function on both sides. For each named vitlab variant, the HF twin is built from the variant's
constructor arguments by one small function per family (``HF_TWINS``: the reverse of the family's HF converter),
with random weights moved off their initialisation; it is written with ``save_pretrained`` and read back with
``vitlab.from_pretrained``, and that model is the vitlab side. Before any timing the script checks that the
converted model's constructor arguments are the named variant's (so the twin is that architecture, not a look-alike)
and that the two give the same logits to 1e-4 in fp32.

For each model, precision, mode and memory layout the two implementations alternate in rounds, so that both see the
same machine state; the median images/s over rounds is reported with the ratio vitlab / HF. ``--channels-last``
also measures the CNNs (ResNet, ConvNeXt) with weights and input in channels-last layout, on both sides.

    python benchmarks/throughput.py --channels-last --json throughput.json   # the default set, fp32, 2 threads
    python benchmarks/throughput.py --precisions bf16 --rounds 3 --iters 1   # bf16 (slow without native bf16)
    python benchmarks/throughput.py --quick --precisions fp32 bf16           # 1 round, 1 step, batch 2: runs?
    python benchmarks/throughput.py --models convnext_tiny resnet18@32 --precisions fp32 --rounds 5

A model is a registered name, optionally ``@SIZE`` for another square input size (HF's ResNet has no small-image
stem, so the small ResNet is ``resnet18`` on 32x32 inputs).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

import vitlab
from vitlab.errors import VitlabError
from vitlab.models.vit import HF_ACT as HF_TO_OURS_ACT

# (model[@size], batch): a small and a 224 size per family, batches sized for a 2-core CPU
DEFAULT = [
    ("vit_tiny_patch4_28", 64),
    ("vit_small_patch16_224", 16),
    ("deit_tiny_distilled_patch4_28", 64),
    ("deit_small_distilled_patch16_224", 16),
    ("swin_nano_patch2_window4_32", 64),  # HF's Swin fails on stage maps smaller than the window (the _28s)
    ("swin_tiny_patch4_window7_224", 16),
    ("cvt_7_28", 64),
    ("cvt_13_224", 16),
    ("resnet18@32", 64),
    ("resnet50", 16),
    ("convnext_atto_28", 64),
    ("convnext_tiny", 16),
]
CNNS = ("resnet", "convnext")  # the families measured in channels-last too
# ours -> HF's: the converters' table read backwards, with HF's fused tanh GELU (not gelu_new's composed formula)
HF_ACT = {**{ours: hf for hf, ours in HF_TO_OURS_ACT.items()}, "gelu_tanh": "gelu_pytorch_tanh"}


# --- the HF twin of a vitlab model: one function per family, the reverse of its HF converter ---------------------
def per_stage(value: Any, n: int) -> list[Any]:
    """A per-stage HF setting from vitlab's value for every stage (a scalar) or for each (a sequence)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def hf_act(act: str) -> str:
    if act not in HF_ACT:
        raise VitlabError(f"activation {act!r} has no HF transformers name; HF twins exist for {sorted(HF_ACT)}")
    return HF_ACT[act]


def hf_vit_config(cls: type, a: dict[str, Any]) -> Any:
    """ViTConfig / DeiTConfig (same fields) from VisionTransformer arguments."""
    return cls(
        image_size=a["img_size"],
        patch_size=a["patch_size"],
        num_channels=a["in_chans"],
        hidden_size=a["embed_dim"],
        num_hidden_layers=a["depth"],
        num_attention_heads=a["num_heads"],
        intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]),
        qkv_bias=a["qkv_bias"],
        layer_norm_eps=a["norm_eps"],
        hidden_act=hf_act(a["act"]),
        hidden_dropout_prob=a["proj_drop_rate"],
        attention_probs_dropout_prob=a["attn_drop_rate"],
        num_labels=a["num_classes"],
    )


def hf_vit(a: dict[str, Any]) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(hf_vit_config(ViTConfig, a))


def hf_deit(a: dict[str, Any]) -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    cls = DeiTForImageClassificationWithTeacher if a["dist_head"] else DeiTForImageClassification
    return cls(hf_vit_config(DeiTConfig, a))


def hf_swin(a: dict[str, Any]) -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(
        image_size=a["img_size"],
        patch_size=a["patch_size"],
        num_channels=a["in_chans"],
        embed_dim=a["embed_dim"],
        depths=list(a["depths"]),
        num_heads=list(a["num_heads"]),
        window_size=a["window_size"],
        mlp_ratio=a["mlp_ratio"],
        qkv_bias=a["qkv_bias"],
        hidden_act=hf_act(a["act"]),
        drop_path_rate=a["drop_path_rate"],
        hidden_dropout_prob=a["proj_drop_rate"],
        attention_probs_dropout_prob=a["attn_drop_rate"],
        layer_norm_eps=a["norm_eps"],
        num_labels=a["num_classes"],
    )
    return SwinForImageClassification(cfg)


def hf_cvt(a: dict[str, Any]) -> nn.Module:
    from transformers import CvtConfig, CvtForImageClassification

    n = len(a["depth"])
    kernel = per_stage(a["kernel_size"], n)
    cfg = CvtConfig(
        num_channels=a["in_chans"],
        embed_dim=list(a["embed_dim"]),
        depth=list(a["depth"]),
        num_heads=list(a["num_heads"]),
        patch_sizes=list(a["patch_size"]),
        patch_stride=list(a["patch_stride"]),
        patch_padding=list(a["patch_padding"]),
        mlp_ratio=per_stage(a["mlp_ratio"], n),
        qkv_bias=per_stage(a["qkv_bias"], n),
        kernel_qkv=kernel,
        padding_q=[k // 2 for k in kernel],
        padding_kv=[k // 2 for k in kernel],
        stride_kv=per_stage(a["stride_kv"], n),
        cls_token=[False] * (n - 1) + [a["class_token"]],
        # HF's drop path is per stage; vitlab's one rate (0 in every variant) is checked by the round trip
        drop_path_rate=[0.0] * n,
        drop_rate=[a["proj_drop_rate"]] * n,
        attention_drop_rate=[a["attn_drop_rate"]] * n,
        num_labels=a["num_classes"],
    )
    return CvtForImageClassification(cfg)


def hf_resnet(a: dict[str, Any]) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    from vitlab.models.resnet import BLOCKS

    if a["stem_type"] != "imagenet":
        raise VitlabError("HF's ResNet has only the 7x7 ImageNet stem; benchmark e.g. resnet18@32 instead")
    cfg = ResNetConfig(
        num_channels=a["in_chans"],
        embedding_size=a["stem_width"],
        hidden_sizes=[c * BLOCKS[a["block"]].expansion for c in a["channels"]],
        depths=list(a["layers"]),
        layer_type=a["block"],
        hidden_act=hf_act(a["act"]),
        downsample_in_first_stage=a["first_stage_stride"] == 2,
        downsample_in_bottleneck=a["stride_in_1x1"],
        num_labels=a["num_classes"],
    )
    return ResNetForImageClassification(cfg)


def hf_convnext(a: dict[str, Any]) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(
        num_channels=a["in_chans"],
        patch_size=a["patch_size"],
        num_stages=len(a["depths"]),
        hidden_sizes=list(a["dims"]),
        depths=list(a["depths"]),
        hidden_act=hf_act(a["act"]),
        layer_scale_init_value=a["ls_init_value"] or 0.0,
        layer_norm_eps=a["head_norm_eps"],  # HF's other LayerNorms are fixed at 1e-6, checked by the round trip
        drop_path_rate=a["drop_path_rate"],
        num_labels=a["num_classes"],
    )
    return ConvNextForImageClassification(cfg)


HF_TWINS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "vit": hf_vit,
    "deit": hf_deit,
    "swin": hf_swin,
    "cvt": hf_cvt,
    "resnet": hf_resnet,
    "convnext": hf_convnext,
}


def full_kwargs(model: nn.Module) -> dict[str, Any]:
    """The model's constructor arguments with every default filled in (DeiT passes ViT's through ``**kwargs``)."""
    out: dict[str, Any] = {}
    for cls in reversed(type(model).__mro__):
        if "__init__" in vars(cls) and cls.__module__.startswith("vitlab"):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.default is not p.empty:
                    out[p.name] = p.default
    return {**out, **model.init_kwargs}


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        n = len(a) if isinstance(a, (list, tuple)) else len(b)
        return per_stage(a, n) == per_stage(b, n)
    return a == b


# Constructor arguments that do not change the function: the default input size recorded in default_cfg by models
# that run at any size (CvT), and initialisation-only choices (the weights are loaded)
NOT_FUNCTION = {"cvt": {"img_size"}, "resnet": {"zero_init_last"}}


def move_off_init(model: nn.Module, std: float = 0.02) -> None:
    """Noise on every weight and BatchNorm statistic: identity-at-init parts (LayerScale, zero biases, BN with
    mean 0 / var 1) would otherwise let a wrong mapping pass the logits check."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(b.abs() + 0.5 if name.endswith("running_var") else b + torch.randn_like(b) * std)


def parse_model(spec: str) -> tuple[str, int | None]:
    name, _, size = spec.partition("@")
    return name, int(size) if size else None


def twins(spec: str) -> tuple[nn.Module, nn.Module, tuple[int, int, int]]:
    """(vitlab model, HF model, input size) computing the same function, checked as the module docstring says."""
    name, size = parse_model(spec)
    with torch.device("meta"):
        named = vitlab.create_model(name)
        if size and "img_size" in named.init_kwargs:
            named = vitlab.create_model(name, img_size=size)
    arch = type(named).arch
    if arch not in HF_TWINS:
        raise VitlabError(f"{name}: HF transformers has no {arch!r} family; benchmarked families: {sorted(HF_TWINS)}")
    want = full_kwargs(named)
    try:
        theirs = HF_TWINS[arch](want)
    except VitlabError as e:
        raise VitlabError(f"{name}: {e}") from e
    move_off_init(theirs)
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = vitlab.from_pretrained(d)
    got = full_kwargs(ours)
    ignore = NOT_FUNCTION.get(arch, set())
    differ = {k: (want[k], got.get(k)) for k in want if k not in ignore and not same_value(want[k], got.get(k))}
    if differ:
        raise VitlabError(f"{name}: HF's twin is another architecture, (ours, twin's) arguments differ: {differ}")
    chans, h, w = named.default_cfg["input_size"]
    input_size = (chans, size, size) if size else (chans, h, w)
    x = torch.randn(2, *input_size)
    theirs.eval()
    with torch.no_grad():
        try:
            expected = theirs(pixel_values=x).logits
        except RuntimeError as e:
            raise VitlabError(f"{name}: HF's {type(theirs).__name__} cannot run this configuration: {e}") from e
        actual = ours(x)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: logits differ: {m}")
    return ours, theirs, input_size


# --- timing ---------------------------------------------------------------------------------------------------
def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits a training loss reads: both heads of a distilled DeiT (in training mode), else the one output."""
    if hasattr(model, "forward_features"):
        out = model(x)
        return out if isinstance(out, tuple) else (out,)
    out = model(pixel_values=x)
    dist = getattr(out, "distillation_logits", None)
    return (out.cls_logits, dist) if model.training and dist is not None else (out.logits,)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, precision: str) -> Callable[[], None]:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), amp:
                outputs(model, x)

        return step
    model.train()
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # both heads' logits, as HF's WithTeacher model returns them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer (both sides)

    def step() -> None:
        with amp:
            logits = outputs(model, x)
            loss = sum(F.cross_entropy(o.float(), y) for o in logits) / len(logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def rate(step: Callable[[], None], batch: int, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t)


def bench(
    pair: tuple[nn.Module, nn.Module, tuple[int, int, int]],
    batch: int,
    precision: str,
    mode: str,
    layout: str,
    *,
    rounds: int,
    iters: int,
    warmup: int,
) -> dict[str, Any]:
    """One row, on fresh copies of the checked twins (a training row changes their weights)."""
    torch.manual_seed(0)
    ours, theirs = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    input_size = pair[2]
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, ours.num_classes, (batch,))
    if layout == "channels_last":
        ours, theirs = (m.to(memory_format=torch.channels_last) for m in (ours, theirs))
        x = x.contiguous(memory_format=torch.channels_last)
    steps = {"vitlab": make_step(ours, x, y, mode, precision), "hf": make_step(theirs, x, y, mode, precision)}
    for s in steps.values():  # warm-up: allocator, oneDNN kernel selection
        rate(s, batch, warmup)
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            rates[k].append(rate(s, batch, iters))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "input": "x".join(map(str, input_size)),
        "batch": batch,
        "precision": precision,
        "mode": mode,
        "layout": layout,
        "hf_attention": getattr(theirs.config, "_attn_implementation", None),
        "vitlab_img_s": med["vitlab"],
        "hf_img_s": med["hf"],
        "ratio": med["vitlab"] / med["hf"],
        "rounds": rates,
    }


def img_s(v: float) -> str:
    """Three significant digits at least, so that the slow rows (bf16 without native support) still read."""
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m, _ in DEFAULT], help="NAME or NAME@SIZE")
    p.add_argument("--batch", type=int, nargs="*", help="one per model, or one for all (default: 64 small, 16 at 224)")
    p.add_argument(
        "--precisions",
        nargs="*",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="fp32 by default: without native bf16 (AVX2 CPUs) a bf16 run at full settings takes hours",
    )
    p.add_argument("--modes", nargs="*", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--channels-last", action="store_true", help="also measure the CNNs in channels-last layout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--quick", action="store_true", help="1 round of 1 step at batch 2 after 1 warm-up step")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar
    if a.quick:
        a.rounds, a.iters, a.warmup, a.batch = 1, 1, 1, [2]
    torch.set_num_threads(a.threads)
    defaults = dict(DEFAULT)
    if a.batch and len(a.batch) not in (1, len(a.models)):
        p.error("--batch takes one value, or one per model")
    batches = (a.batch * len(a.models) if len(a.batch) == 1 else a.batch) if a.batch else None
    batches = batches or [defaults.get(m, 16 if (parse_model(m)[1] or 224) >= 224 else 64) for m in a.models]

    print(f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{a.rounds} rounds of {a.iters} steps after {a.warmup} warm-up steps; medians of images/s\n")
    print("| model | input | batch | precision | mode | layout | vitlab img/s | HF img/s | vitlab / HF |")
    print("| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: |")
    timing = {"rounds": a.rounds, "iters": a.iters, "warmup": a.warmup}
    results, skipped = [], []
    for spec, batch in zip(a.models, batches):
        try:
            pair = twins(spec)
        except VitlabError as e:  # no HF twin for this configuration: say so, measure the rest
            skipped.append(str(e))
            continue
        layouts = ["contiguous", "channels_last"] if a.channels_last and type(pair[0]).arch in CNNS else ["contiguous"]
        for precision in a.precisions:
            for mode in a.modes:
                for layout in layouts:
                    r = {"model": spec, **bench(pair, batch, precision, mode, layout, **timing)}
                    results.append(r)
                    print(
                        f"| {spec} | {r['input']} | {batch} | {precision} | {mode} | {layout} | "
                        f"{img_s(r['vitlab_img_s'])} | {img_s(r['hf_img_s'])} | **{r['ratio']:.2f}x** |",
                        flush=True,
                    )
    for note in skipped:
        print(f"\nskipped {note}")
    if a.json:
        meta = {"torch": torch.__version__, "threads": a.threads, "machine": platform.processor() or platform.machine()}
        with open(a.json, "w") as f:
            json.dump({**meta, "results": results, "skipped": skipped}, f, indent=2)


if __name__ == "__main__":
    main()
