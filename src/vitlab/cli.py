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
def predict(checkpoint, images, top_k, as_json) -> None:
    """Top-k classes with probabilities for each image."""
    import json

    from vitlab.predict import predict_files

    results = predict_files(checkpoint, list(images), top_k=top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for p in r["top"]:
            click.echo(f"  {p['probability']:.4f}  {p['class']}")


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


def main() -> None:
    cli(prog_name="vitlab")


if __name__ == "__main__":
    main()
