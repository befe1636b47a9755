"""The ``vitlab`` command line: a thin layer over library functions that the tests call directly."""

from __future__ import annotations

import os
import sys

import click

from vitlab.errors import VitlabError


class _Group(click.Group):
    """Prints a user error as one line (``error: ...``, exit status 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VitlabError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitlab")
def cli() -> None:
    """Train, compare and understand Vision Transformers."""


@cli.command()
@click.argument("pattern", default="*")
def models(pattern: str) -> None:
    """List registered models matching PATTERN (shell-style, e.g. 'vit_*_28')."""
    from rich.console import Console
    from rich.table import Table

    from vitlab import list_models
    from vitlab.stats import model_stats

    names = list_models(pattern)
    if not names:
        raise VitlabError(f"no model matches {pattern!r}; 'vitlab models' lists them all")
    table = Table(title=f"vitlab models ({len(names)})", title_justify="left")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("input (C, H, W)", justify="right")
    for name in names:
        s = model_stats(name)
        table.add_row(name, f"{s['params']:,}", f"{s['gflops']:.2f}", str(s["input_size"]))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    click.echo("GFLOPs: one forward pass of one image, a multiply-add counted as 2.")


@cli.command()
@click.argument("name")
def info(name: str) -> None:
    """Show a model's architecture arguments, size and default configuration."""
    from vitlab.stats import model_stats

    s = model_stats(name)
    click.echo(f"{name}")
    click.echo(f"  parameters : {s['params']:,}")
    click.echo(f"  GFLOPs     : {s['gflops']:.3f} (one image, multiply-add = 2)")
    click.echo(f"  input size : {s['input_size']}")
    click.echo(f"  classes    : {s['num_classes']}")
    click.echo(f"  paper      : {s['paper']}")
    click.echo("  arguments  : " + ", ".join(f"{k}={v}" for k, v in s["kwargs"].items()))


def _parse_set(values: tuple[str, ...]) -> dict:
    from vitlab.train.config import parse_set

    return parse_set(values)


def _options(flags: dict, sets: tuple[str, ...]) -> dict:
    """The options a command's flags and --set items give; one given both ways is an error, not last wins."""
    given = {k: v for k, v in flags.items() if v is not None}
    extra = _parse_set(sets)
    both = sorted(set(given) & set(extra))
    if both:
        raise VitlabError(f"{both[0]} is given both by a flag and by --set {both[0]}=...; give it once")
    return {**given, **extra}


def _loop_options(f):
    """The options of every command that trains through the loop (`vitlab train`, `clip`, `caption`, `seg` and
    `retrieval train`): where the data is, the schedule, how and where it runs, and --set for the rest."""
    options = [
        click.option("--data-dir", help="Where dataset files are (or are downloaded to)."),
        click.option("--epochs", type=int),
        click.option("--batch-size", type=int, help="Samples per step per process."),
        click.option("--lr", type=float, help="Peak learning rate."),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "bf16"]),
            help="auto (default): bf16 autocast where the hardware has native bf16 (AMX, AVX512-BF16, CUDA), else "
            "fp32.",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--seed", type=int),
        click.option("--out", help="Run directory (default runs/DATA-MODEL-TIME)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last."),
        click.option("--max-steps", type=int, help="Stop after this many optimizer steps."),
        click.option(
            "--budget",
            "budget_s",
            help="Size the schedule to this much training time (600, 90s, 10m): warmup and cosine end at the budget.",
        ),
        click.option("--time-budget", "time_budget_s", type=float, help="Stop after this many seconds of training."),
        click.option(
            "--log",
            help="tensorboard: also write RUN/tensorboard/ (pip install vitlab[tensorboard]); metrics.jsonl is always "
            "written. Under torchrun: --set log=tensorboard.",
        ),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            help="Any other option of the recipe, e.g. --set ema_decay=0.999 --set model_args.depth=6.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--model", help="Model name (vitlab models lists them); default: chosen from the data.")
