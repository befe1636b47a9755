"""Write part of a dataset as a folder of PNGs, one sub-folder per class: a stand-in for a user's own images, so that
`vitlab train --data folder:PATH` (with no other flag) can be measured on data whose accuracy we know.

    python benchmarks/image_folder.py runs/fm2500 --images 2500      # 2,500 Fashion-MNIST training images

The images are a stratified draw (`stratified_split`) from the dataset's training split, so every class keeps its
share; vitlab's folder loader then carves its own stratified validation and test splits out of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from vitlab.data import build_dataset
from vitlab.data.base import stratified_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder to write (class sub-folders of PNGs)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--images", type=int, default=2500)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    splits = build_dataset(args.data)
    train, names = splits.train, splits.class_names
    if not 0 < args.images <= len(train):
        raise SystemExit(f"--images must be between 1 and the {len(train)} training images of {args.data}")
    _, chosen = stratified_split(train.labels, args.images / len(train), args.seed)
    out = Path(args.out)
    for n, i in enumerate(chosen.tolist()):
        folder = out / names[int(train.labels[i])].replace("/", "-")  # "T-shirt/top" is not a folder name
        folder.mkdir(parents=True, exist_ok=True)
        image = train.images[i]  # uint8 [C, H, W]
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{n:05d}.png")
    print(f"{len(chosen)} images of {args.data} in {out}, {len(set(train.labels[chosen].tolist()))} class folders")


if __name__ == "__main__":
    main()
