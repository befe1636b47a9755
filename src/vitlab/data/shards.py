"""WebDataset shards: any vitlab dataset written as tar files, and a training split that streams from them.

``vitlab data shards --data DATASET --out DIR`` (`write_dataset_shards`) writes the dataset's splits as
``DIR/{train,val,test}-000000.tar, ...`` in the WebDataset layout (what open_clip and timm train from): a sample is
the tar members sharing a key, ``KEY.png`` (or the source file's own ``.jpg`` etc.), ``KEY.cls`` (the class index as
text) and, for a caption set, ``KEY.txt`` (its captions, one a line). ``DIR/index.json`` holds the class names, the
sample count of every split and shard, the training split's mean / std, the image size and channels. Training
samples are written in a random order (``seed``): a streaming shuffle only mixes what its buffer holds, so every
shard must already hold a mix of classes. Images held in memory (digits, Fashion-MNIST, CIFAR) are stored as PNG at
their size; files (a folder, a caption file) are stored as found and decoded to the model's size, as a folder is.

``--data wds:DIR`` trains from them (`build_shard_dataset`), or ``wds:DIR/train-{000000..000009}.tar`` (a brace
range or glob choosing some of the index's training shards). Val and test are decoded into memory; train streams
(`ShardDataset`), every image through `vitlab.data.images.decode_image`, as a folder's are.

The order of a streamed epoch is a pure function of the index's counts, ``(seed, epoch)``, the process count and the
rank; never of ``num_workers`` nor of the batch size:

1. the shards are permuted by ``(seed, epoch)`` (`epoch_order`) and laid end to end: N samples;
2. rank r of W takes samples ``[r N // W, (r + 1) N // W)`` of that sequence: whole shards and at most part of one
   at each end. The ranks partition the epoch (no sample lost or repeated) and hold N // W or N // W + 1 samples;
3. the rank's pieces go round-robin to up to `LANES` lanes, each streaming its pieces through a shuffle buffer of
   `BUFFER` / lanes samples drawn by ``(seed, epoch, rank, lane)``. The buffer is simulated on sample positions
   (`buffer_order`), so the order is known before a byte is read;
4. the rank's stream takes one sample from each lane in turn (a lane that ran out is passed over), cut into batches.

DataLoader workers read lanes (lane l by worker l mod num_workers) and the main process puts their samples into that
order. With ``drop_last=False`` every sample of the epoch is yielded once, by one rank; rank r then has
``ceil(n_r / b)`` batches, the last maybe short. With ``drop_last=True`` (the trainer) every rank yields
``(N // W) // b`` full batches, the same count, as DDP needs its ranks to step together, and leaves out the rest of its
stream: at most b samples per rank and epoch, others each epoch.

Resume is exact: ``start_batch=k`` continues the epoch with the batches the uninterrupted epoch had from batch k on.
The ``k * b`` samples before it are not decoded nor read; a lane reads past their tar headers to its restart point.
"""

from __future__ import annotations

import fnmatch
import io
import itertools
import json
import re
import tarfile
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitlab._io import atomic_directory, write_json
from vitlab.data.base import (
    Dataset,
    DatasetSplits,
    InMemoryDataset,
    _check_sharding,
    derive_seed,
    epoch_order,
    files_hash,
)
from vitlab.data.folder import FolderDataset, _Unreadable
from vitlab.data.images import decode_image
from vitlab.errors import VitlabError

PREFIX = "wds:"
INDEX = "index.json"
FORMAT = 1
SPLITS = ("train", "val", "test")
LANES = 8  # streams a rank reads at once: the most DataLoader workers that have work
BUFFER = 2000  # encoded samples a rank's shuffle buffers hold, shared by its lanes
CHUNK = 16  # samples a worker hands over at once
NOT_IMAGES = ("cls", "txt", "json")  # a sample's other members (WebDataset's names); the one left is its image


