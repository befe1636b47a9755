"""What the user sees: a progress bar on a terminal, plain periodic lines in logs, curves and confusion plots, and
TensorBoard's event files when the run asks for them."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from vitlab._plot import pyplot
from vitlab.data.images import decode_image
from vitlab.errors import VitlabError


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


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], out: Path | IO[bytes], title: str = "") -> None:
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


# --- TensorBoard -------------------------------------------------------------------------------------------------
# metrics.jsonl's keys as TensorBoard tags: one section per quantity, train and val side by side; other keys (what an
# on_eval hook adds) keep their names
SCALAR_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "lr": "lr",
    "images_per_s": "images_per_s",
    "time_s": "time_s",
    "epoch": "epoch",
}


def summary_writer() -> type:
    """TensorBoard's writer, or a one-line error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
    except ImportError:
        raise VitlabError("--log tensorboard needs the tensorboard package: pip install vitlab[tensorboard]") from None
    return SummaryWriter


class RunLogs:
    """Where a run's evaluations and report go besides metrics.jsonl, which the trainer always writes (--resume and
    the curves read it): TensorBoard event files in RUN/tensorboard/ when ``backends`` names it. Only the main
    process writes (``enabled``); on the others every method does nothing."""

    def __init__(self, backends: Sequence[str], run_dir: Path, *, enabled: bool) -> None:
        # looked up on every rank: a missing package stops all of them before the first step
        self._writer_class = summary_writer() if "tensorboard" in backends else None
        self._dir = run_dir / "tensorboard"
        self._enabled = enabled and self._writer_class is not None
        self._writer = None

    def start(self, step: int) -> None:
        """A new event file for this session of the run, which stands at ``step`` (0, or a resumed checkpoint's)."""
        if self._enabled:
            after_earlier_sessions(self._dir)
            # purge_step: TensorBoard drops what earlier sessions logged from this step on, so the evaluations a killed
            # run logged after its last checkpoint, which this session logs again, are not shown twice
            self._writer = self._writer_class(str(self._dir), purge_step=step + 1)

    def on_eval(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl line as scalars at its step."""
        if self._writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(SCALAR_TAGS.get(key, key), value, record["step"])
        self._writer.flush()  # on disk before the checkpoint that may follow, which a resume starts from

    def on_report(
        self,
        summary: dict[str, Any],
        *,
        curves: Path,
        confusion: torch.Tensor | None = None,
        class_names: Sequence[str] = (),
    ) -> None:
        """The test scores, the curves' PNG, the test split's confusion matrix (when the task has one) as images,
        and the summary as text, at the run's last step."""
        if self._writer is None:
            return
        step = summary["steps"]
        for key in ("test_accuracy", "test_loss"):
            if summary.get(key) is not None:
                self._writer.add_scalar(key.replace("_", "/", 1), summary[key], step)
        if curves.exists():
            self._writer.add_image("curves", decode_image(curves, in_chans=3), step)
        if confusion is not None:
            png = io.BytesIO()
            title = f"{summary['data']} {summary['test_split']}: accuracy {summary['test_accuracy']:.4f}"
            plot_confusion(confusion, class_names, png, title=title)
            self._writer.add_image("confusion_matrix", decode_image(png.getvalue(), in_chans=3), step)
        text = json.dumps(summary, indent=2).splitlines()
        self._writer.add_text("summary", "\n".join(f"    {line}" for line in text), step)  # a Markdown code block
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def after_earlier_sessions(log_dir: Path) -> None:
    """Wait, when needed, until this session's event file will be read after the earlier ones'. TensorBoard reads a
    directory's files in name order, and a name starts with the second its writer opened, then the host and the
    process id: a resume opened within the second the killed session opened in (a session that died young) could
    sort first, and the old session's purge would then hide the new one's steps."""
    opened = [re.match(r"events\.out\.tfevents\.(\d+)\.", f.name) for f in log_dir.glob("events.out.tfevents.*")]
    wait = max((int(m.group(1)) for m in opened if m), default=0) + 1 - time.time()
    if 0 < wait <= 2:  # more: another machine's clock runs ahead of this one, which no short wait mends
        time.sleep(wait)
