"""A folder that fits in memory is decoded once, cached, and batched by indexing; a larger one keeps its workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data.folder as folder
from vitlab.data import build_dataset
from vitlab.data.base import epoch_batches
from vitlab.data.folder import FolderDataset, folder_cache_path
from vitlab.data.manifest import SplitOptions, build_run_splits, split_manifest
from vitlab.errors import VitlabError


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's cache directory, where decoded folders go when VITLAB_FOLDER_CACHE is not set."""
    monkeypatch.delenv("VITLAB_FOLDER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def image_folder(root: Path, *, per_class: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files `decode_image` is asked for, in any order (threads decode them)."""
    calls: list[str] = []
    real = folder.decode_image

    def counting(source, **kw):
        calls.append(str(source))
        return real(source, **kw)

    monkeypatch.setattr(folder, "decode_image", counting)
    return calls


def build(root: Path, **kw) -> object:
    return build_dataset(f"folder:{root}", img_size=(8, 8), val_fraction=0.2, **kw)


def arrays(splits) -> list[torch.Tensor]:
    return [s.images for s in (splits.train, splits.val, splits.test)]


def test_the_cache_is_used_again_and_rebuilt_when_a_file_changes(tmp_path, decodes, cache_home) -> None:
    root = image_folder(tmp_path / "data")
    first = build(root)
    assert all(s.images is not None for s in (first.train, first.val, first.test))  # 12 images fit in memory
    assert sorted(decodes) == sorted(str(p) for p in root.rglob("*.png"))  # each file once, the stats included
    [entry] = (cache_home / "vitlab" / "folders").iterdir()  # $XDG_CACHE_HOME/vitlab/folders

    decodes.clear()
    again = build(root)
    assert decodes == [] and all(torch.equal(a, b) for a, b in zip(arrays(first), arrays(again)))

    # the same bytes with a new modification time: decoded again, into a new entry
    f = root / "c1" / "3.png"
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build(root)
    assert len(decodes) == 12 and len(list(entry.parent.iterdir())) == 2

    # new pixels (a new size): the arrays follow the file
    decodes.clear()
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(f)
    changed = build(root)
    assert len(decodes) == 12
    member = next(s for s in (changed.train, changed.val, changed.test) if str(f) in s.members())
    assert (member.images[member.members().index(str(f))] == 7).all()


@pytest.mark.parametrize("damage", [b"", b"not an npy file", "truncate"])
def test_a_corrupt_cache_entry_is_decoded_again(tmp_path, decodes, damage) -> None:
    root = image_folder(tmp_path / "data")
    first = build(root)
    paths = [m for s in (first.train, first.val, first.test) for m in s.members()]
    entry = folder_cache_path(paths, in_chans=3, img_size=(8, 8))
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2] if damage == "truncate" else damage)
    decodes.clear()
    rebuilt = build(root)
    assert len(decodes) == 12 and all(torch.equal(a, b) for a, b in zip(arrays(first), arrays(rebuilt)))
    assert entry.read_bytes() == whole  # replaced by a whole one


def test_in_memory_gives_the_arrays_and_batches_of_a_lazy_build(tmp_path) -> None:
    root = image_folder(tmp_path / "data")
    kw = dict(img_size=(8, 8), in_chans=1, seed=3, val_fraction=0.2, skip_bad_images=False)
    lazy = folder.build_folder_dataset(str(root), in_memory=False, **kw)
    cached = folder.build_folder_dataset(str(root), in_memory=True, **kw)
    cached_again = folder.build_folder_dataset(str(root), in_memory=True, **kw)  # read from the cache
    assert lazy.train.images is None and (lazy.mean, lazy.std) == (cached.mean, cached.std)
    for split in ("train", "val", "test"):
        a, b, c = (getattr(s, split) for s in (lazy, cached, cached_again))
        assert a.members() == b.members() == c.members() and torch.equal(a.labels, b.labels)
        for ds in (b, c):
            for (x, y), (x2, y2) in zip(a.loader(3, shuffle=True, seed=1), ds.loader(3, shuffle=True, seed=1)):
                assert torch.equal(x, x2) and torch.equal(y, y2)


def test_skip_bad_images_gives_the_same_split_manifest_in_memory_or_not(tmp_path, monkeypatch) -> None:
    root = image_folder(tmp_path / "data", per_class=8)
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    spec = f"folder:{root}"
    options = SplitOptions(val_fraction=0.2, skip_bad_images=True)
    memory = build_run_splits(spec, options, img_size=(8, 8))
    monkeypatch.setattr(folder, "IN_MEMORY_BYTES", 0)  # nothing fits: decoded on demand, as before
    lazy = build_run_splits(spec, options, img_size=(8, 8))
    assert memory.train.images is not None and lazy.train.images is None
    assert [Path(p).name for p in memory.skipped] == ["broken.png"]
    assert split_manifest(memory, data=spec, options=options) == split_manifest(lazy, data=spec, options=options)

    # without skipping, both build and both fail only when a batch holds the file, in the same one line
    monkeypatch.undo()
    monkeypatch.setenv("VITLAB_FOLDER_CACHE", str(tmp_path / "cache"))
    errors = []
    for budget in (folder.IN_MEMORY_BYTES, 0):
        monkeypatch.setattr(folder, "IN_MEMORY_BYTES", budget)
        splits = build_run_splits(spec, SplitOptions(val_fraction=0.2), img_size=(8, 8))
        held = next(s for s in (splits.train, splits.val, splits.test) if str(root / "c0/broken.png") in s.members())
        with pytest.raises(VitlabError) as e:
            list(held.loader(1, shuffle=False))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "--skip-bad-images" in errors[0] and "\n" not in errors[0]


def test_lazy_workers_persist_across_epochs_and_keep_the_batch_order(tmp_path) -> None:
    samples = []
    for i in range(10):
        Image.new("L", (4, 4), 20 * i).save(tmp_path / f"{i}.png")
        samples.append((tmp_path / f"{i}.png", i))
    ds = FolderDataset(samples, in_chans=1, img_size=(4, 4))
    pids = []
    for epoch in range(3):
        batches = list(ds.loader(4, shuffle=True, seed=2, epoch=epoch, num_workers=2))
        expected = epoch_batches(10, 4, shuffle=True, seed=2, epoch=epoch)
        assert [y.tolist() for _, y in batches] == [b.tolist() for b in expected]
        assert all(torch.equal(x[:, 0, 0, 0], 20 * y) for x, y in batches)
        pids.append(sorted(w.pid for w in ds._workers[2][0]._iterator._workers))
    # an epoch left half-way (the trainer breaks out at its last step) does not upset the next one
    next(iter(ds.loader(4, shuffle=True, seed=2, epoch=3, num_workers=2)))
    batches = list(ds.loader(4, shuffle=True, seed=2, epoch=4, num_workers=2))
    assert [y.tolist() for _, y in batches] == [b.tolist() for b in epoch_batches(10, 4, shuffle=True, seed=2, epoch=4)]
    assert pids[0] == pids[1] == pids[2]
