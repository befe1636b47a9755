"""The ``vitlab`` command line: a thin layer over library functions that the tests call directly."""

from __future__ import annotations

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


def main() -> None:
    cli(prog_name="vitlab")


if __name__ == "__main__":
    main()