@click.option("--data", help="digits | fashion-mnist | cifar10 | cifar100 | folder:PATH")
@click.option("--classes", help="Train on a class subset, e.g. 0-5 or cat,dog (relabelled 0..k-1, names kept).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Skip unreadable images in folder datasets.")
@click.option("--teacher", help="Distil from this checkpoint (vitlab, HF or timm; any architecture).")
@click.option("--distill", type=click.Choice(["hard", "soft"]), help="Distillation kind (default hard).")
@click.option("--distill-tau", type=float, help="Soft distillation temperature (default 3.0).")
@click.option("--distill-alpha", type=float, help="Soft distillation weight of the teacher (default 0.1).")
@click.option(
    "--init",
    help="Fine-tune from this checkpoint (vitlab, HF, timm, hf-hub:ORG/REPO) or model name with published weights.",
)
@click.option("--freeze", type=click.Choice(["backbone"]), help="backbone: train only the classifier (linear probe).")
@click.option("--layer-decay", type=float, help="Learning rate x F per layer below the head (e.g. 0.75).")
@_loop_options
def train(config_file, resume, sets, compile_, **flags) -> None:
    """Train a model; writes metrics, curves, checkpoints and a summary into the run directory."""
    from vitlab.train import train as run_training

    overrides = _options(flags, sets)
    if compile_ is not None:
        overrides["compile"] = compile_
    summary = run_training(_train_config(config_file, resume, overrides), resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        _print_summary(summary)


def _train_config(config_file: str | None, resume: bool, overrides: dict):
    """A run's configuration: defaults < recipe < flags, or on --resume the run's own config.yaml < flags."""
    from vitlab.train import TrainConfig
    from vitlab.train.config import load_yaml, merge_options

    if resume:
        if not overrides.get("out"):
            raise VitlabError("--resume needs --out RUN_DIR, the run to continue")
        from pathlib import Path

        saved = Path(overrides["out"]) / "config.yaml"
        if not saved.exists():
            raise VitlabError(f"nothing to resume: {saved} does not exist")
        # the run's own recipe: the trainer refuses a flag that would change it (where and how fast it runs may change)
        return TrainConfig.from_dict(merge_options(load_yaml(saved), overrides))
    return TrainConfig.from_sources(config_file, **overrides)


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", title_justify="left", show_header=False)
    rows = [
        ("model", f"{s['model']} ({s['params']:,} parameters)"),
        ("data", f"{s['data']}"),
        (f"test accuracy ({s['test_split']})", _score(s["test_accuracy"], f" on {s['test_count']} images")),
        ("best val accuracy", _score(s["best_val_accuracy"], f" (step {s['best_step']})", "none: no validation split")),
        ("epochs", f"{s['epochs']}"),
        ("training time", f"{s['train_time_s']:.1f} s at {s['images_per_s'] or 0:,.0f} images/s ({s['precision']})"),
        ("run directory", s["run_dir"]),
        ("curves", f"{s['run_dir']}/curves.png"),
        ("best checkpoint", f"{s['run_dir']}/checkpoints/best"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console(width=120 if not sys.stdout.isatty() else None).print(table)


def _score(value: float | None, then: str, missing: str = "no held-out data: no test accuracy") -> str:
    return missing if value is None else f"{value:.4f}{then}"


_ALLOW_CHANGED_DATA = click.option(
    "--allow-changed-data",
    is_flag=True,
    help="Evaluate even when the data changed since the run split it (its split may then hold training images).",
)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", help="Dataset to evaluate on (as for train); default: the run's, split as the run split it.")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--batch-size", type=int, help="Default: the run's evaluation batch (its batch size, at least 256).")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    help="Default: the run's. auto: bf16 where the hardware has native bf16, else fp32.",
)
@_ALLOW_CHANGED_DATA
@click.option("--out", help="Where to write confusion_matrix.png/.json (default: CHECKPOINT/eval-SPLIT).")
def eval_(checkpoint, data, data_dir, split, batch_size, precision, allow_changed_data, out) -> None:
    """Accuracy, per-class accuracy and a confusion matrix of a checkpoint on a dataset split: by default the
    run's own test images (RUN/split.json), in the run's precision."""
    from vitlab.predict import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, data, data_dir=data_dir, split=split, batch_size=batch_size,
                            precision=precision, out=out, allow_changed_data=allow_changed_data)  # fmt: skip
    click.echo(r["checked"])
    click.echo(f"precision {r['precision']} ({r['precision_reason']})")
    click.echo(f"{r['data']} {split}: accuracy {r['accuracy']:.4f} on {r['count']} images (loss {r['loss']:.4f})")
    width = max(len(c) for c in r["class_names"])
    for name, acc in zip(r["class_names"], r["per_class_accuracy"]):
        click.echo(f"  {name:<{width}}  {acc:.4f}")
    click.echo(f"confusion matrix: {r['png']} and {r['json']}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnx"]),
    default="torch",
    show_default=True,
    help="onnx: onnxruntime on CHECKPOINT/model.onnx (from vitlab export) or on a .onnx file.",
)
def predict(checkpoint, images, top_k, as_json, runtime) -> None:
    """Top-k classes with probabilities for each image."""
    import json

    from vitlab.predict import predict_files

    results = predict_files(checkpoint, list(images), top_k=top_k, runtime=runtime)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for p in r["top"]:
            click.echo(f"  {p['probability']:.4f}  {p['class']}")


# --- deploying -------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf", "timm"]), default="onnx", show_default=True)
@click.option(
    "--out",
    help="Output (default: CHECKPOINT/model.onnx, CHECKPOINT/hf or CHECKPOINT/timm; NAME.onnx, NAME.hf or NAME.timm "
    "beside a checkpoint file).",
)
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's recommended one).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest output difference accepted.")
def export(checkpoint, fmt, out, opset, atol) -> None:
    """Export a checkpoint to ONNX (dynamic batch, class names and normalisation in its metadata), checked against
    eager PyTorch in onnxruntime; or to a directory that HF transformers (--format hf) or timm (--format timm)
    loads, checked against vitlab's outputs (docs/export.md)."""
    from vitlab.export import export_hf, export_onnx, export_timm

    if fmt == "onnx":
        r = export_onnx(checkpoint, out, opset=opset, atol=atol)
        click.echo(f"{r['path']}: opset {r['opset']}, largest logit difference to PyTorch {r['max_abs_diff']:.2e}")
        return
    if opset is not None:
        raise VitlabError(f"--opset is an ONNX option; --format {fmt} takes none")
    r = {"hf": export_hf, "timm": export_timm}[fmt](checkpoint, out, atol=atol)
    if r["max_abs_diff"] is None:
        click.echo(f"{r['path']}: {fmt} layout, not checked: {r['checked_with']}")
    else:
        diff = r["max_abs_diff"]
        click.echo(f"{r['path']}: {fmt} layout, checked with {r['checked_with']}: largest difference {diff:.2e}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 for all.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="VITLAB_API_KEY",
    help="Require this key on every endpoint but /health: 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (a "
    "browser asks for it as a password). Default: $VITLAB_API_KEY.",
)
@click.option("--max-batch", type=int, default=16, show_default=True, help="Largest micro-batch.")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True, help="Micro-batch wait window.")
@click.option("--max-upload-mb", type=float, default=10.0, show_default=True)
@click.option("--max-pixels", type=int, default=40_000_000, show_default=True, help="Largest image (width x height).")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A name the server answers to in the Host header (repeatable; *.example.org for subdomains, * for any); "
    "others get 421. Default: localhost, 127.0.0.1 and ::1 without an API key, any name with one.",
)
@click.option(
    "--body-timeout", type=float, default=60.0, show_default=True, help="Seconds a request body may take (408)."
)
def serve(
    checkpoint,
    runtime,
    host,
    port,
    api_key,
    max_batch,
    max_wait_ms,
    max_upload_mb,
    max_pixels,
    allowed_hosts,
    body_timeout,
) -> None:
    """Serve a checkpoint over HTTP: a web page at /, the API at /v1 (docs at /docs)."""
    from vitlab.serve import ServeConfig, run_server

    cfg = ServeConfig(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        api_key=api_key or None,
        allowed_hosts=tuple(allowed_hosts) or None,
        body_timeout_s=body_timeout,
    )
    run_server(checkpoint, runtime=runtime, host=host, port=port, config=cfg)


