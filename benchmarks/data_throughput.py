"""Images per second that each kind of vitlab dataset delivers to the training loop: a folder of PNGs decoded on
demand, the same folder decoded once into memory (what `build_dataset` does with a folder that fits: decoded by
threads, cached, then indexed), the same images as an in-memory dataset, and the same files as WebDataset shards
(`vitlab data shards`, streamed by ``wds:``).

One epoch of each, timed from the loader's creation to its last batch (DataLoader workers' start included; "next
epoch": the folder's second epoch, whose persistent workers are already up), with ``shuffle=True`` and drop_last, as
the trainer loads; nothing else runs: no model, no augmentation. The images are
generated (smooth colour gradients with noise, 10 classes) and written once; folder and shards decode the same PNG
bytes through `decode_image`. The folder's one-off decode is timed apart: the first build decodes and writes the cache
(under a temporary ``XDG_CACHE_HOME``), the second reads it.

    python benchmarks/data_throughput.py                 # 12,000 images of 64x64, workers 0 and 2 (~30 s)
    python benchmarks/data_throughput.py --quick         # 800 images of 32x32
    python benchmarks/data_throughput.py --images 20000 --size 128 --workers 0 2 4

Workers are DataLoader processes (the in-memory dataset has none: a batch is one tensor index). The table goes to
stdout as Markdown, with one JSON line per row (``--json FILE``: a file too), after the machine's load average: on a
shared machine other work takes cores from the workers, so read the numbers against it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlab.data import build_dataset
from vitlab.data.base import InMemoryDataset
from vitlab.data.folder import build_folder_dataset
from vitlab.data.shards import write_dataset_shards


def write_folder(root: Path, *, images: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``images`` PNGs of ``size`` x ``size`` RGB in ``classes`` class folders: gradients with noise, so that PNG
    compresses them about as much as it does photos of objects (neither flat nor pure noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    for i in range(images):
        c = i % classes
        angle = rng.uniform(0, np.pi)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (H, W)
        colour = rng.uniform(0, 255, 3)
        pixels = field[..., None] * colour + rng.normal(0, 12, (size, size, 3))  # (H, W, 3)
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i:06d}.png")
    return root


def epoch_rate(dataset, *, batch_size: int, workers: int) -> tuple[float, int]:
    """(images/s, images) of one shuffled epoch of ``dataset``."""
    start = time.perf_counter()
    seen = 0
    for images, _ in dataset.loader(batch_size, shuffle=True, seed=0, epoch=0, drop_last=True, num_workers=workers):
        seen += images.shape[0]
    return seen / (time.perf_counter() - start), seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--quick", action="store_true", help="800 images of 32x32")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.quick:
        args.images, args.size = 800, 32
    torch.set_num_threads(1)  # the main process only stacks batches; the cores are the workers'
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # the run's cache entries go with the folder
        t = time.perf_counter()
        folder = write_folder(Path(tmp) / "images", images=args.images, size=args.size)
        write_dataset_shards(f"folder:{folder}", Path(tmp) / "shards", shard_size=args.shard_size, val_fraction=0.05)
        setup_s = time.perf_counter() - t
        kw = dict(img_size=(args.size, args.size), in_chans=3, val_fraction=0.05)
        folder_kw = dict(seed=0, skip_bad_images=False, **kw)
        on_disk = build_folder_dataset(str(folder), in_memory=False, **folder_kw)
        t = time.perf_counter()
        build_folder_dataset(str(folder), in_memory=True, **folder_kw)  # decodes every split, writes the cache
        decode_s, t = time.perf_counter() - t, time.perf_counter()
        decoded = build_folder_dataset(str(folder), in_memory=True, **folder_kw)  # reads the cache
        cached_s = time.perf_counter() - t
        shards = build_dataset(f"wds:{Path(tmp) / 'shards'}", **kw)
        # the same training images as a built-in dataset holds them
        memory = InMemoryDataset(decoded.train.images.clone(), decoded.train.labels)
        rows = [
            ("in-memory", 0, *epoch_rate(memory, batch_size=args.batch_size, workers=0)),
            ("folder, decoded once", 0, *epoch_rate(decoded.train, batch_size=args.batch_size, workers=0)),
        ]
        for workers in args.workers:
            rows.append(("folder", workers, *epoch_rate(on_disk.train, batch_size=args.batch_size, workers=workers)))
            if workers:  # its workers persist: a second epoch starts none
                rows.append(("folder, next epoch", workers, *epoch_rate(on_disk.train, batch_size=args.batch_size,
                                                                        workers=workers)))  # fmt: skip
            rows.append(("shards (wds:)", workers, *epoch_rate(shards.train, batch_size=args.batch_size,
                                                              workers=workers)))  # fmt: skip

    print(f"{len(on_disk.train)} training images of 3x{args.size}x{args.size} PNG, batch {args.batch_size}, "
          f"shards of {args.shard_size}; writing folder and shards took {setup_s:.1f} s; decoding the folder into "
          f"memory {decode_s:.2f} s once, {cached_s:.2f} s from its cache; {os.cpu_count()} cores, "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print("\n| loader | workers | images/s | images |\n| --- | ---: | ---: | ---: |")
    for name, workers, rate, seen in rows:
        print(f"| {name} | {workers} | {rate:,.0f} | {seen} |")
    setting = {"size": args.size, "batch_size": args.batch_size, "load_before": round(load, 2),
               "decode_s": round(decode_s, 2), "cache_read_s": round(cached_s, 3)}  # fmt: skip
    records = [
        {"loader": name, "workers": workers, "images_per_s": round(rate, 1), "images": seen, **setting}
        for name, workers, rate, seen in rows
    ]
    for record in records:
        print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