# --- writing ---------------------------------------------------------------------------------------------------------
def write_dataset_shards(
    spec: str,
    out: str | Path,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    download: bool = True,
) -> dict[str, Any]:
    """Build the dataset ``spec`` (`vitlab.data.build_dataset`) and write its splits as shards in ``out``
    (`write_shards`); the index. A folder is read at its typical stored size and channels (`describe_dataset`)."""
    from vitlab.data.sources import build_dataset, describe_dataset  # the dispatcher imports this module

    if spec.startswith(PREFIX):
        raise VitlabError(f"{spec} is already shards; to write them again, write their source dataset")
    facts = describe_dataset(spec, data_dir=data_dir, val_fraction=val_fraction)
    splits = build_dataset(spec, data_dir=data_dir, img_size=facts["img_size"], in_chans=facts["in_chans"], seed=seed,
                           val_fraction=val_fraction, download=download)  # fmt: skip
    return write_shards(splits, out, shard_size=shard_size, seed=seed)


def write_shards(splits: DatasetSplits, out: str | Path, *, shard_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``splits`` as WebDataset shards and ``index.json`` in ``out`` (see the module docstring), atomically: a
    temporary folder renamed over ``out`` at the end. Returns the index."""
    if shard_size < 1:
        raise VitlabError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX).is_file())):
        raise VitlabError(f"{out} exists and is not a shard folder (no {INDEX}); choose another --out")
    files = isinstance(_images_of(splits.train), FolderDataset)
    index: dict[str, Any] = {
        "format": FORMAT,
        "source": splits.name,
        "source_hash": splits.data_hash,
        "classes": list(splits.class_names),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "img_size": list(splits.img_size),
        "in_chans": splits.in_chans,
        "stored": "files" if files else "png",  # files: as found, decoded to the model's size; png: at img_size
        "captions": hasattr(splits.train, "captions"),
        "splits": {},
    }
    with atomic_directory(out) as tmp:
        for split in SPLITS:
            dataset = getattr(splits, split)
            if dataset is None or len(dataset) == 0:
                continue
            order = epoch_order(len(dataset), shuffle=split == "train", seed=seed)
            shards = _write_split(_records(dataset, split, order.tolist()), tmp, split, shard_size)
            index["splits"][split] = {"count": len(dataset), "shards": shards}
        write_json(tmp / INDEX, index)
    return index


def _images_of(dataset: Dataset) -> Dataset:
    return dataset.images if hasattr(dataset, "captions") else dataset  # a caption set wraps its images


def _records(dataset: Dataset, split: str, order: list[int]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of the samples at ``order``: the image, its class and its captions."""
    captions = getattr(dataset, "captions", None)
    classes = dataset.classes if captions is not None else dataset.labels  # a caption set's labels are indices
    images = _images_of(dataset)
    if not isinstance(images, InMemoryDataset | FolderDataset):
        raise VitlabError(f"{type(images).__name__} cannot be written as shards (images in memory or files can)")
    for i in order:
        if isinstance(images, FolderDataset):
            path = Path(images.samples[i][0])
            files = {path.suffix.lower()[1:]: path.read_bytes()}
        else:
            files = {"png": _png(images.images[i])}
        if classes is not None:
            files["cls"] = str(int(classes[i])).encode()
        if captions is not None:
            files["txt"] = "\n".join(captions[i]).encode()
        yield f"{split}-{i:08d}", files  # the sample's index in its split: a key holds no dot (WebDataset's rule)


def _png(image: Tensor) -> bytes:
    """PNG bytes of uint8 [C, H, W] (C 1 or 3)."""
    array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()  # (H, W) or (H, W, C)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(records: Iterator[tuple[str, dict[str, bytes]]], folder: Path, split: str, size: int) -> list[dict]:
    shards: list[dict] = []
    while chunk := list(itertools.islice(records, size)):
        name = f"{split}-{len(shards):06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for key, files in chunk:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same data, the same bytes
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": name, "count": len(chunk)})
    return shards


# --- reading a shard -------------------------------------------------------------------------------------------------
def shard_samples(
    path: str | Path, lo: int = 0, hi: int | None = None, *, want=None
) -> Iterator[tuple[int, str, dict]]:
    """(index in the shard, key, {extension: bytes}) of samples ``lo..hi-1`` of a shard, in tar order. Only samples
    for which ``want(index)`` holds have their bytes read (the others yield ``{}``): a tar's contents are seeked past.
    A shard with fewer samples than ``hi`` is a `VitlabError`."""
    n, key, files = -1, None, {}
    # an uncompressed tar: headers are read, contents skipped by seeking; a member's bytes are read where its header
    # says they are (`extractfile` wraps each in a file object, a third of the reading time for small images)
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")  # WebDataset: the key ends at the name's first dot
            if k != key:
                if key is not None and n >= lo:
                    yield n, key, files
                n, key, files = n + 1, k, {}
                if hi is not None and n >= hi:
                    return
            if n >= lo and (want is None or want(n)):
                raw.seek(info.offset_data)
                files[ext.lower()] = raw.read(info.size)
    if key is not None and n >= lo:
        yield n, key, files
    if hi is not None and n + 1 < hi:
        raise VitlabError(f"shard {path} holds {n + 1} samples, its {INDEX} says {hi} or more: write the shards again")


def decode_sample(
    files: dict[str, bytes], where: str, *, in_chans: int, img_size: tuple[int, int]
) -> tuple[Tensor, int]:
    """(uint8 [in_chans, *img_size], class) of one sample's members (`decode_image`, as every image vitlab reads)."""
    image = next((data for ext, data in files.items() if ext not in NOT_IMAGES), None)
    if image is None:
        raise VitlabError(f"{where} has no image (.png, .jpg, ...): write the shards again")
    if "cls" not in files:
        raise VitlabError(f"{where} has no class (.cls): shards without classes cannot train a classifier")
    return decode_image(image, in_chans=in_chans, img_size=img_size, name=where), int(files["cls"])


# --- the order of a streamed epoch -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Samples ``lo..hi-1`` of shard number ``shard``."""

    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Lane:
    """One stream of a rank: its pieces read in turn, emitted in ``order`` (positions in the lane); emissions
    ``first..stop-1`` are the ones this loader yields (a resumed epoch skips the first, a trimmed one the last)."""

    pieces: tuple[Piece, ...]
    order: Tensor  # int64 [n]
    first: int
    stop: int


def rank_pieces(counts: list[int], *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> list[Piece]:
    """The parts of shards that ``rank`` reads in one epoch (steps 1-2 of the module docstring)."""
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    pieces, start = [], 0
    for k in epoch_order(len(counts), shuffle=shuffle, seed=seed, epoch=epoch).tolist():
        a, b = max(lo, start), min(hi, start + counts[k])
        if a < b:
            pieces.append(Piece(k, a - start, b - start))
        start += counts[k]
    return pieces


def buffer_order(n: int, buffer: int, generator: torch.Generator) -> Tensor:
    """The order in which a shuffle buffer of ``buffer`` slots emits a stream of ``n`` samples: they arrive in order;
    once the buffer is full each arrival sends out a slot drawn uniformly, and the last ``buffer`` drain in random
    order. The sample emitted e-th arrived before sample ``e + buffer``, so a reader holds at most ``buffer``."""
    if buffer <= 1:
        return torch.arange(n)
    draws = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    slots: list[int] = []
    out: list[int] = []

    def emit() -> None:
        j = int(draws[len(out)] * len(slots))
        slots[j], slots[-1] = slots[-1], slots[j]
        out.append(slots.pop())

    for i in range(n):
        slots.append(i)
        if len(slots) == buffer:
            emit()
    while slots:
        emit()
    return torch.tensor(out, dtype=torch.int64)


def interleave(sizes: list[int]) -> Tensor:
    """The lane of each sample of a stream that takes one sample from each lane in turn (lanes of ``sizes``)."""
    if not sizes:
        return torch.zeros(0, dtype=torch.int64)
    turn = torch.cat([torch.arange(n) * len(sizes) + lane for lane, n in enumerate(sizes)])  # (turn, lane) as one key
    lanes = torch.cat([torch.full((n,), lane) for lane, n in enumerate(sizes)])
    return lanes[torch.argsort(turn)]


def rank_stream(
    counts: list[int], *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int, skip: int, take: int
) -> tuple[list[Lane], Tensor]:
    """The lanes of ``rank``'s epoch and the lane of each sample it yields: samples ``skip..take-1`` of its stream."""
    pieces = rank_pieces(counts, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    n_lanes = min(LANES, len(pieces))
    parts = [tuple(pieces[lane::n_lanes]) for lane in range(n_lanes)]
    sizes = [sum(p.hi - p.lo for p in part) for part in parts]
    buffer = max(1, BUFFER // max(n_lanes, 1)) if shuffle else 1
    lane_of = interleave(sizes)
    first = torch.bincount(lane_of[:skip], minlength=n_lanes).tolist()
    stop = torch.bincount(lane_of[:take], minlength=n_lanes).tolist()
    lanes = []
    for lane, (part, n) in enumerate(zip(parts, sizes)):
        generator = torch.Generator().manual_seed(derive_seed("shards", seed, epoch, rank, lane))
        lanes.append(Lane(part, buffer_order(n, buffer, generator), first[lane], stop[lane]))
    return lanes, lane_of[skip:take]


# --- streaming -------------------------------------------------------------------------------------------------------
def read_lane(
    lane: Lane, paths: list[str], *, in_chans: int, img_size: tuple[int, int]
) -> Iterator[tuple[Tensor, int]]:
    """The decoded samples a lane yields, in its order; at most the buffer's worth of encoded samples held."""
    wanted = lane.order[lane.first : lane.stop].tolist()
    if not wanted:
        return
    keep, held, e, offset = set(wanted), {}, 0, 0
    for piece in lane.pieces:
        base = offset - piece.lo  # lane position of the shard's sample 0
        wanted_here = lambda n, base=base: n + base in keep
        for n, key, files in shard_samples(paths[piece.shard], piece.lo, piece.hi, want=wanted_here):
            if n + base in keep:
                held[n + base] = (f"{paths[piece.shard]}:{key}", files)
            while e < len(wanted) and wanted[e] in held:
                where, sample = held.pop(wanted[e])
                yield decode_sample(sample, where, in_chans=in_chans, img_size=img_size)
                e += 1
            if e == len(wanted):
                return
        offset += piece.hi - piece.lo


class _LaneReader(IterableDataset):
    """What one DataLoader worker reads: lanes ``worker, worker + workers, ...``, in chunks of `CHUNK` samples taken
    from its lanes in turn, each tagged with its lane; a failure comes back as a message (see `vitlab.data.folder`)."""

    def __init__(self, lanes: list[Lane], paths: list[str], *, in_chans: int, img_size: tuple[int, int]) -> None:
        self.lanes, self.paths, self.in_chans, self.img_size = lanes, paths, in_chans, img_size

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor] | _Unreadable]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = {
            lane: read_lane(self.lanes[lane], self.paths, in_chans=self.in_chans, img_size=self.img_size)
            for lane in range(worker, len(self.lanes), workers)
        }
        try:
            while streams:
                for lane in list(streams):
                    chunk = list(itertools.islice(streams[lane], CHUNK))
                    if len(chunk) < CHUNK:
                        del streams[lane]
                    if chunk:
                        yield lane, torch.stack([x for x, _ in chunk]), torch.tensor([y for _, y in chunk])
        except (VitlabError, OSError, tarfile.TarError) as e:
            yield _Unreadable(str(e) if isinstance(e, VitlabError) else f"cannot read a shard: {e}")


def _merge(chunks: Iterable, lane_of: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of the samples of ``chunks`` (lane, images, labels) put in the order ``lane_of`` says."""
    chunks = iter(chunks)
    pending: dict[int, deque] = defaultdict(deque)
    images, labels = [], []
    for lane in lane_of.tolist():
        while not pending[lane]:
            item = next(chunks, None)
            if item is None:
                raise VitlabError(f"the shards hold fewer samples than their {INDEX} counts: write them again")
            if isinstance(item, _Unreadable):
                raise VitlabError(item.message)
            got, x, y = item
            pending[got].extend(zip(x, y.tolist()))
        x, y = pending[lane].popleft()
        images.append(x)
        labels.append(y)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class ShardDataset(Dataset):
    """A training split streamed from shards (``paths`` with their sample ``counts``); its order is the module
    docstring's. It has no labels in memory: a class subset or fewer training images need shards of their own."""

    def __init__(self, paths: list[str], counts: list[int], *, in_chans: int, img_size: tuple[int, int]) -> None:
        self.paths, self.counts = [str(p) for p in paths], [int(c) for c in counts]
        self.in_chans, self.img_size = in_chans, (int(img_size[0]), int(img_size[1]))

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def labels(self) -> Tensor:  # type: ignore[override]
        raise VitlabError(_NO_SUBSET)

    def subset(self, indices: Tensor, labels: Tensor) -> Dataset:
        raise VitlabError(_NO_SUBSET)

    def num_batches(self, batch_size: int, *, world_size: int = 1, drop_last: bool = False, rank: int = 0) -> int:
        _check_sharding(batch_size, rank, world_size)
        n = len(self)
        if drop_last:  # the same on every rank: the smallest share, N // W
            return (n // world_size) // batch_size
        return -(-((rank + 1) * n // world_size - rank * n // world_size) // batch_size)

    def loader(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's batches of one epoch from batch ``start_batch`` on (see the module docstring)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        n = len(self)
        share = (rank + 1) * n // world_size - rank * n // world_size
        batches = self.num_batches(batch_size, world_size=world_size, drop_last=drop_last, rank=rank)
        take = min(share, batches * batch_size)
        skip = min(start_batch * batch_size, take)
        lanes, lane_of = rank_stream(self.counts, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                                     world_size=world_size, skip=skip, take=take)  # fmt: skip
        reader = _LaneReader(lanes, self.paths, in_chans=self.in_chans, img_size=self.img_size)
        workers = min(num_workers, sum(lane.stop > lane.first for lane in lanes))
        if workers == 0:
            return _merge(iter(reader), lane_of, batch_size)
        # the DataLoader draws its base seed from `generator`, never from the global generator a run checkpoints
        generator = torch.Generator().manual_seed(derive_seed("loader", seed, epoch, rank))
        chunks = DataLoader(reader, batch_size=None, num_workers=workers, generator=generator)
        return _merge(chunks, lane_of, batch_size)


_NO_SUBSET = (
    "a training split streamed from shards has no labels in memory: --classes and train_images cannot choose from it; "
    "write shards of the subset instead (vitlab data shards)"
)


# --- wds:DIR -------------------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero-padded as written); ``{x,y}`` lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = [f"{i:0{len(span[1])}d}" for i in range(int(span[1]), int(span[2]) + 1)] if span else m.group(1).split(",")
    return [p for item in items for p in expand_braces(pattern[: m.start()] + item + pattern[m.end() :])]


def read_index(spec: str) -> tuple[Path, dict[str, Any], list[dict], str | None]:
    """(folder, index, the training shards ``spec`` chooses, a note when it chooses only some)."""
    target = spec[len(PREFIX) :]
    if not target:
        raise VitlabError("wds: needs a folder of shards or a pattern: wds:DIR or wds:DIR/train-{000000..000009}.tar")
    path = Path(target).expanduser()
    root = path if path.is_dir() else path.parent
    if not (root / INDEX).is_file():
        raise VitlabError(
            f"{root} has no {INDEX}: write shards there with `vitlab data shards --data DATASET --out DIR`"
        )
    index = json.loads((root / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise VitlabError(
            f"{root / INDEX} is of format {index.get('format')}; this vitlab reads shards of format {FORMAT}"
        )
    shards = index["splits"].get("train", {}).get("shards", [])
    if path.is_dir():
        return root, index, shards, None
    patterns = expand_braces(path.name)
    chosen = [s for s in shards if any(fnmatch.fnmatchcase(s["name"], p) for p in patterns)]
    if not chosen:
        raise VitlabError(f"{target} matches none of the {len(shards)} training shards in {root / INDEX}")
    images = sum(s["count"] for s in chosen)
    return root, index, chosen, f"training on {len(chosen)} of {len(shards)} training shards ({images} images)"


def shard_facts(spec: str) -> dict[str, Any]:
    """``{train_images, num_classes, img_size, in_chans}`` of shards, from their index alone."""
    _, index, chosen, _ = read_index(spec)
    return {"train_images": sum(s["count"] for s in chosen), "num_classes": len(index["classes"]),
            "img_size": tuple(index["img_size"]), "in_chans": index["in_chans"]}  # fmt: skip


def build_shard_dataset(spec: str, *, img_size: tuple[int, int] | None, in_chans: int | None) -> DatasetSplits:
    """The splits of ``wds:DIR`` (see the module docstring). PNG shards keep their stored size and channels (as their
    in-memory source did); shards of files decode to ``img_size`` / ``in_chans`` (default: the index's)."""
    root, index, chosen, note = read_index(spec)
    if not index["classes"]:
        raise VitlabError(f"{spec} holds captions without classes: vitlab trains classifiers from shards with classes")
    fixed = index["stored"] == "png"
    chans = index["in_chans"] if fixed or in_chans is None else in_chans
    size = tuple(index["img_size"]) if fixed or img_size is None else (int(img_size[0]), int(img_size[1]))
    paths = {split: [root / s["name"] for s in index["splits"].get(split, {}).get("shards", [])] for split in SPLITS}
    train = [root / s["name"] for s in chosen]
    missing = [p for p in [*train, *paths["val"], *paths["test"]] if not p.is_file()]
    if missing:
        raise VitlabError(f"shard {missing[0]} is missing ({len(missing)} of the shards {root / INDEX} lists)")
    return DatasetSplits(
        name=spec,
        train=ShardDataset(train, [s["count"] for s in chosen], in_chans=chans, img_size=size),
        val=_in_memory(paths["val"], in_chans=chans, img_size=size),
        test=_in_memory(paths["test"], in_chans=chans, img_size=size) if paths["test"] else None,
        class_names=list(index["classes"]),
        mean=tuple(index["mean"]),
        std=tuple(index["std"]),
        in_chans=chans,
        img_size=size,
        notes=[note] if note else [],
        data_hash=files_hash(root, [root / INDEX, *train, *paths["val"], *paths["test"]]),
    )


def _in_memory(paths: list[Path], *, in_chans: int, img_size: tuple[int, int]) -> InMemoryDataset:
    """A small split's shards decoded into memory, in their order."""
    samples = [
        decode_sample(files, f"{path}:{key}", in_chans=in_chans, img_size=img_size)
        for path in paths
        for _, key, files in shard_samples(path)
    ]
    if not samples:
        empty = torch.zeros(0, in_chans, *img_size, dtype=torch.uint8)
        return InMemoryDataset(empty, torch.zeros(0, dtype=torch.int64))
    return InMemoryDataset(torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples]))
