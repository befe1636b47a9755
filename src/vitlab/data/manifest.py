"""What a run held out: its split manifest, ``RUN/split.json``.

A run's splits are a function of its data and of the options that shape them (`SplitOptions`: the seed,
``val_fraction``, ``skip_bad_images``, ``classes``, ``train_images``, ``test_images``). The manifest records both
ends at the start of a run: the options, a fingerprint of the data as found (`DatasetSplits.data_hash`: file paths
and sizes, or the arrays' bytes) and the members of the validation and test splits (files relative to the data's
root, or the digests of in-memory images; `Dataset.members`), with the size of the training split.

Whoever measures the run later (`vitlab eval`, `vitlab clip eval`) rebuilds the splits with the same options
(`build_run_splits`, the function the trainer builds them with) and checks them against the manifest
(`held_out_split`), so a number is measured on the images the run held out, image for image. Data that changed since
the run would give a different split, which may hold images the run trained on: that is refused in one line, or
evaluated on request with the count of images the run did not hold out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab._io import write_json
from vitlab.data.base import Dataset, DatasetSplits
from vitlab.data.sources import build_dataset
from vitlab.data.subset import ClassSpec, limit_images, subset_classes
from vitlab.errors import VitlabError

MANIFEST_NAME = "split.json"
FORMAT = 1


@dataclass(frozen=True)
class SplitOptions:
    """The options of a run that decide which image lands in which split (their defaults are `TrainConfig`'s)."""

    seed: int = 0
    val_fraction: float = 0.1
    skip_bad_images: bool = False
    classes: ClassSpec | None = None
    train_images: int | None = None
    test_images: int | None = None

    @classmethod
    def of(cls, config: Any) -> SplitOptions:
        """The options of a run's configuration: a `TrainConfig`, its dict, or a manifest's ``options``."""
        get = config.get if isinstance(config, Mapping) else lambda name, default: getattr(config, name, default)
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})


def build_run_splits(
    spec: str,
    options: SplitOptions,
    *,
    data_dir: str | None = None,
    img_size: tuple[int, int] | None = None,
    in_chans: int | None = None,
    download: bool = True,
) -> DatasetSplits:
    """The splits a run trains, selects and tests on: `build_dataset`, then its class subset (`subset_classes`) and
    its split sizes (`limit_images`). The trainer and every evaluation of a run build them here, so they agree."""
    splits = build_dataset(
        spec,
        data_dir=data_dir,
        img_size=img_size,
        in_chans=in_chans,
        seed=options.seed,
        val_fraction=options.val_fraction,
        skip_bad_images=options.skip_bad_images,
        download=download,
    )
    if options.classes is not None:
        splits = subset_classes(splits, options.classes)
    if options.train_images is not None or options.test_images is not None:
        splits = limit_images(splits, train=options.train_images, test=options.test_images, seed=options.seed)
    return splits


# --- the manifest ----------------------------------------------------------------------------------------------------
def _name(member: str, root: str | None) -> str:
    return os.path.relpath(member, root) if root else member


def _record(dataset: Dataset, root: str | None) -> dict[str, Any]:
    return {
        "count": len(dataset),
        "members": [_name(m, root) for m in dataset.members()],
        "labels": dataset.labels.tolist(),
    }


def split_manifest(splits: DatasetSplits, *, data: str, options: SplitOptions) -> dict[str, Any]:
    """The manifest of ``splits``, built from ``data`` with ``options`` (see the module docstring)."""
    root = splits.root
    return {
        "format": FORMAT,
        "data": data,
        "data_hash": splits.data_hash,
        "options": dataclasses.asdict(options),
        "class_names": list(splits.class_names),
        "skipped": [_name(s, root) if root and s.startswith(root + os.sep) else s for s in splits.skipped],
        "train": {"count": len(splits.train)},
        "val": _record(splits.val, root),
        "test": _record(splits.test, root) if splits.test is not None else None,
    }


