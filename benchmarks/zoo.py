"""The zoo: every small variant of every family, trained on Fashion-MNIST under the same budget of training time.

    python benchmarks/zoo.py                       # every 28-px model at 54,000 / 5,000 / 1,000 images, 300 s each
    python benchmarks/zoo.py --sizes 1000 5000 --budget 180
    python benchmarks/zoo.py --models 'vit_*' 'resnet*'
    python benchmarks/zoo.py --quick               # the pipeline on digits: 2 models and the teacher, 8 s each

"Every small variant" is every registered model built for Fashion-MNIST's 1 x 28 x 28 images, so families added
later (non-local, axial, local-attention models) join without an edit here. Each model trains with one shared recipe
(`RECIPE`) and a schedule sized to the budget (`vitlab train --budget`: throughput measured over the first steps,
warmup and cosine ending at the budget). Distilled DeiT variants learn from a ResNet teacher (``TEACHER``) trained
first, in the same run, at the same size and budget (DeiT, Touvron et al. 2021, section 4: the CNN teacher).

Recorded per model and size: test accuracy (the best-validation checkpoint on the 10,000 test images, or on a
stratified ``--test-images`` of them), parameters, GFLOPs (one image, multiply-add = 2), training images/s (the
trainer's mean), inference images/s (batch 256), and a curve of test accuracy against training time (a fixed
stratified 2,000 of the test images at every evaluation).
Runs live in ``--out``/<size>/<model>/; a finished one holds ``zoo.json`` and is skipped when the zoo runs again, an
interrupted one is resumed exactly from its last checkpoint. ``docs/zoo.md`` gets the tables (between its markers;
the rest of the file is left alone) and ``docs/zoo.png`` the plot.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from vitlab import list_models
from vitlab._io import write_json
from vitlab._plot import pyplot
from vitlab._registry import get_variant
from vitlab.checkpoint import from_pretrained
from vitlab.data import build_dataset
from vitlab.data.base import stratified_split
from vitlab.errors import VitlabError
from vitlab.stats import model_stats
from vitlab.train import TrainConfig, evaluate, train
from vitlab.train.config import load_yaml
from vitlab.train.precision import resolve_precision
from vitlab.train.report import read_metrics

FULL = "full"
TEACHER = "resnet18_28"
# one recipe for every model (the Fashion-MNIST recipe of configs/fashion_mnist_vit.yaml, schedule from the budget)
RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_epochs": 1.0,
    "weight_decay": 0.05,
    "clip_grad": 1.0,
    "hflip": True,
    "precision": "auto",
}
CURVE_TEST_IMAGES = 2000
BEGIN, END = "<!-- zoo:begin (written by benchmarks/zoo.py) -->", "<!-- zoo:end -->"


def zoo_models(patterns: list[str] | None) -> list[str]:
    """Registered models that take 1 x 28 x 28 images (matching ``patterns`` when given), the teacher first."""
    names = []
    for name in list_models():
        _, kwargs, cfg = get_variant(name)
        img = kwargs.get("img_size", cfg["input_size"][1:])
        size = (kwargs.get("in_chans", cfg["input_size"][0]), *((img, img) if isinstance(img, int) else img))
        if tuple(size) == (1, 28, 28) and (not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)):
            names.append(name)
    return sorted(names, key=lambda n: (n != TEACHER, n))


def is_distilled(name: str) -> bool:
    return hasattr(get_variant(name)[0], "set_distilled_training")


@torch.no_grad()
def inference_rate(model: torch.nn.Module, precision: str, *, batch: int = 256, seconds: float = 2.0) -> float:
    """Images per second of a forward pass in eval mode (after one untimed batch)."""
    from vitlab.train.evaluate import autocast

    model.eval()
    x = torch.randn(batch, *model.default_cfg["input_size"])
    with autocast(torch.device("cpu"), precision):
        model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def curve_scorer(test_images: int, precision: str):
    """``on_eval`` for the trainer: accuracy on a fixed stratified subset of the test split, for the curves."""
    subset: dict[str, Any] = {}

    def score(model, splits, record):
        if "data" not in subset:
            subset["data"] = splits.test
            if test_images < len(splits.test):
                _, idx = stratified_split(splits.test.labels, test_images / len(splits.test), seed=0)
                subset["data"] = splits.test.subset(idx, splits.test.labels[idx])
        r = evaluate(
            model,
            subset["data"],
            num_classes=splits.num_classes,
            mean=splits.mean,
            std=splits.std,
            batch_size=512,
            precision=precision,
        )
        return {"test_acc": r["accuracy"]}

    return score


def run_entry(name: str, size: str, args: argparse.Namespace, teacher: Path | None) -> dict[str, Any]:
    values = {
        **RECIPE,
        "data": args.data,
        "model": name,
        "budget_s": args.budget,
        "threads": args.threads,
        "val_fraction": args.val_fraction,
        "train_images": None if size == FULL else int(size),
        "test_images": args.test_images,
        **({"teacher": str(teacher)} if teacher else {}),
        **args.set,
    }
    record = {
        "model": name,
        "size": size,
        "teacher": (args.teacher or TEACHER) if teacher else None,
        "budget_s": args.budget,
    }
    return train_entry(Path(args.out) / size / name, values, record, curve_images=args.curve_images)


def train_entry(
    out: Path, values: dict[str, Any], record: dict[str, Any], *, curve_images: int, marker: str = "zoo.json"
) -> dict[str, Any]:
    """Train one entry (``values``: its TrainConfig) in ``out`` and return ``record`` with what it measured.

    A finished entry (``out``/``marker`` exists) is read back, an interrupted one resumed exactly from its last
    checkpoint; a failure is recorded as ``error`` instead of stopping an unattended benchmark."""
    done = out / marker
    if done.exists():
        return json.loads(done.read_text())
    resume = (out / "checkpoints" / "last" / "trainer_state.pt").exists()
    values = {**values, "out": str(out)}
    if resume:  # the run's own recipe, with the step count its budget fixed
        values = load_yaml(out / "config.yaml")
    cfg = TrainConfig.from_dict(values)
    precision = resolve_precision(cfg.precision, "cpu")[0]
    label, size = record.get("label", record["model"]), record["size"]
    print(f"\n=== {label} at {size} training images ({'resuming' if resume else 'starting'}) ===", flush=True)
    try:
        summary = train(cfg, resume=resume, on_eval=curve_scorer(curve_images, precision))
    except (VitlabError, RuntimeError) as e:  # one broken entry must not stop an unattended zoo: record it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{label} at {size}: failed: {first}", flush=True)
        return {**record, "error": first}
    best = from_pretrained(out / "checkpoints" / "best")
    stats = model_stats(cfg.model, **cfg.model_args)
    result = {
        **record,
        "family": get_variant(cfg.model)[0].arch,
        "train_images": summary.get("train_images"),
        "test_accuracy": summary["test_accuracy"],
        "best_val_accuracy": summary["best_val_accuracy"],
        "params": stats["params"],
        "gflops": stats["gflops"],
        "train_images_per_s": summary["images_per_s"],
        "infer_images_per_s": inference_rate(best, precision),
        "train_time_s": summary["train_time_s"],
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "precision": summary["precision"],
        "curve": [(m["time_s"], m["test_acc"]) for m in read_metrics(out / "metrics.jsonl") if "test_acc" in m],
    }
    write_json(done, result)
    return result


# --- the report --------------------------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str, plot: Path) -> str:
    cpu = cpu_name()
    recipe = ", ".join(f"{k} {v}" for k, v in {**RECIPE, **args.set}.items())
    tested = f"a stratified {args.test_images:,} of the test images" if args.test_images else "the whole test split"
    lines = [
        BEGIN,
        "",
        f"```bash\n{command}\n```",
        "",
        f"{args.data}, measured on {date.today()}: {cpu}, {args.threads} threads, torch {torch.__version__}; every "
        f"model trained for {args.budget:.0f} s of training time (evaluation not counted) with the shared recipe of "
        f"`benchmarks/zoo.py` ({recipe}; warmup + cosine sized to the budget). Test accuracy: the best-validation "
        f"checkpoint on {tested} (the curves: {args.curve_images:,} of them). Distilled DeiT "
        + (
            f"variants learn from the checkpoint `{args.teacher}`, trained beforehand (hard distillation)."
            if args.teacher
            else f"variants learn from the `{TEACHER}` of the same size (hard distillation)."
        ),
        "",
    ]
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        if not rows:
            continue
        n = next((r["train_images"] for r in rows if r.get("train_images")), None)
        title = f"{n:,} training images" if n else ("all training images" if size == FULL else f"{size} images")
        lines += [
            f"### {title}",
            "",
            "| model | family | params | GFLOPs | test acc | train img/s | infer img/s | steps | epochs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        ok = sorted((r for r in rows if "error" not in r), key=lambda r: -r["test_accuracy"])
        for r in ok:
            name = f"{r['model']} (teacher: {r['teacher']})" if r.get("teacher") else r["model"]
            lines.append(
                f"| {name} | {r['family']} | {r['params']:,} | {r['gflops']:.3f} | {100 * r['test_accuracy']:.2f}% "
                f"| {r['train_images_per_s'] or 0:,.0f} | {r['infer_images_per_s']:,.0f} | {r['steps']} "
                f"| {r['epochs']:.1f} |"
            )
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | |")
        lines.append("")
    lines += [f"![test accuracy against training time]({plot.name})", "", END]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def write_markdown(doc: Path, block: str, *, begin: str = BEGIN, end: str = END, heading: str = "# The zoo") -> None:
    """Replace the generated block of ``doc`` (between the markers), keeping what was written around it."""
    text = doc.read_text() if doc.exists() else heading + "\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


CNN_FAMILIES = {"resnet", "convnext", "nonlocal_cnn", "attention_cnn"}
MARKERS = "o^sDvP*X"


def plot(
    results: list[dict[str, Any]],
    sizes: list[str],
    data: str,
    curve_images: int,
    out: Path,
    *,
    colour_by: str = "family",
    budgets: dict[str, float] | None = None,
) -> None:
    """Test accuracy against training time, one panel per training-set size: a colour per ``colour_by`` (family,
    or the entry's label), a marker per variant within it, CNNs dashed; ``budgets`` (seconds per size) in the
    titles."""
    plt = pyplot()

    sizes = [s for s in sizes if any(r["size"] == s and r.get("curve") for r in results)]
    if not sizes:
        return
    tab20 = plt.get_cmap("tab20")
    families = sorted({r[colour_by] for r in results if r.get("curve")})
    # the ten strong colours of tab20 first, then their light partners
    colour = {f: tab20((2 * i) % 20 + (2 * i) // 20) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(sizes), figsize=(10 * len(sizes), 6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        variant: dict[str, int] = {}
        for r in sorted(
            (r for r in results if r["size"] == size and r.get("curve")), key=lambda r: r.get("label", r["model"])
        ):
            t, acc = zip(*r["curve"])
            k = variant[r[colour_by]] = variant.get(r[colour_by], -1) + 1
            ax.plot(
                t,
                [100 * a for a in acc],
                "--" if r["family"] in CNN_FAMILIES else "-",
                color=colour[r[colour_by]],
                marker=MARKERS[k % len(MARKERS)],
                markersize=4,
                label=f"{r.get('label', r['model'])} ({100 * r['test_accuracy']:.1f}%)",
            )
        n = next((r["train_images"] for r in results if r["size"] == size and r.get("train_images")), None)
        ax.set(
            xlabel="training time (s)",
            ylabel=f"test accuracy (%, {curve_images:,} test images)",
            title=f"{data}, {f'{n:,}' if n else 'all'} training images"
            + (f", {budgets[size]:.0f} s of training per model" if budgets and size in budgets else "")
            + " (CNNs dashed)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="final test accuracy", title_fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, help="seconds of training per model and size (default 300)")
    p.add_argument("--data", help="default fashion-mnist")
    p.add_argument("--sizes", nargs="*", help="training images: full or a number (default: full 5000 1000)")
    p.add_argument("--models", nargs="*", help="shell patterns (default: every 1x28x28 model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--curve-images", type=int, help=f"test images scored per evaluation ({CURVE_TEST_IMAGES})")
    p.add_argument(
        "--test-images",
        type=int,
        help="score the final test on a stratified subset of this many test images, the same for every model "
        "(default: the whole test split; scoring 10,000 images takes minutes for the slowest variants on a CPU)",
    )
    p.add_argument("--out", help="default runs/zoo")
    p.add_argument("--doc", help="default docs/zoo.md")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (YAML values)")
    p.add_argument(
        "--teacher",
        help="a trained checkpoint that teaches the distilled DeiTs instead of the zoo's own TEACHER entry (as the "
        "DeiT paper distils from a teacher trained beforehand; its training time is not counted)",
    )
    p.add_argument("--quick", action="store_true", help="digits, 2 models and the teacher, 1,000 images, 8 s each")
    args = p.parse_args()
    import sys

    import yaml

    command = "python benchmarks/zoo.py " + " ".join(sys.argv[1:])
    args.set = {k.replace("-", "_"): yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    defaults = {
        "budget": 300.0,
        "data": "fashion-mnist",
        "sizes": [FULL, "5000", "1000"],
        "curve_images": CURVE_TEST_IMAGES,
        "out": "runs/zoo",
        "doc": "docs/zoo.md",
    }
    if args.quick:  # digits: the same 28-px models (its 8x8 images upsampled), but 180 val and 180 test images
        defaults = {
            "budget": 8.0,
            "data": "digits",
            "sizes": ["1000"],
            "curve_images": 100,
            "out": "runs/zoo-quick",
            "doc": "runs/zoo-quick/zoo.md",
            "models": ["vit_tiny_patch7_28", "deit_tiny_distilled_patch7_28"],
        }
        args.set = {"batch_size": 32, **args.set}
    for key, value in defaults.items():  # what the command line left out
        if getattr(args, key) is None:
            setattr(args, key, value)
    for size in args.sizes:
        if size != FULL and not size.isdigit():
            raise SystemExit(f"--sizes takes 'full' or a number of images, not {size!r}")
    names = zoo_models(args.models)
    if any(is_distilled(n) for n in names) and TEACHER not in names and not args.teacher:
        names.insert(0, TEACHER)
    if not names:
        raise SystemExit(f"no 1x28x28 model matches {args.models}")
    build_dataset(args.data)  # fails early, with the reason, when the data cannot be had
    print(
        f"{len(names)} models x {len(args.sizes)} sizes x {args.budget:.0f} s of training: at least "
        f"{len(names) * len(args.sizes) * args.budget / 3600:.1f} h plus evaluation; finished entries are skipped",
        flush=True,
    )
    results = []
    for size in args.sizes:
        teacher = Path(args.teacher) if args.teacher else None
        for name in names:
            use_teacher = teacher if is_distilled(name) else None
            r = run_entry(name, size, args, use_teacher)
            results.append(r)
            if name == TEACHER and "error" not in r and not args.teacher:
                teacher = Path(args.out) / size / TEACHER / "checkpoints" / "best"
            doc = Path(args.doc)
            png = doc.with_suffix(".png")
            budgets = dict.fromkeys(args.sizes, args.budget)  # after every entry: a long zoo shows its progress
            plot(results, args.sizes, args.data, args.curve_images, png, budgets=budgets)
            write_markdown(doc, markdown(results, args, command, png))
    print(f"\ntables in {args.doc}, plot in {Path(args.doc).with_suffix('.png')}")


if __name__ == "__main__":
    main()
