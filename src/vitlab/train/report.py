"""What the user sees: a progress bar on a terminal, plain periodic lines in logs, curves and confusion plots."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitlab._plot import pyplot


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A rich progress bar (loss, accuracy, images/s, ETA) when stderr is a terminal; otherwise a plain line every
    ``log_every`` steps, which reads well in CI logs. Only the main process reports."""

    def __init__(self, total_steps: int, *, enabled: bool = True, log_every: int | None = None) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._fixed_log_every = log_every
        self.log_every = log_every or max(total_steps // 20, 1)
        self._bar = None
        self._start_step = 0
        self._t0 = time.perf_counter()

    def start(self, step: int) -> None:
        self._start_step, self._t0 = step, time.perf_counter()
        if not self.interactive:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=step, stats="")

    def set_total(self, total_steps: int) -> None:
        """A total known only after the first steps (a schedule sized to a time budget)."""
        self.total = total_steps
        self.log_every = self._fixed_log_every or max(total_steps // 20, 1)
        if self._bar is not None:
            self._bar.update(self._task, total=total_steps)

    def update(
        self, step: int, *, epoch: float, loss: float, acc: float | None, images_per_s: float, lr: float
    ) -> None:
        if not self.enabled:
            return
        acc_s = f"acc {acc:.3f} " if acc is not None else ""
        stats = f"epoch {epoch:.2f} loss {loss:.4f} {acc_s}lr {lr:.2e} {images_per_s:,.0f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self._start_step
            eta = (time.perf_counter() - self._t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} {stats} eta {format_duration(eta)}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: list[dict[str, Any]], out: Path) -> None:
    """Loss and accuracy against epochs, train and validation, in one PNG."""
    plt = pyplot()

    if not metrics:
        return
    ep = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [m["train_loss"] for m in metrics], "o-", label="train")
    ax1.plot(ep, [m["val_loss"] for m in metrics], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    if any(m.get("train_acc") is not None for m in metrics):
        ax2.plot(ep, [m.get("train_acc") for m in metrics], "o-", label="train")
    ax2.plot(ep, [m["val_acc"] for m in metrics], "o-", label="val")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], out: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class) with the counts written in the cells."""
    plt = pyplot()

    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    k = len(class_names)
    size = max(5.0, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