def write_manifest(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    write_json(path, manifest)  # atomic: a run killed while writing it leaves no torn manifest
    return path


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run directory of a checkpoint that `vitlab train` wrote (``RUN/checkpoints/NAME``), else None."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in ``run_dir``, or None when the run has none (a run from before manifests)."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise VitlabError(f"{path} is a split manifest of format {manifest.get('format')}; this vitlab reads {FORMAT}")
    return manifest


def _same_split(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("data_hash", "train", "val", "test")
    return all(a.get(k) == b.get(k) for k in keys)


def check_resumed_split(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Refuse to resume a run whose data or split changed since it started: its held-out images could then be
    trained on. A run without a manifest (from before manifests) resumes as it did."""
    recorded = read_manifest(run_dir)
    if recorded is not None and not _same_split(recorded, manifest):
        what = "data" if recorded["data_hash"] != manifest["data_hash"] else "split of the data"
        raise VitlabError(
            f"the {what} changed since the run started ({Path(run_dir) / MANIFEST_NAME} records another): resuming "
            "would train on other images than it held out; resume on the data it started with, or start a new run"
        )


def record_split(
    run_dir: Path, splits: DatasetSplits, *, data: str, options: SplitOptions, resume: bool, write: bool
) -> None:
    """The trainer's one call: a fresh run writes its manifest (``write``: the main process), a resumed run checks
    that its data and split are the ones it started with (`check_resumed_split`)."""
    manifest = split_manifest(splits, data=data, options=options)
    if resume:
        check_resumed_split(run_dir, manifest)
    elif write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(run_dir, manifest)


# --- evaluating a run ------------------------------------------------------------------------------------------------
def held_out_split(
    run_dir: Path | None,
    run_config: Mapping[str, Any],
    *,
    split: str,
    data: str | None = None,
    data_dir: str | None = None,
    img_size: tuple[int, int] | None = None,
    in_chans: int | None = None,
    allow_changed_data: bool = False,
) -> tuple[DatasetSplits, Dataset, str]:
    """The ``split`` ("test" or "val") of a run's data, rebuilt with the run's options (``run_config``: its
    `TrainConfig` as a dict) and checked against the manifest in ``run_dir`` (`run_dir_of` a checkpoint); returns
    the splits, the split, and a line saying what was checked.

    ``data`` (default: the run's) may name the same data elsewhere (its fingerprint matches: checked as the run's) or
    other data (evaluated as it splits). Changed data is a `VitlabError` unless ``allow_changed_data``."""
    manifest = read_manifest(run_dir) if run_dir is not None else None
    where = str(run_dir / MANIFEST_NAME) if run_dir is not None else MANIFEST_NAME
    recorded = manifest or {}
    spec = data or recorded.get("data") or run_config.get("data")
    if not spec:
        raise VitlabError("the checkpoint does not say which data its run trained on; pass --data")
    options = SplitOptions.of(recorded.get("options") or run_config)
    splits = build_run_splits(
        spec, options, data_dir=data_dir or run_config.get("data_dir"), img_size=img_size, in_chans=in_chans
    )
    dataset = splits.test if split == "test" else splits.val
    if dataset is None or len(dataset) == 0:
        other = "; use --split val" if split == "test" and len(splits.val) else ""
        raise VitlabError(f"{splits.name} has no {split} split (val_fraction={options.val_fraction}){other}")
    if manifest is None:
        return splits, dataset, f"no split manifest ({where}): the {split} split is rebuilt from the run's options"
    named = data is not None and data != manifest["data"]
    if named and (_kind(data) != _kind(manifest["data"]) or splits.data_hash != manifest["data_hash"]):
        return splits, dataset, f"{spec} is not the data the run was split on ({manifest['data']})"
    if splits.data_hash != manifest["data_hash"]:
        if not allow_changed_data:
            raise VitlabError(
                f"the data changed since the run split it ({spec}: data hash {splits.data_hash[:12]}, the run's "
                f"{manifest['data_hash'][:12]} in {where}): a split of it may hold images the run trained on; "
                "evaluate on the data the run used, or pass --allow-changed-data to evaluate anyway"
            )
        return splits, dataset, _not_held_out(manifest, dataset, splits.root, "the data changed since the run")
    if manifest[split] is None or _record(dataset, splits.root) != manifest[split]:
        if not allow_changed_data:
            raise VitlabError(
                f"the {split} split rebuilt from the run's options is not the one recorded in {where}, although the "
                "data is the same (this vitlab splits it otherwise than the run's did); pass --allow-changed-data to "
                "evaluate anyway"
            )
        return splits, dataset, _not_held_out(manifest, dataset, splits.root, "the split differs from the run's")
    return splits, dataset, f"{split} split: the run's {len(dataset)} held-out images ({where}; the data is unchanged)"


def _kind(spec: str) -> str:
    """``folder``, ``captions`` or a built-in name: data of one kind moved elsewhere keeps its fingerprint
    (fashion-mnist and captions:fashion-mnist share their images, not their splits)."""
    return spec.split(":", 1)[0].lower()


def _not_held_out(manifest: dict[str, Any], dataset: Dataset, root: str | None, why: str) -> str:
    held = {m for split in ("val", "test") if manifest[split] for m in manifest[split]["members"]}
    outside = sum(_name(m, root) not in held for m in dataset.members())
    return (
        f"{why}, evaluating anyway (--allow-changed-data): {outside} of its {len(dataset)} images were not held out "
        "by the run"
    )