# --- looking inside ----------------------------------------------------------------------------------------------
@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="explain", show_default=True, help="Directory for the pictures.")
@click.option("--head-fusion", type=click.Choice(["mean", "max", "min"]), default="mean", show_default=True)
@click.option("--discard-ratio", type=float, default=0.0, show_default=True, help="Weakest attention share dropped.")
def explain(checkpoint, images, out, head_fusion, discard_ratio) -> None:
    """Attention rollout over each image, and every layer's and head's attention map."""
    from vitlab.analysis.run import explain as run

    for r in run(checkpoint, list(images), out, head_fusion=head_fusion, discard_ratio=discard_ratio):
        click.echo(f"{r['image']}: {r['class']} ({r['probability']:.1%}) -> {r['rollout']}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, help="Dataset whose test images are used (as for train).")
@click.option("--data-dir")
@click.option("--images", type=int, default=64, show_default=True, help="Test images averaged over.")
@click.option("--out", default="inspect", show_default=True)
def inspect(checkpoint, data, data_dir, images, out) -> None:
    """Mean attention distance per head and layer, and position-embedding similarity (ViT paper, Figure 7)."""
    from vitlab.analysis.run import inspect as run

    r = run(checkpoint, data, out, data_dir=data_dir, images=images)
    for layer, heads in enumerate(r["mean_attention_distance"], start=1):
        click.echo(f"layer {layer:2d}: " + " ".join(f"{d:6.1f}" for d in heads) + "  (pixels, per head)")
    click.echo(f"pictures and numbers in {out}/ (distance.png, pos_embed.png, inspect.json)")


@cli.command()
@click.option("--checkpoint", type=click.Path(), help="A trained model: its ERF before and after training.")
@click.option(
    "--compare", multiple=True, help="Models (names or checkpoints) to draw side by side, e.g. a ResNet and a ViT."
)
@click.option("--inits", type=int, default=8, show_default=True, help="Random initialisations / inputs averaged.")
@click.option("--out", default="erf", show_default=True)
def erf(checkpoint, compare, inits, out) -> None:
    """Effective receptive fields (Luo et al. 2016): conv depth, training, and CNN against transformer."""
    from vitlab.analysis.run import erf_study

    r = erf_study(out, checkpoint=checkpoint, compare=tuple(compare), inits=inits)
    for depth, v in r["depth"].items():
        click.echo(
            f"{depth:2d} conv layers: 95% of the gradient within {v['radius95']:.1f} px of "
            f"{v['theoretical_radius']:.1f} px ({v['ratio']:.0%})"
        )
    for key in ("training", "compare"):
        for name, v in r.get(key, {}).items():
            click.echo(f"{name}: r95 {v['radius95']:.1f} px of {v['theoretical_radius']:.1f} px ({v['ratio']:.0%})")
    click.echo(f"pictures and numbers in {out}/")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True)
@click.option("--data-dir")
@click.option("--layer", type=int, help="Probe an intermediate block or stage instead of the pre-logits.")
@click.option("--draws", type=int, default=5, show_default=True)
@click.option("--out", help="Default: CHECKPOINT/probe.")
def probe(checkpoint, data, data_dir, layer, draws, out) -> None:
    """Linear and few-shot (k = 1, 2, 4, 8, 16 per class) logistic-regression probes on frozen features."""
    from vitlab.analysis.run import probe as run

    r = run(checkpoint, data, out, data_dir=data_dir, layer=layer, draws=draws)
    for k, v in r["shots"].items():
        click.echo(f"k={k:>3}: accuracy {v['accuracy']:.4f} +- {v['std']:.4f} ({v['draws']} draws)")


