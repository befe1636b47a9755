"""WebDataset shards (`vitlab.data.shards`): `vitlab data shards` writes a dataset in the WebDataset layout, and
``--data wds:DIR`` streams it with every sample seen once per epoch across ranks and workers, an order that does not
depend on the number of workers, and exact resume inside an epoch."""

from __future__ import annotations

import io
import json
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from test_resume_ddp import hooked_vitlab, image_folder, resumed_at
from test_train import cli_args, metrics, weights
from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.data.manifest import SplitOptions, build_run_splits
from vitlab.data.shards import write_dataset_shards
from vitlab.errors import VitlabError

SHARD_SIZE = 100


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Digits written as shards of 100 through the command line."""
    out = tmp_path_factory.mktemp("shards") / "digits"
    r = CliRunner().invoke(cli, ["data", "shards", "--data", "digits", "--out", str(out), "--shard-size", "100"])
    assert r.exit_code == 0, r.output
    return out


def samples(batches) -> Counter:
    """How often each (image bytes, label) came out of ``batches``."""
    return Counter((x.numpy().tobytes(), int(y)) for images, labels in batches for x, y in zip(images, labels))


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard read as any WebDataset reader reads it (tarfile only): members grouped by key, in order."""
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            grouped.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return list(grouped.items())


def test_shards_hold_the_dataset_in_the_webdataset_layout(shards, digits) -> None:
    """Every split's samples, each KEY.png + KEY.cls with the source's pixels and class, in shards of 100 named
    split-NNNNNN.tar; index.json's counts, classes and statistics; and vitlab reads the same data back."""
    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == digits.class_names and index["in_chans"] == 1 and index["img_size"] == [8, 8]
    assert index["mean"] == list(digits.mean) and index["std"] == list(digits.std)
    for split in ("train", "val", "test"):
        source = getattr(digits, split)
        listed = index["splits"][split]
        n = len(source)
        assert listed["count"] == n
        assert [s["count"] for s in listed["shards"]] == [min(SHARD_SIZE, n - k) for k in range(0, n, SHARD_SIZE)]
        seen = []
        for k, shard in enumerate(listed["shards"]):
            assert shard["name"] == f"{split}-{k:06d}.tar"
            members = read_tar(shards / shard["name"])
            assert len(members) == shard["count"]
            for key, files in members:
                assert set(files) == {"png", "cls"} and key.startswith(f"{split}-")
                i = int(key.split("-")[1])  # the sample's index in the source split
                assert np.array_equal(np.array(Image.open(io.BytesIO(files["png"]))), source.images[i, 0].numpy())
                assert int(files["cls"]) == source.labels[i]
                seen.append(i)
        assert sorted(seen) == list(range(n))

    back = build_dataset(f"wds:{shards}")
    for split in ("val", "test"):  # in memory, in their order
        assert torch.equal(getattr(back, split).images, getattr(digits, split).images)
        assert torch.equal(getattr(back, split).labels, getattr(digits, split).labels)
    source = samples([(digits.train.images, digits.train.labels)])
    assert samples(back.train.loader(64, shuffle=True)) == source
    assert (back.mean, back.std, back.class_names) == (digits.mean, digits.std, digits.class_names)


def test_every_sample_is_seen_once_per_epoch_across_ranks_and_workers(shards, digits) -> None:
    """2 ranks x 2 DataLoader workers (ranks simulated in one process): the ranks' batches hold every training sample
    once; with drop_last every rank takes the same number of full batches, as DDP needs, none of them twice."""
    train = build_dataset(f"wds:{shards}").train
    source = samples([(digits.train.images, digits.train.labels)])
    assert len(source) == len(digits.train)  # no two digits alike: a sample seen twice would show
    seen, counts = Counter(), []
    for rank in (0, 1):
        batches = list(train.loader(32, shuffle=True, seed=3, epoch=1, rank=rank, world_size=2, num_workers=2))
        assert len(batches) == train.num_batches(32, world_size=2, rank=rank)
        seen += samples(batches)
        counts.append(sum(len(y) for _, y in batches))
    assert seen == source and abs(counts[0] - counts[1]) <= 1

    # drop_last, 4 ranks: shares of 359, 359, 359 and 360 samples, 8 or 9 batches of 40; every rank takes 8
    kept = []
    for rank in range(4):
        batches = list(train.loader(40, shuffle=True, seed=3, epoch=1, rank=rank, world_size=4, drop_last=True,
                                    num_workers=2))  # fmt: skip
        assert len(batches) == train.num_batches(40, world_size=4, drop_last=True, rank=rank) == 8
        assert all(len(y) == 40 for _, y in batches)
        kept.append(samples(batches))
    assert sum(kept, Counter()) <= source and sum(map(len, kept)) == 4 * 8 * 40  # none twice


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 2 cores here: 3 workers, fine
def test_the_order_depends_on_seed_and_epoch_not_on_workers(shards) -> None:
    train = build_dataset(f"wds:{shards}").train

    def labels(**kw) -> list[int]:
        return [y for _, labels in train.loader(50, shuffle=True, world_size=2, rank=1, **kw) for y in labels.tolist()]

    assert labels(epoch=1, num_workers=0) == labels(epoch=1, num_workers=3)
    assert labels(epoch=1) != labels(epoch=2) and labels(epoch=1) != labels(epoch=1, seed=1)


