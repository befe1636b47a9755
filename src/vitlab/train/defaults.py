"""Defaults that fit the data: with no ``--model`` (``model: auto``), `vitlab train` picks a model and a schedule
from the dataset's size, image size and channels, and says what it chose and why.

The choices are the table `DEFAULTS`, data rather than code: each row names the data it is for, the recipe, the
measurement that justifies it and, while a row is provisional, the run that must confirm it (the zoo,
``benchmarks/zoo.py``, measures every family under the same budget; its winners replace the provisional rows).
The course's lesson drives the shape of the table: on small data a plain ViT trails models with convolutional
inductive biases (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers",
arXiv:2104.05704), so the small-data rows are compact convolution-tokenised transformers. Large schedules are given
as a time budget (``budget_s``, see `vitlab.train.budget`), so they finish in a few minutes on any machine; a tiny
set (`TINY_IMAGES`) trains by epochs and stops early once validation accuracy stops improving (``patience``).

Only what the user did not set comes from the table: a flag or recipe value always wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitlab._registry import get_variant
from vitlab.data.sources import describe_dataset
from vitlab.errors import VitlabError
from vitlab.train.report import format_duration


@dataclass(frozen=True)
class DataDefault:
    """One row: a recipe for datasets whose images are at most ``max_side`` pixels and whose training split holds at
    most ``max_images`` images (None: any number)."""

    name: str
    max_side: int | None
    max_images: int | None
    model: str
    model_args: dict[str, Any]
    settings: dict[str, Any]  # TrainConfig values: the schedule (epochs or budget_s), batch, lr, augmentation
    evidence: str  # the measurement behind the row
    confirm: str | None = None  # provisional until this run confirms it (None: measured)
    notes: list[str] = field(default_factory=list)


# A tiny set (a few hundred images) trains by epochs with an early stop, not for a budget: its epochs take a step or
# two, so a budget of minutes would run hundreds of epochs past the point where validation stopped improving.
TINY_IMAGES = 200
TINY_SCHEDULE = {"epochs": 100, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 1.0, "patience": 10}

# The small-data benchmark's recipe (benchmarks/small_data.py: the zoo's, with label smoothing, Szegedy et al. 2016,
# and an EMA of the weights), under which its family and CNN entries were measured. On ViT-Mini/4 at 5,000 images
# the two alone gave +0.3 points, with SPT and LSA +2.6 (SPT and LSA alone +0.9; docs/small_data.md).
SMALL_DATA_RECIPE = {
    "batch_size": 128,
    "lr": 1e-3,
    "warmup_epochs": 1.0,
    "weight_decay": 0.05,
    "hflip": True,
    "label_smoothing": 0.1,
    "ema_decay": 0.99,
}

DEFAULTS: tuple[DataDefault, ...] = (
    DataDefault(
        name="tiny images, small data",
        max_side=16,
        max_images=5_000,
        model="cct_2_3x2_28",
        model_args={"img_size": 8},
        settings={"epochs": 15, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1.0},
        evidence=(
            "`vitlab train --data digits` (1,437 train images of 8x8, at their own size), seeds 0/1/2: 98.3/98.9/98.9% "
            "test accuracy after 15 epochs in 41/35/29 s of training (fp32, 1 thread of a 2-core AMD EPYC shared "
            "with other jobs, 2026-11-23; seed 0 again at a quieter moment: 98.3% in 10 s; under torchrun with 2 "
            "processes: 98.3%); upsampled to 16 px: 97.2% in 48 s (8 epochs); cvt_7_28 at 28 px: 97.2% in 113 s "
            "(3 epochs); with the fused AdamW step, on the quiet machine with 2 threads: 98.3% in 7.3 s"
        ),
    ),
    DataDefault(
        name="small images, tiny data",
        max_side=32,
        max_images=TINY_IMAGES,
        model="cvt_7_28",
        model_args={},
        settings=TINY_SCHEDULE,
        evidence=(
            "`vitlab train --data folder:DIR` with no other flag on 24 PNGs of 32x32 (3 colour classes with noise; 20 "
            "train / 2 val / 2 test), 2 cores of an AMD EPYC shared with other jobs (load 2.5), 2026-12-01: val "
            "accuracy 100% from the first evaluation, stopped by patience after 11 one-step epochs in 48 s of "
            "training (bf16; fp32: 38 s), test 2/2; before this row, the small-data row's 180 s budget ran 182 "
            "one-step epochs in 200 s (issue 21). The model is the zoo's winner at 1,000 images (docs/zoo.md)"
        ),
    ),
    DataDefault(
        name="small images, small data",
        max_side=32,
        max_images=10_000,
        model="cct_4_3x2_28",
        model_args={},
        settings={"budget_s": 180.0, **SMALL_DATA_RECIPE},
        evidence=(
            "benchmarks/small_data.py (issue 21, docs/small_data.md), 2 cores of an AMD EPYC (Zen 5, bf16), "
            "2026-12-01, one run: with label smoothing 0.1 and an EMA of the weights (0.99), CCT-4/3x2 was the best "
            "transformer at 1,000 Fashion-MNIST images in 2 minutes (79.4%; CvT-7 79.3%, ViT-Mini/4 with SPT, LSA, "
            "label smoothing and EMA 77.9%, plain ViT-Mini/4 71.2%) and at 5,000 in 3 minutes (85.8%; CvT-7 85.2%, "
            "ViT-Mini/4 with the levers 83.6%), at 2.6x CvT-7's images/s; the slim ResNet-18 led both (80.5%, 86.2%); "
            "this row, `vitlab train --data fashion-mnist --set train_images=1000`: 81.0% on the 10,000 test images "
            "in 180 s (185 epochs; the row before, CvT-7: 78.5% in 165 s, fp32)"
        ),
    ),
    DataDefault(
        name="small images",
        max_side=32,
        max_images=None,
        model="cct_4_3x2_28",
        model_args={},
        settings={"budget_s": 300.0, **SMALL_DATA_RECIPE},
        evidence=(
            "benchmarks/small_data.py (issue 21, docs/small_data.md), all 58,800 Fashion-MNIST training images, "
            "10 minutes per entry on 2 cores of an AMD EPYC (Zen 5, bf16), 2026-12-01: CCT-4/3x2 with label smoothing "
            "and EMA 91.5%, the best transformer (ViT-Mini/4 with a conv stem, label smoothing and EMA 90.8%, with "
            "SPT, LSA, label smoothing and EMA 89.2%, plain 88.4%), the slim ResNet-18 93.4%; this row, "
            "`vitlab train --data fashion-mnist` with no "
            "other flag: 90.4% on the 10,000 test images, 2,436 steps (5.8 epochs) in 300 s (the row before, CvT-7: "
            "86.1% in 282 s, fp32 on an AVX2 EPYC)"
        ),
    ),
    DataDefault(
        name="larger images, tiny data",
        max_side=None,
        max_images=TINY_IMAGES,
        model="cct_2_3x2_32",
        model_args={"img_size": 64},
        settings=TINY_SCHEDULE,
        evidence=(
            "`vitlab train --data folder:DIR` with no other flag on 24 PNGs of 96x96 (3 colour classes with noise), "
            "decoded at 64 px, 2 busy cores of an AMD EPYC (load 2.5), 2026-12-01: val accuracy 100% from the "
            "first evaluation, stopped by patience after 11 one-step epochs in 26 s of training (bf16), test 2/2; "
            "the larger-images row would have run a 300 s budget"
        ),
    ),
    DataDefault(
        name="larger images",
        max_side=None,
        max_images=None,
        model="cct_2_3x2_32",
        model_args={"img_size": 64},
        settings={"budget_s": 300.0, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1.0, "hflip": True},
        evidence="photos decoded at 64 px keep a CCT-2 step cheap on a CPU; not yet measured",
        confirm="a folder benchmark of photos (not in the zoo yet)",
    ),
)


def choose_default(facts: dict[str, Any], table: tuple[DataDefault, ...] = DEFAULTS) -> DataDefault:
    """The first row whose limits the data fits (the last row takes anything)."""
    side = max(facts["img_size"])
    for row in table:
        if (row.max_side is None or side <= row.max_side) and (
            row.max_images is None or facts["train_images"] <= row.max_images
        ):
            return row
    return table[-1]


def apply_data_defaults(values: dict[str, Any], given: set[str], *, world_size: int = 1) -> tuple[dict[str, Any], str]:
    """``values`` (TrainConfig fields) completed from the row that fits their data, for every field not in
    ``given``; and the lines that say what was chosen and why. The row's batch is the global batch: under torchrun
    each of ``world_size`` processes takes its share, so the run takes the same steps as on one process. With a text
    tower (CLIP on a caption set) the row chooses the image tower only."""
    data = values.get("data", "fashion-mnist")
    try:
        facts = describe_dataset(data, data_dir=values.get("data_dir"), val_fraction=values.get("val_fraction", 0.1))
    except VitlabError:
        if not values.get("fallback_data"):
            raise
        data = values["fallback_data"]  # what the run will train on instead
        facts = describe_dataset(data, val_fraction=values.get("val_fraction", 0.1))
    if values.get("train_images"):
        facts["train_images"] = min(facts["train_images"], values["train_images"])
    row = choose_default(facts)
    _, kwargs, cfg = get_variant(row.model)
    model_args = dict(row.model_args)
    if facts["in_chans"] != kwargs.get("in_chans", cfg["input_size"][0]):
        model_args["in_chans"] = facts["in_chans"]
    chosen = {"model": row.model, "model_args": {**model_args, **values.get("model_args", {})}}
    # CLIP (a text tower) and captioning: the row chooses the image tower only; its schedule (hflip among it, which
    # would swap a caption's left and right) was measured on classification
    tower_only = bool(values.get("text_model") or values.get("caption_args"))
    settings = {} if tower_only else row.settings
    for key, value in settings.items():
        if key not in given and not (key == "epochs" and "budget_s" in given):
            chosen[key] = value
    if "budget_s" in chosen and "epochs" in given:  # the user's epochs, not the row's budget
        del chosen["budget_s"]
    if "batch_size" in chosen and world_size > 1:
        chosen["batch_size"] = max(1, chosen["batch_size"] // world_size)
    out = {**values, **chosen}
    h, w = facts["img_size"]
    size = model_args.get("img_size", cfg["input_size"][1])
    length = (
        f"a schedule sized to {format_duration(out['budget_s'])}"
        if out.get("budget_s")
        else f"{out.get('epochs')} epochs"
    )
    what = (
        f"the image tower {row.model} at {size} px (the schedule is the recipe's: the row's was measured on "
        "classification)"
        if tower_only
        else f"{row.model} at {size} px, {length}, batch {out.get('batch_size') * world_size}"
        f"{f' ({world_size} processes)' if world_size > 1 else ''}, lr {out.get('lr')}"
    )
    lines = [
        f"no --model: defaults for {data} (about {facts['train_images']:,} training images, {h}x{w}, "
        f"{facts['in_chans']} channel{'s' * (facts['in_chans'] != 1)}) from the row {row.name!r}: {what}",
        f"  why: {row.evidence}",
    ]
    if row.confirm:
        lines.append(f"  provisional until confirmed by: {row.confirm}")
    return out, "\n".join(lines)