@cli.command()
@click.option("--model", required=True, help="Model to train on the known classes.")
@click.option("--data", required=True)
@click.option("--data-dir")
@click.option("--known", help="The known classes, e.g. 0-5 or 'shirt,bag'; the rest are unknown.")
@click.option("--splits", type=int, help="Instead of --known: this many random splits, one training each, averaged.")
@click.option("--num-known", type=int, default=6, show_default=True, help="--splits: known classes per split.")
@click.option("--seed", type=int, default=0, show_default=True, help="--splits: seed of the random splits.")
@click.option("--out", default="openset", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Training options, as for vitlab train.")
def openset(model, data, data_dir, known, splits, num_known, seed, out, sets) -> None:
    """Train on some classes, then score known against never-seen classes (max logit, max softmax)."""
    from vitlab.analysis.run import openset as run
    from vitlab.analysis.run import openset_splits

    if (known is None) == (splits is None):
        raise VitlabError("give either --known CLASSES or --splits N (random known classes, averaged)")
    if splits is not None:
        r = openset_splits(model, data, out, splits=splits, num_known=num_known, seed=seed, data_dir=data_dir,
                           train_options=_parse_set(sets))  # fmt: skip
        click.echo("split  known classes" + " " * 52 + "accuracy  max logit  max softmax (AUROC)")
        for i, s in enumerate(r["splits"]):
            click.echo(f"{i:5d}  {', '.join(s['known_classes']):63.63s}  {s['closed_set_test_accuracy']:.4f}  "
                       f"   {s['max_logit']:.4f}     {s['max_softmax']:.4f}")  # fmt: skip
        m = {k: r[k] for k in ("closed_set_test_accuracy", "max_logit", "max_softmax")}
        click.echo("mean" + " " * 67 + "  ".join(f"{v['mean']:.4f}+-{v['std']:.4f}" for v in m.values()))
        click.echo("AUROC as the unknown class (mean over the splits holding it out):")
        for c, v in r["per_unknown_class"].items():
            click.echo(f"  {c:14s} max logit {v['max_logit']:.4f}  max softmax {v['max_softmax']:.4f}  "
                       f"({v['splits']} splits)")  # fmt: skip
        click.echo(f"figure and numbers in {out}/ (openset_splits.png, openset.json; split-<i>/ per split)")
        return
    r = run(model, data, known, out, data_dir=data_dir, train_options=_parse_set(sets))
    click.echo(f"closed-set test accuracy on {', '.join(r['known_classes'])}: {r['closed_set_test_accuracy']:.4f}")
    for name in ("max_logit", "max_softmax"):
        m = r[name]
        click.echo(f"{name:12s} AUROC {m['auroc']:.4f}  FPR@95%TPR {m['fpr95']:.4f}")
    for c, v in r["per_unknown_class"].items():
        click.echo(f"  unknown {c:14s} AUROC max logit {v['max_logit']:.4f}  max softmax {v['max_softmax']:.4f}")
    click.echo(f"histograms and numbers in {out}/")


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--sigma", type=float, required=True, help="Noise standard deviation out of 255, e.g. 20.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the denoised PNG.")
@click.option("--reference", type=click.Path(), help="The clean image: prints PSNR and SSIM against it.")
@click.option(
    "--add-noise", is_flag=True, help="IMAGE is clean: make the observation z = y + n first (a demo; OUT-noisy.png)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise --add-noise draws.")
@click.option("--patch-size", type=int, default=7, show_default=True)
@click.option(
    "--search-size", type=int, default=21, show_default=True, help="Side of the search window; 0: whole image."
)
@click.option("--h", "h", type=float, help="Filtering parameter out of 255 (default 0.8 sigma).")
@click.option("--weights-at", nargs=2, type=int, metavar="ROW COL", help="Draw this pixel's weights (OUT-weights.png).")
def denoise(image, sigma, out, reference, add_noise, seed, patch_size, search_size, h, weights_at) -> None:
    """Non-local means denoising of IMAGE (Buades et al., 2005) for white Gaussian noise of known --sigma."""
    from vitlab.classic.nl_means import denoise_file

    r = denoise_file(
        image,
        sigma,
        out,
        reference=reference,
        add_noise_first=add_noise,
        seed=seed,
        patch_size=patch_size,
        search_size=search_size or None,
        h255=h,
        weights_at=tuple(weights_at) if weights_at else None,
    )
    size = "x".join(str(n) for n in r["shape"])
    click.echo(f"denoised {size} image in {r['time_s']:.2f} s: {r['out']}")
    for kind in ("noisy", "denoised"):
        if kind in r:
            click.echo(f"  {kind:<8}  PSNR {r[kind]['psnr']:.2f} dB  SSIM {r[kind]['ssim']:.4f}")
    if "weights_png" in r:
        click.echo(f"weights of pixel {tuple(weights_at)}: {r['weights_png']}")


@cli.group()
def bow() -> None:
    """Bag of visual words + SVM, the 2000s baseline, on vitlab train's datasets and splits."""


@bow.command("train")
@click.option("--data", required=True, help="digits | fashion-mnist | cifar10 | cifar100 | folder:PATH")
@click.option("--data-dir", help="Where dataset files are (or are downloaded to).")
@click.option("--out", help="Run directory (default runs/DATA-bow_...-TIME).")
@click.option("--descriptor", type=click.Choice(["hog", "daisy"]), default="hog", show_default=True)
@click.option("--codebook-size", type=int, default=256, show_default=True, help="Visual words (k-means clusters).")
@click.option("--pyramid", default="1,2", show_default=True, help="Spatial pyramid grid sides; 1 for a plain bag.")
@click.option("--norm", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option("--svm", type=click.Choice(["linear", "chi2"]), default="chi2", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--jobs", type=int, default=1, show_default=True, help="Processes for DAISY (-1: all cores).")
def bow_train(data, data_dir, out, pyramid, **options) -> None:
    """Train and test a bag-of-words classifier; writes model.joblib and summary.json into the run directory."""
    from vitlab.classic.bow import parse_ints, train_bow

    s = train_bow(data, out=out, data_dir=data_dir, pyramid=parse_ints(pyramid), **options)
    click.echo(f"{s['model']} on {s['data']}: test accuracy {s['test_accuracy']:.4f} on {s['test_count']} images")
    click.echo(f"  best val accuracy {s['best_val_accuracy']:.4f} (C={s['svm_C']})")
    click.echo(
        f"  training {s['train_time_s']:.1f} s ({s['images_per_s']:,.0f} images/s), "
        f"inference {s['inference_images_per_s']:,.0f} images/s"
    )
    click.echo(f"run directory: {s['run_dir']}")


@bow.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Dataset to evaluate on (as for train).")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
def bow_eval(run_dir, data, data_dir, split) -> None:
    """Accuracy and per-class accuracy of a trained bag-of-words run on a dataset split."""
    from vitlab.classic.bow import evaluate_bow

    r = evaluate_bow(run_dir, data, split=split, data_dir=data_dir)
    click.echo(f"{r['data']} {split}: accuracy {r['accuracy']:.4f} on {r['count']} images")
    width = max(len(c) for c in r["class_names"])
    for name, acc in zip(r["class_names"], r["per_class_accuracy"]):
        click.echo(f"  {name:<{width}}  {acc:.4f}")


# --- vision and language (CLIP) ------------------------------------------------------------------------------------
@cli.group()
def clip() -> None:
    """Contrastive image-text models (CLIP): train on image-caption pairs, evaluate retrieval and zero-shot."""


@clip.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe.")
@click.option("--image-model", "model", help="Image tower: any registered model (vitlab models).")
@click.option(
    "--text-model",
    help="Text tower: text_transformer_tiny | _small | _base (from scratch, BPE on the captions) | all_minilm_l6_v2.",
)
@click.option(
    "--data",
    help="captions:FILE.csv|.tsv|.jsonl, captions:fashion-mnist|digits, scenes:fashion-mnist|digits or "
    "coco-captions:DIR.",
)
@click.option("--image-column", help="Caption file column (key) with the image paths (default filepath).")
@click.option("--caption-column", help="Caption file column (key) with the captions (default title).")
@click.option("--unseen", help="Built-in sets: classes held out of training, comma-separated ('' for none).")
@click.option("--embed-dim", type=int, help="Width of the joint embedding (default 512).")
@click.option("--lock-text/--tune-text", default=None, help="Freeze the text tower (a pretrained one).")
@click.option("--lock-image/--tune-image", default=None, help="Freeze the image tower.")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Leave out rows with missing or bad images.")
@_loop_options
def clip_train(
    config_file, resume, sets, image_column, caption_column, unseen, embed_dim, lock_text, lock_image, **flags
) -> None:
    """Train a CLIP model on image-caption pairs, through the same loop, checkpoints and resume as `vitlab train`."""
    from vitlab.train import train as run_training

    overrides = _options(flags, sets)
    query = {"image": image_column, "caption": caption_column, "unseen": unseen}
    query = {k: v for k, v in query.items() if v is not None}
    if query:
        if not overrides.get("data"):
            raise VitlabError("--image-column, --caption-column and --unseen need --data captions:...")
        from urllib.parse import urlencode

        sep = "&" if "?" in overrides["data"] else "?"
        overrides["data"] += sep + urlencode(query, safe=",/")
    clip_args = dict(overrides.pop("clip_args", {}) or {})
    for key, value in (("embed_dim", embed_dim), ("lock_text", lock_text), ("lock_image", lock_image)):
        if value is not None:
            clip_args[key] = value
    if clip_args:
        overrides["clip_args"] = clip_args
    cfg = _train_config(config_file, resume, overrides)
    if not cfg.text_model:
        raise VitlabError("vitlab clip train needs --text-model (e.g. text_transformer_tiny or all_minilm_l6_v2)")
    summary = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_clip_summary(summary)


def _print_clip_summary(s: dict) -> None:
    click.echo(f"{s['model']} + text tower ({s['params']:,} parameters) on {s['data']}, {s['steps']} steps")
    if s["test_accuracy"] is None:
        click.echo("no held-out data: no retrieval or zero-shot scores")
    else:
        click.echo(f"retrieval on {s['test_count']} {s['test_split']} images:")
    for way in ("image_to_text", "text_to_image") if s["test_accuracy"] is not None else ():
        cells = "  ".join(f"R@{k} {s[f'{way}_recall@{k}']:.4f}" for k in (1, 5, 10))
        click.echo(f"  {way.replace('_', ' '):<14} {cells}")
    for kind in ("names", "descriptions"):
        if f"zero_shot_{kind}_accuracy" in s:
            z = {k.removeprefix(f"zero_shot_{kind}_"): v for k, v in s.items() if k.startswith(f"zero_shot_{kind}_")}
            click.echo(f"zero-shot, {kind} as prompts: " + ", ".join(f"{k} {v:.4f}" for k, v in z.items()))
    click.echo(f"run directory: {s['run_dir']} (best checkpoint: checkpoints/best)")


@clip.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", help="A caption set (captions:...) or a dataset with classes; default: the run's data.")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--prompts", type=click.Choice(["names", "descriptions", "both"]), default="names", show_default=True)
@_ALLOW_CHANGED_DATA
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def clip_eval(checkpoint, data, data_dir, split, prompts, allow_changed_data, as_json) -> None:
    """Image-text retrieval recall@1/5/10 and zero-shot accuracy of a CLIP checkpoint: by default on its run's own
    held-out images (RUN/split.json)."""
    from vitlab.zeroshot import evaluate_clip

    r = evaluate_clip(checkpoint, data, data_dir=data_dir, split=split, prompts=prompts,
                      allow_changed_data=allow_changed_data)  # fmt: skip
    _echo_clip_eval(r, as_json)


def _echo_clip_eval(r: dict, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(r["checked"])
    click.echo(f"{r['data']} {r['split']}: {r['count']} images")
    for way, by_k in r.get("retrieval", {}).items():
        click.echo(f"  {way.replace('_', ' '):<14} " + "  ".join(f"R@{k} {v:.4f}" for k, v in by_k.items()))
    if "zero_shot" in r:
        unseen = f", unseen: {', '.join(r['unseen'])}" if r["unseen"] else ""
        click.echo(f"  zero-shot ({r['prompts']} as prompts{unseen}):")
        for k, v in r["zero_shot"].items():
            click.echo(f"    {k:<20} {v:.4f}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--classes", help="Comma-separated class names to choose among (with IMAGE arguments).")
@click.option("--template", "templates", multiple=True, help="Prompt template with {} for the name (repeatable).")
@click.option("--data", help="Accuracy on a dataset's split instead of predictions on IMAGE files.")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--prompts", type=click.Choice(["names", "descriptions", "both"]), default="names", show_default=True)
@click.option("--unseen", help="With --data: classes to report apart (seen / unseen / generalized).")
@click.option("--top-k", type=int, default=5, show_default=True)
@_ALLOW_CHANGED_DATA
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def zeroshot(
    checkpoint, images, classes, templates, data, data_dir, split, prompts, unseen, top_k, allow_changed_data, as_json
) -> None:
    """Zero-shot classification with a CLIP checkpoint: IMAGE files among --classes, or accuracy on --data."""
    import json

    from vitlab.data.captions import DEFAULT_TEMPLATES
    from vitlab.zeroshot import evaluate_clip, predict_images

    if data:
        if images or classes:
            raise VitlabError("give either --data (accuracy) or --classes with IMAGE files (predictions), not both")
        r = evaluate_clip(checkpoint, data, data_dir=data_dir, split=split, prompts=prompts,
                          templates=templates or None, unseen=unseen, retrieval_too=False,
                          allow_changed_data=allow_changed_data)  # fmt: skip
        _echo_clip_eval(r, as_json)
        return
    names = [c.strip() for c in (classes or "").split(",") if c.strip()]
    if len(names) < 2 or not images:
        raise VitlabError('zero-shot prediction needs --classes "a,b,..." (two or more) and IMAGE files, or --data')
    results = predict_images(checkpoint, list(images), names, templates=templates or DEFAULT_TEMPLATES, top_k=top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for p in r["top"]:
            click.echo(f"  {p['probability']:.4f}  {p['class']}")


# --- segmentation (LSeg) -------------------------------------------------------------------------------------------
SEG_RECIPE = {  # what `vitlab seg train` starts from where neither a recipe nor a flag says (small, for a CPU)
    "model": "vit_tiny_patch16_224",
    "model_args": {"patch_size": 8, "features": 64},  # the default encoder's: 8-pixel patches, a narrow decoder
    "batch_size": 32,
    "lr": 5e-4,
    "epochs": 10,
}


@cli.group()
def seg() -> None:
    """Semantic segmentation (LSeg): a dense ViT with a DPT decoder, scored against label names or fixed classes."""


@seg.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe.")
@click.option(
    "--data",
    default="scenes:fashion-mnist",
    show_default=True,
    help="scenes:fashion-mnist|digits[?count=N&size=PX] or segfolder:DIR (images/, masks/, labels.txt).",
)
@click.option("--image-model", "model", help="Dense encoder: any ViT-style model (default vit_tiny_patch16_224, 8 px "
              "patches); --set model_args.features=... sizes the decoder.")  # fmt: skip
@click.option(
    "--head",
    type=click.Choice(["language", "classifier"]),
    default="language",
    show_default=True,
    help="language: LSeg (label names through a frozen text encoder); classifier: a 1x1 conv to the classes.",
)
@click.option(
    "--text-model", help="language head: all_minilm_l6_v2 (default, packaged) or a `vitlab clip train` checkpoint."
)
@_loop_options
def seg_train(config_file, resume, sets, head, **flags) -> None:
    """Train a segmentation model through the same loop, checkpoints and resume as `vitlab train`."""
    from vitlab.data.segmentation import segmentation_spec
    from vitlab.train import train as run_training
    from vitlab.train.config import merge_options

    overrides = _options(flags, sets)
    overrides["data"] = segmentation_spec(overrides["data"])
    if head == "classifier" and overrides.get("text_model"):
        raise VitlabError("--head classifier has no text encoder; drop --text-model or use --head language")
    overrides["text_model"] = overrides.get("text_model", "all_minilm_l6_v2") if head == "language" else None
    if not config_file and not resume:
        from vitlab.data.sources import describe_dataset

        recipe = dict(SEG_RECIPE)
        if "model" in overrides:  # another encoder keeps its own patches; the decoder stays narrow
            recipe["model_args"] = {"features": 64}
        # the encoder at the data's size: 64 px scenes are not blown up to the variant's 224
        size = describe_dataset(overrides["data"], data_dir=overrides.get("data_dir"))["img_size"]
        recipe["model_args"] = {**recipe["model_args"], "img_size": list(size)}
        overrides = merge_options(recipe, overrides)
    summary = run_training(_train_config(config_file, resume, overrides), resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{summary['model']} ({summary['params']:,} parameters) on {summary['data']}, {summary['steps']} "
                   f"steps; {summary['task']}")  # fmt: skip
        if summary["test_accuracy"] is not None:
            click.echo(f"{summary['test_split']} ({summary['test_count']} images): mIoU {summary['miou']:.4f}  "
                       f"pixel accuracy {summary['pixel_accuracy']:.4f}")  # fmt: skip
        click.echo(f"run directory: {summary['run_dir']} (best checkpoint: checkpoints/best)")


@seg.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--labels", help="Other names for the classes, in order, comma-separated (language head).")
@click.option(
    "--fold", help="Zero-shot fold: classes scored in ['others', class] episodes (default: the run's unseen)."
)
@click.option("--data", help="Other data with the same classes; default: the run's own held-out split.")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@_ALLOW_CHANGED_DATA
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def seg_eval(checkpoint, labels, fold, data, data_dir, split, allow_changed_data, as_json) -> None:
    """mIoU and pixel accuracy of a segmentation checkpoint; writes RUN/eval-SPLIT/seg_metrics.json."""
    import json

    from vitlab.segment import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, labels=labels, fold=fold, data=data, data_dir=data_dir, split=split,
                            allow_changed_data=allow_changed_data)  # fmt: skip
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(r["checked"])
    click.echo(f"{r['data']} {r['split']}: {r['count']} images")
    for key in ("miou", "pixel_accuracy", "fb_iou", "fold_miou"):
        if key in r:
            click.echo(f"  {key:<15} {r[key]:.4f}")
    width = max(len(n) for n in r["iou"])
    for name, iou in r["iou"].items():
        click.echo(f"    IoU {name:<{width}}  {iou:.4f}")
    click.echo(f"written: {r['path']}")


@seg.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("image", type=click.Path())
@click.option("--labels", help='Label names, comma-separated, e.g. "sneaker,bag,grass,other" (any text with LSeg).')
@click.option("--out", help="Picture to write (default IMAGE-seg.png).")
def seg_predict(checkpoint, image, labels, out) -> None:
    """Segment IMAGE among --labels; writes the image, its colour mask and a legend side by side."""
    from vitlab.segment import predict_image

    r = predict_image(checkpoint, image, labels=labels, out=out)
    click.echo(", ".join(f"{name} {share:.1%}" for name, share in r["share"].items()))
    click.echo(f"written: {r['out']}")


# --- vision and language (captioning) ------------------------------------------------------------------------------
@cli.group()
def caption() -> None:
    """Image captioning (Show, Attend and Tell; a transformer decoder): train, score with BLEU/METEOR/ROUGE-L/CIDEr-D
    and attention correctness, caption image files with per-word attention figures."""


@caption.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe.")
@click.option("--image-model", "model", help="The encoder: any registered model (default: chosen for the data).")
@click.option(
    "--decoder",
    type=click.Choice(["soft", "hard", "transformer", "bow"]),
    help="soft / hard attention LSTM (Xu et al. 2015), a transformer decoder, or bow: a bag of the caption's words, "
    "no sentence (Joulin et al. 2016; CLIP's objective comparison) (default soft).",
)
@click.option(
    "--data", help="scenes:fashion-mnist|digits (the default: fashion-mnist), coco-captions:DIR, captions:..."
)
@click.option("--skip-bad-images", is_flag=True, default=None, help="Leave out missing or unreadable images.")
@_loop_options
def caption_train(config_file, resume, sets, decoder, **flags) -> None:
    """Train a captioner through the same loop, checkpoints, --budget and resume as `vitlab train`."""
    from vitlab.train import train as run_training

    overrides = _options(flags, sets)
    caption_args = dict(overrides.pop("caption_args", {}) or {})
    if decoder:
        caption_args["decoder"] = decoder
    elif not resume:  # a resumed run keeps its own decoder (config.yaml)
        caption_args.setdefault("decoder", "soft")
    if caption_args:
        overrides["caption_args"] = caption_args
    if not resume and not config_file:
        overrides.setdefault("data", "scenes:fashion-mnist")  # scenes of digits, saying so, without Fashion-MNIST
    cfg = _train_config(config_file, resume, overrides)
    if not cfg.caption_args:
        raise VitlabError(f"{cfg.out or 'the run'} is not a captioning run (its config.yaml has no caption_args)")
    summary = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_caption_summary(summary)


def _print_caption_summary(s: dict) -> None:
    click.echo(f"{s['task']} on {s['model']} ({s['params']:,} parameters), {s['data']}, {s['steps']} steps")
    if s["test_accuracy"] is not None and "(bow decoder" in s["task"]:  # a bag of words: no sentence to force
        click.echo(
            f"{s['test_split']} ({s['test_count']} images, every caption's bag of words): words recalled "
            f"{s['test_accuracy']:.4f}, loss {s['test_loss']:.4f} nats/caption"
        )
    elif s["test_accuracy"] is not None:
        click.echo(
            f"{s['test_split']} ({s['test_count']} images, every caption teacher-forced): token accuracy "
            f"{s['test_accuracy']:.4f}, loss {s['test_loss']:.4f} nats/token"
        )
    if s.get("zero_shot") is not None:
        click.echo(f"zero-shot accuracy on the {s['test_split']} split's single-item scenes: {s['zero_shot']:.4f}")
    click.echo(f"run directory: {s['run_dir']} (curves.png; best checkpoint: checkpoints/best)")
    click.echo(f"  captions and their scores: vitlab caption eval {s['run_dir']}/checkpoints/best")


@caption.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", help="Default: the run's data, split as the run split it (RUN/split.json).")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--beam", "beam_size", type=int, default=3, show_default=True, help="Beam size (1: greedy).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@_ALLOW_CHANGED_DATA
@click.option("--out", help="Where to write caption_metrics.json and captions.json (default: CHECKPOINT/eval-SPLIT).")
@click.option(
    "--baseline",
    type=click.Choice(["nearest-encoder", "nearest-pixels"]),
    help="Score the nearest training image's caption instead (Devlin et al. 2015), by the checkpoint's encoder "
    "features or by pixels (default out: CHECKPOINT/eval-SPLIT-BASELINE).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def caption_eval(
    checkpoint, data, data_dir, split, beam_size, batch_size, allow_changed_data, out, baseline, as_json
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, against the raw references) and attention correctness
    (scenes) of the captions a checkpoint generates for its run's held-out images."""
    import json

    from vitlab.captioning import evaluate_captioner

    r = evaluate_captioner(checkpoint, data, data_dir=data_dir, split=split, beam_size=beam_size,
                           batch_size=batch_size, allow_changed_data=allow_changed_data, out=out,
                           baseline=baseline)  # fmt: skip
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(r["checked"])
    how = f"nearest-neighbour captions ({baseline})" if baseline else f"beam {beam_size}"
    click.echo(f"{r['data']} {split}: {r['count']} images, {how}")
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "attention_correctness"):
        value = r[key]
        click.echo(f"  {key:<22} {'n/a' if value is None else f'{value:.4f}'}")
    if r["unavailable"]:
        click.echo(f"note: BLEU, METEOR, ROUGE-L and CIDEr-D unavailable: {r['unavailable']}")
    if r["attention_correctness"] is None:
        click.echo("  (attention correctness: scenes only, for a decoder with maps and words that name an item)")
    click.echo(f"written: {r['json']}")


@caption.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--beam", "beam_size", type=int, default=3, show_default=True, help="Beam size (1: greedy).")
@click.option("--attention-out", type=click.Path(file_okay=False), help="Write DIR/IMAGE.png: each word's map.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def caption_predict(checkpoint, images, beam_size, attention_out, as_json) -> None:
    """The caption of each image, and with --attention-out where the decoder looked for each word."""
    import json

    from vitlab.captioning import caption_images

    results = caption_images(checkpoint, list(images), beam_size=beam_size, attention_out=attention_out)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        figure = f"  (attention: {r['figure']})" if r["figure"] else ""
        click.echo(f"{r['image']}: {r['caption']}{figure}")


# --- text-to-video retrieval (MMT) -----------------------------------------------------------------------------------
RETRIEVAL_RECIPE = {  # small, for a CPU: MMT's layout at a quarter of its width, the caption encoder frozen
    "model": "mmt",
    "model_args": {"d_model": 128, "depth": 2, "num_heads": 4, "lock_text": True},
    "batch_size": 32,
    "lr": 5e-4,
    "epochs": 10,
}


@cli.group()
def retrieval() -> None:
    """Text-to-video retrieval (MMT): expert feature streams through a transformer, matched to captions."""


@retrieval.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe.")
@click.option(
    "--data",
    default="clips:fashion-mnist",
    show_default=True,
    help="clips:fashion-mnist|digits[?count=N&size=PX&seed=S] or videofeatures:DIR (vitlab data clips).",
)
@click.option("--text-model", help="Caption encoder (default all_minilm_l6_v2, the packaged MiniLM).")
@click.option("--tune-text", is_flag=True, default=None, help="Fine-tune the caption encoder (default: frozen).")
@click.option("--loss", type=click.Choice(["max_margin", "infonce"]), help="Ranking loss (default max_margin, 0.05).")
@click.option("--experts", help="The experts the model sees, comma-separated (default: all the data's).")
@click.option("--no-temporal", is_flag=True, default=None, help="No temporal embeddings (the order of events unseen).")
@click.option("--aggregation", type=click.Choice(["transformer", "mean"]),
              help="transformer (MMT, default) or mean: the mean-pool + gated-unit baseline (MoEE).")  # fmt: skip
@_loop_options
def retrieval_train(config_file, resume, sets, tune_text, loss, experts, no_temporal, aggregation, **flags) -> None:
    """Train MMT on clips through the same loop, checkpoints and resume as `vitlab train`."""
    from vitlab.train import train as run_training
    from vitlab.train.config import merge_options

    overrides = _options(flags, sets)
    given = {"loss": loss, "experts": experts, "aggregation": aggregation}
    args = {**({"lock_text": False} if tune_text else {}), **({"temporal": False} if no_temporal else {}),
            **{k: v for k, v in given.items() if v}}  # fmt: skip
    overrides = merge_options(overrides, {"model_args": args}) if args else overrides
    overrides.setdefault("text_model", "all_minilm_l6_v2")
    if not config_file and not resume:
        overrides = merge_options(RETRIEVAL_RECIPE, overrides)
    summary = run_training(_train_config(config_file, resume, overrides), resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"MMT ({summary['params']:,} parameters) on {summary['data']}, {summary['steps']} steps")
        if summary["test_accuracy"] is not None:
            _echo_retrieval(summary, f"{summary['test_split']} ({summary['test_count']} clips)")
        click.echo(f"run directory: {summary['run_dir']} (best checkpoint: checkpoints/best)")


def _echo_retrieval(r: dict, what: str) -> None:
    click.echo(f"{what}:")
    for way in ("t2v", "v2t"):
        cells = "  ".join(f"{k} {r[f'{way}_{k}']:.2f}" for k in ("r1", "r5", "r10", "medr", "meanr"))
        click.echo(f"  {way}  {cells}")


@retrieval.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", help="Other clips; default: the run's own held-out split.")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@_ALLOW_CHANGED_DATA
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def retrieval_eval(checkpoint, data, data_dir, split, allow_changed_data, as_json) -> None:
    """R@1/5/10, median and mean rank both ways; writes RUN/eval-SPLIT/retrieval_metrics.json."""
    import json

    from vitlab.retrieval import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, data=data, data_dir=data_dir, split=split,
                            allow_changed_data=allow_changed_data)  # fmt: skip
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(r["checked"])
    _echo_retrieval(r, f"{r['data']} {r['split']} ({r['count']} clips)")
    click.echo(f"written: {r['path']}")


# --- data that ships ---------------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Datasets made from data that ships (scenes with captions, boxes and masks), and any dataset as shards."""


@data.command("scenes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (replaced atomically).")
@click.option("--count", type=int, default=2000, show_default=True, help="How many scenes.")
@click.option("--size", type=int, default=64, show_default=True, help="Side of each image in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed writes the same scenes.")
@click.option(
    "--items",
    type=click.Choice(["fashion-mnist", "digits"]),
    default="fashion-mnist",
    show_default=True,
    help="What the items are (scikit-learn's digits where Fashion-MNIST is not on the machine).",
)
@click.option("--data-dir", help="Where Fashion-MNIST's files are.")
def data_scenes(out, count, size, seed, items, data_dir) -> None:
    """Write scenes as PNG images, COCO captions and instances, and palette-PNG label maps."""
    from vitlab.data.scenes import generate_scenes, write_scene_folder

    scenes = generate_scenes(count=count, size=size, seed=seed, source=items, data_dir=data_dir)
    for note in scenes.notes:
        click.echo(f"note: {note}")
    counts = write_scene_folder(scenes, out)
    click.echo(f"{count} scenes of {scenes.source} items, {size}x{size} px, in {out}: " +
               ", ".join(f"{n} {split}" for split, n in counts.items()))  # fmt: skip
    click.echo("  images/*.png, masks/*.png with labels.txt, " + ", ".join(f"captions_{s}.json" for s in counts)
               + ", " + ", ".join(f"instances_{s}.json" for s in counts))  # fmt: skip
    click.echo(f"  read them with --data coco-captions:{out}")


@data.command("clips")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (replaced atomically).")
@click.option("--count", type=int, default=1000, show_default=True, help="How many clips.")
@click.option("--size", type=int, default=32, show_default=True, help="Frame side in pixels (a multiple of 8).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed writes the same clips.")
@click.option("--items", type=click.Choice(["fashion-mnist", "digits"]), default="fashion-mnist", show_default=True)
@click.option("--data-dir", help="Where Fashion-MNIST's files are.")
@click.option("--encoder", type=click.Path(), help="A vitlab image model: its frozen features are appearance.")
def data_clips(out, count, size, seed, items, data_dir, encoder) -> None:
    """Write synthetic clips as expert features (features/ID.npz) and captions.json (--data videofeatures:OUT)."""
    from vitlab.data.clips import generate_clips, parse_clip_spec, write_clip_folder

    parse_clip_spec(f"clips:{items}?count={count}&size={size}&seed={seed}")  # the same checks as --data clips:
    clips, notes = generate_clips(count=count, size=size, seed=seed, source=items, data_dir=data_dir, encoder=encoder)
    for note in notes:
        click.echo(f"note: {note}")
    counts = write_clip_folder(clips, out)
    click.echo(f"{count} clips in {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    click.echo(f"  features/*.npz (appearance, motion, audio, ocr + _t timestamps), captions.json; "
               f"train with --data videofeatures:{out}")  # fmt: skip


@data.command("shards")
@click.option("--data", "spec", required=True, help="The dataset to write: digits, folder:PATH, captions:FILE, ...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (replaced atomically).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per tar file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Splits the data and orders the train shards.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="As vitlab train splits the data.")
@click.option("--data-dir", help="Where a built-in dataset's files are.")
def data_shards(spec, out, shard_size, seed, val_fraction, data_dir) -> None:
    """Write a dataset's splits as WebDataset tar shards with index.json; train from them with --data wds:OUT."""
    from vitlab.data.shards import write_dataset_shards

    index = write_dataset_shards(spec, out, shard_size=shard_size, seed=seed, val_fraction=val_fraction,
                                 data_dir=data_dir)  # fmt: skip
    for split, info in index["splits"].items():
        click.echo(
            f"{split}: {info['count']} samples in {len(info['shards'])} shard{'s' * (len(info['shards']) != 1)} "
            f"({info['shards'][0]['name']} ...)"
        )
    click.echo(f"  {out}/index.json: {len(index['classes'])} classes, counts, mean / std; train with --data wds:{out}")


def main() -> None:
    cli(prog_name="vitlab")


if __name__ == "__main__":
    main()
