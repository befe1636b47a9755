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
    import yaml

    out = {}
    for item in values:
        if "=" not in item:
            raise VitlabError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--model", help="Model name (vitlab models lists them).")
@click.option("--data", help="digits | fashion-mnist | cifar10 | cifar100 | folder:PATH")
@click.option("--data-dir", help="Where dataset files are (or are downloaded to).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int, help="Images per step per process.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]))
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", type=int)
@click.option("--out", help="Run directory (default runs/DATA-MODEL-TIME).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Skip unreadable images in folder datasets.")
@click.option("--teacher", help="Distil from this checkpoint (vitlab, HF or timm; any architecture).")
@click.option("--distill", type=click.Choice(["hard", "soft"]), help="Distillation kind (default hard).")
@click.option("--distill-tau", type=float, help="Soft distillation temperature (default 3.0).")
@click.option("--distill-alpha", type=float, help="Soft distillation weight of the teacher (default 0.1).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--time-budget", "time_budget_s", type=float, help="Stop after this many seconds of training.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other option of the recipe, e.g. --set ema_decay=0.999 --set model_args='{depth: 6}'.",
)
def train(config_file, resume, sets, compile_, **flags) -> None:
    """Train a model; writes metrics, curves, checkpoints and a summary into the run directory."""
    from vitlab.train import TrainConfig
    from vitlab.train import train as run_training
    from vitlab.train.config import load_yaml

    overrides = {**{k: v for k, v in flags.items() if v is not None}, **_parse_set(sets)}
    if compile_ is not None:
        overrides["compile"] = compile_
    if resume:
        if not overrides.get("out"):
            raise VitlabError("--resume needs --out RUN_DIR, the run to continue")
        from pathlib import Path

        saved = Path(overrides["out"]) / "config.yaml"
        if not saved.exists():
            raise VitlabError(f"nothing to resume: {saved} does not exist")
        # the run's own recipe, so that the resumed steps are the ones it would have taken; flags may extend it
        cfg = TrainConfig.from_dict({**load_yaml(saved), **overrides})
    else:
        cfg = TrainConfig.from_sources(config_file, **overrides)
    summary = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", title_justify="left", show_header=False)
    rows = [
        ("model", f"{s['model']} ({s['params']:,} parameters)"),
        ("data", f"{s['data']}"),
        (f"test accuracy ({s['test_split']})", f"{s['test_accuracy']:.4f} on {s['test_count']} images"),
        ("best val accuracy", f"{s['best_val_accuracy']:.4f} (step {s['best_step']})"),
        ("epochs", f"{s['epochs']}"),
        ("training time", f"{s['train_time_s']:.1f} s at {s['images_per_s'] or 0:,.0f} images/s ({s['precision']})"),
        ("run directory", s["run_dir"]),
        ("curves", f"{s['run_dir']}/curves.png"),
        ("best checkpoint", f"{s['run_dir']}/checkpoints/best"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console(width=120 if not sys.stdout.isatty() else None).print(table)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, help="Dataset to evaluate on (as for train).")
@click.option("--data-dir")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--out", help="Where to write confusion_matrix.png/.json (default: CHECKPOINT/eval-SPLIT).")
def eval_(checkpoint, data, data_dir, split, batch_size, precision, out) -> None:
    """Accuracy, per-class accuracy and a confusion matrix of a checkpoint on a dataset split."""
    from vitlab.predict import evaluate_checkpoint

    r = evaluate_checkpoint(
        checkpoint, data, data_dir=data_dir, split=split, batch_size=batch_size, precision=precision, out=out
    )
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
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", help="Output file (default CHECKPOINT/model.onnx, or NAME.onnx beside a checkpoint file).")
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's recommended one).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest logit difference accepted.")
def export(checkpoint, fmt, out, opset, atol) -> None:
    """Export a checkpoint to ONNX (dynamic batch, class names and normalisation in its metadata), checked
    against eager PyTorch in onnxruntime."""
    from vitlab.export import export_onnx

    r = export_onnx(checkpoint, out, opset=opset, atol=atol)
    click.echo(f"{r['path']}: opset {r['opset']}, largest logit difference to PyTorch {r['max_abs_diff']:.2e}")


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
def serve(checkpoint, runtime, host, port, api_key, max_batch, max_wait_ms, max_upload_mb, max_pixels) -> None:
    """Serve a checkpoint over HTTP: a web page at /, the API at /v1 (docs at /docs)."""
    from vitlab.serve import ServeConfig, run_server

    cfg = ServeConfig(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        api_key=api_key or None,
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


def main() -> None:
    cli(prog_name="vitlab")


if __name__ == "__main__":
    main()
