"""Sample order shared by every dataset kind, the in-memory dataset, splits and per-channel statistics.

The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of all sample indices, cut into *global*
batches of ``batch_size * world_size`` consecutive indices, of which rank ``r`` takes the slice
``[r * batch_size, (r + 1) * batch_size)``. Two consequences the trainer relies on:

- exact resume: ``start_batch=k`` continues an interrupted epoch at batch ``k`` without loading the batches before it;
- DDP equivalence: one process with batch ``2b`` sees, batch for batch, the union of what two ranks with batch ``b``
  see, so a run's data does not depend on how many processes shared it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


def epoch_order(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> Tensor:
    """The sample indices of one epoch, in the order they are visited (int64 [n])."""
    if not shuffle:
        return torch.arange(n)
    # Mixing seed and epoch through a large prime keeps (seed, epoch) pairs from colliding for any realistic run.
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=generator)


def derive_seed(*parts: object) -> int:
    """A seed (63 bits) for one purpose of one run, e.g. ``derive_seed("loader", seed, epoch, rank)``: streams of
    different parts are unrelated (``seed + rank`` would give rank 1 of seed 0 the stream of rank 0 of seed 1)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _check_sharding(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def epoch_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[Tensor]:
    """The index batches that ``rank`` visits in one epoch, from batch ``start_batch`` on (see the module docstring)."""
    _check_sharding(batch_size, rank, world_size)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    global_batch = batch_size * world_size
    n_global = n // global_batch if drop_last else -(-n // global_batch)
    batches = []
    for g in range(start_batch, n_global):
        lo = g * global_batch + rank * batch_size
        hi = min(lo + batch_size, (g + 1) * global_batch, n)
        if hi > lo:  # in a short last global batch the later ranks may get nothing
            batches.append(order[lo:hi])
    return batches


def count_batches(n: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False, rank: int = 0) -> int:
    """How many batches ``rank`` gets per epoch. Rank 0 gets the most; another rank gets the same or one fewer
    (only when the last global batch is too short to reach it)."""
    _check_sharding(batch_size, rank, world_size)
    global_batch = batch_size * world_size
    full, rest = divmod(n, global_batch)
    return full + int(not drop_last and rest > rank * batch_size)


class Dataset:
    """Base of every dataset kind. The batch order (see the module docstring) lives here, once; a subclass only
    turns index batches into ``(images uint8 [b, C, H, W], labels int64 [b])``."""

    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        raise NotImplementedError

    def _load_batches(
        self, batches: list[Tensor], num_workers: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches at ``batches``; any random draw while loading (a DataLoader's worker seeds) comes from
        ``generator``, never from torch's global one, whose state a run checkpoints."""
        raise NotImplementedError

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
        """Yield this rank's batches of one epoch, from batch ``start_batch`` on. Loading draws from a generator of its
        own, seeded from (seed, epoch, rank): a resumed epoch loads as the uninterrupted one did."""
        batches = epoch_batches(
            len(self),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        generator = torch.Generator().manual_seed(derive_seed("loader", seed, epoch, rank))
        return self._load_batches(batches, num_workers, generator)

    def num_batches(self, batch_size: int, *, world_size: int = 1, drop_last: bool = False, rank: int = 0) -> int:
        return count_batches(len(self), batch_size, world_size=world_size, drop_last=drop_last, rank=rank)

    def subset(self, indices: Tensor, labels: Tensor) -> Dataset:
        """The samples at ``indices`` with new ``labels`` (see `vitlab.data.subset_classes`)."""
        raise NotImplementedError

    def members(self) -> list[str]:
        """One identity per sample, in order: what a run's split manifest lists (`vitlab.data.manifest`). A file's
        path, or the digest of an in-memory image."""
        raise NotImplementedError


class InMemoryDataset(Dataset):
    """Images held in one uint8 tensor; a batch is a single tensor index (no per-sample Python, no DataLoader)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load_batches(
        self, batches: list[Tensor], num_workers: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return ((self.images[idx], self.labels[idx]) for idx in batches)  # num_workers: nothing to parallelise

    def subset(self, indices: Tensor, labels: Tensor) -> InMemoryDataset:
        return InMemoryDataset(self.images[indices], labels)

    def members(self) -> list[str]:
        # an in-memory image has no name: its pixels are its identity (8 bytes tell 10^19 images apart)
        return [hashlib.blake2b(image.numpy().tobytes(), digest_size=8).hexdigest() for image in self.images]


def tensors_hash(*tensors: Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes: the fingerprint of an in-memory dataset's arrays."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def files_hash(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> str:
    """SHA-256 of the sorted paths (relative to ``root``) and sizes of ``files``: the fingerprint of a dataset of
    files, cheap enough for a million of them (one ``stat`` each, no read). Modification times are left out, so a
    copy of the data (``cp -r``, a new machine) keeps its fingerprint; an edit that keeps a file's size is not seen."""
    lines = sorted(f"{os.path.relpath(f, root)}\t{os.stat(f).st_size}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def channel_histograms(images: Tensor) -> Tensor:
    """Per-channel 256-bin histograms (int64 [C, 256]) of uint8 images [N, C, H, W]; they add up across chunks."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])


def stats_from_histograms(hist: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale from `channel_histograms`.

    Histograms make the statistics exact and cheap in memory: CIFAR's training set as float32 would take 600 MB.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    hist = hist.double()
    total = hist.sum(dim=1).clamp_min(1)
    mean = (hist * values).sum(dim=1) / total  # (C,)
    var = (hist * (values - mean[:, None]) ** 2).sum(dim=1) / total
    std = var.sqrt().clamp_min(1e-3)  # a constant channel must not divide by zero in `normalize`
    return tuple(mean.tolist()), tuple(std.tolist())


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W] on the [0, 1] scale."""
    return stats_from_histograms(channel_histograms(images))


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split sample indices into (kept, held out) with ``round(fraction * N)`` held out, in proportion per class.

    Stratifying keeps every class's share the same in both parts, which matters for small or imbalanced datasets.
    Each class holds out ``floor(fraction * n_c)``; the samples left to reach the total go to the classes with the
    largest remainders (ties broken by ``seed``), so small classes do not round the held-out part away. A class
    never loses its last sample. Both index tensors come back sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes]) if len(classes) else torch.zeros(0, dtype=torch.long)
    exact = counts.double() * fraction
    n_held = exact.floor().long().minimum((counts - 1).clamp_min(0))
    missing = round(len(labels) * fraction) - int(n_held.sum())
    tiebreak = torch.randperm(len(classes), generator=generator)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - exact[i].floor()).item(), tiebreak[i].item()))
    for i in order:
        if missing <= 0:
            break
        if n_held[i] + 1 < counts[i]:
            n_held[i] += 1
            missing -= 1
    kept, held = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)]
    for c, k in zip(classes.tolist(), n_held.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def small_class_notes(class_names: list[str], labels: dict[str, Tensor], *, limit: int = 5) -> list[str]:
    """Lines that say what splitting did to small classes: every class in ``class_names`` with no image in one of
    the held-out splits of ``labels`` (``{"train": ..., "val": ..., "test": ...}``), and why."""
    notes = []
    # a held-out split with no image at all (val_fraction=0) is no class's problem: the run says so once
    labels = {split: y for split, y in labels.items() if split == "train" or len(y)}
    for c, name in enumerate(class_names):
        counts = {split: int((y == c).sum()) for split, y in labels.items()}
        missing = [split for split, n in counts.items() if n == 0 and split != "train"]
        if not missing:
            continue
        total = sum(counts.values())
        have = ", ".join(f"{n} {split}" for split, n in counts.items() if n)
        if total < len(labels):  # stratified_split never takes a class's last image: it stays in training
            images = f"{total} image{'s' * (total != 1)}"
            notes.append(f"class {name!r} has {images}: {have}, none in {' or '.join(missing)}")
        else:
            notes.append(
                f"class {name!r} has no image in {' or '.join(missing)} ({total} images: {have}): a held-out split "
                "takes each class's share of it, and this class's rounds to zero"
            )
    if len(notes) > limit:
        notes = [*notes[:limit], f"... and {len(notes) - limit} more classes with no image in a held-out split"]
    return notes


@dataclass
class DatasetSplits:
    """A dataset's splits with what a model needs to know about them.

    ``mean`` / ``std`` are per-channel statistics of the train split on the [0, 1] scale; ``in_chans`` and
    ``img_size`` describe the stored images (the model's input size may differ: see `to_model_input`).
    ``skipped`` lists the unreadable files that ``skip_bad_images=True`` left out; ``notes`` says what splitting did
    to classes too small to share (see `small_class_notes`). ``data_hash`` fingerprints the data as found, before
    any split (`tensors_hash`, `files_hash`), and ``root`` is the directory a dataset of files names its members
    relative to: both go into a run's split manifest (`vitlab.data.manifest`).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None  # None only for a folder dataset without a test/ split
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    img_size: tuple[int, int]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data_hash: str = ""
    root: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