def test_a_resumed_epoch_continues_with_the_batches_of_the_uninterrupted_one(shards) -> None:
    """start_batch=k yields exactly the uninterrupted epoch's batches from k on, rank 1 of 2 with 2 workers."""
    train = build_dataset(f"wds:{shards}").train
    kw = dict(shuffle=True, seed=5, epoch=2, rank=1, world_size=2, drop_last=True, num_workers=2)
    full = list(train.loader(24, **kw))
    for k in (1, 13, len(full) - 1):
        resumed = list(train.loader(24, start_batch=k, **kw))
        assert len(resumed) == len(full) - k
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(resumed, full[k:]))


def test_a_run_on_shards_killed_inside_an_epoch_resumes_exactly(shards, tmp_path) -> None:
    """`vitlab train --data wds:` (2 workers, augmentation), killed with SIGKILL after step 5 and resumed from its
    checkpoint of step 4, inside the first epoch (start_batch 4): it ends with the weights and metrics of a run that
    never stopped."""
    args = ("--batch-size", "256", "--epochs", "2", "--set", "checkpoint_every=4", "--set", "eval_every=3")
    args += ("--set", "num_workers=2", "--set", "randaugment=[2, 9]", "--data", f"wds:{shards}")
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = CliRunner().invoke(cli, cli_args(full, *args))
    assert r.exit_code == 0, r.output
    summary = json.loads((full / "summary.json").read_text())
    assert summary["train_images"] == 1437 and summary["steps"] == 10 and summary["test_accuracy"] is not None
    code, out = hooked_vitlab(tmp_path, *cli_args(killed, *args), VITLAB_TEST_KILL_AT="5")
    assert code == -signal.SIGKILL, out[-2000:]
    r = CliRunner().invoke(cli, ["train", "--resume", "--out", str(killed)])
    assert r.exit_code == 0, r.output
    assert resumed_at(r.output, killed) == 4  # 5 steps an epoch: the resumed run starts at batch 4 of epoch 0
    assert metrics(killed) == metrics(full)
    a, b = weights(full), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_pattern_chooses_training_shards(shards) -> None:
    splits = build_dataset(f"wds:{shards}/train-{{000000..000004}}.tar")
    assert len(splits.train) == 500 and len(splits.val) == 180
    assert splits.notes == ["training on 5 of 15 training shards (500 images)"]
    assert len(build_dataset(f"wds:{shards}/train-00001*.tar").train) == 437  # shards 10-14


def test_folder_shards_keep_the_files_and_decode_as_the_folder_does(tmp_path) -> None:
    """A folder's files go into the shards as found, and are decoded by the function that decodes the folder: the
    same pixels at any size the model asks for."""
    folder = image_folder(tmp_path / "images", size=12)
    write_dataset_shards(f"folder:{folder}", tmp_path / "shards", shard_size=7)
    members = [m for tar in sorted((tmp_path / "shards").glob("*.tar")) for m in read_tar(tar)]
    files = {p.read_bytes() for p in folder.rglob("*.png")}
    assert len(members) == len(files) and {m["png"] for _, m in members} == files
    kw = dict(img_size=(16, 16), in_chans=3)
    a, b = build_dataset(f"folder:{folder}", **kw), build_dataset(f"wds:{tmp_path / 'shards'}", **kw)
    for split in ("val", "test"):
        (x, y), (u, v) = (
            next(getattr(a, split).loader(100, shuffle=False)),
            next(getattr(b, split).loader(100, shuffle=False)),
        )
        assert torch.equal(x, u) and torch.equal(y, v)
    assert samples(a.train.loader(8, shuffle=False)) == samples(b.train.loader(8, shuffle=True, num_workers=2))


def test_a_caption_set_keeps_its_captions_and_classes(tmp_path) -> None:
    """KEY.txt holds a sample's captions, one a line, and KEY.cls its class where the caption set knows it."""
    source = build_dataset("captions:digits").train
    index = write_dataset_shards("captions:digits", tmp_path / "shards", shard_size=500)
    assert index["captions"] and index["splits"]["train"]["count"] == len(source)
    for key, files in read_tar(tmp_path / "shards" / "train-000000.tar"):
        i = int(key.split("-")[1])
        assert files["txt"].decode().split("\n") == source.captions[i]
        assert int(files["cls"]) == source.classes[i]


def test_mistakes_are_one_line(shards, tmp_path) -> None:
    with pytest.raises(VitlabError, match=r"has no index\.json: write shards there"):
        build_dataset(f"wds:{tmp_path}")
    with pytest.raises(VitlabError, match="matches none of the 15 training shards"):
        build_dataset(f"wds:{shards}/val-*.tar")
    with pytest.raises(VitlabError, match="--classes and train_images cannot choose from it"):
        build_run_splits(f"wds:{shards}", SplitOptions(classes="0-4"))
    (tmp_path / "mine.txt").write_text("not shards")
    with pytest.raises(VitlabError, match="is not a shard folder"):
        write_dataset_shards("digits", tmp_path)
    # a shard cut short: the index promises more samples than the tar holds
    cut = tmp_path / "cut"
    write_dataset_shards("digits", cut, shard_size=500)
    members = read_tar(cut / "train-000001.tar")[:10]
    with tarfile.open(cut / "train-000001.tar", "w") as tar:
        for key, files in members:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(VitlabError, match=r"train-000001.tar holds 10 samples, its index.json says \d+ or more"):
        list(build_dataset(f"wds:{cut}").train.loader(64, shuffle=True, num_workers=2))
