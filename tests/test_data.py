from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
from collections import Counter
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import (
    DATASET_NAMES,
    FolderDataset,
    InMemoryDataset,
    build_dataset,
    cifar,
    download,
    fashion_mnist,
    normalize,
    to_float,
    to_model_input,
)
from vitlab.data.base import channel_stats, count_batches
from vitlab.data.idx import read_idx, write_idx
from vitlab.errors import VitlabError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real cache, and none can reach the network."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    return cache / "vitlab"


def indexed_dataset(n: int) -> InMemoryDataset:
    """Sample i has label i and pixel value i, so a batch shows exactly which samples it holds."""
    return InMemoryDataset(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1), torch.arange(n))


def labels_of(dataset, batch_size: int, **kwargs) -> list[list[int]]:
    return [y.tolist() for _, y in dataset.loader(batch_size, **kwargs)]


# ---------------------------------------------------------------------------------------------- batch order


@pytest.mark.parametrize("n", [16, 13, 9, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_one_process_equals_union_of_ranks_batch_for_batch(n: int, drop_last: bool) -> None:
    ds, b = indexed_dataset(n), 2
    kw = dict(shuffle=True, seed=3, epoch=1, drop_last=drop_last)
    single = labels_of(ds, 2 * b, **kw)
    ranks = [labels_of(ds, b, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(single) == len(ranks[0]) >= len(ranks[1])
    for whole, r0, r1 in zip_longest(single, *ranks, fillvalue=[]):
        assert whole == r0 + r1
    for r in range(2):
        assert ds.num_batches(b, world_size=2, drop_last=drop_last, rank=r) == len(ranks[r])
    assert ds.num_batches(b, world_size=2, drop_last=drop_last) == len(ranks[0])
    seen = [i for batch in single for i in batch]
    assert len(seen) == len(set(seen)) == (n // (2 * b) * 2 * b if drop_last else n)
    if drop_last:
        assert all(len(batch) == 2 * b for batch in single)


def test_order_follows_the_documented_permutation() -> None:
    ds = indexed_dataset(10)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1000003 + 2)).tolist()
    assert [i for batch in labels_of(ds, 4, shuffle=True, seed=7, epoch=2) for i in batch] == expected
    assert [i for batch in labels_of(ds, 4, shuffle=False, seed=7, epoch=2) for i in batch] == list(range(10))
    assert labels_of(ds, 3, shuffle=True, seed=7, epoch=2) == labels_of(ds, 3, shuffle=True, seed=7, epoch=2)
    assert labels_of(ds, 3, shuffle=True, seed=7, epoch=2) != labels_of(ds, 3, shuffle=True, seed=7, epoch=3)
    assert labels_of(ds, 3, shuffle=True, seed=7, epoch=2) != labels_of(ds, 3, shuffle=True, seed=8, epoch=2)


@pytest.mark.parametrize("world_size", [1, 3])
def test_start_batch_skips_exactly(world_size: int) -> None:
    ds = indexed_dataset(23)
    for rank in range(world_size):
        kw = dict(shuffle=True, seed=1, epoch=4, rank=rank, world_size=world_size)
        full = labels_of(ds, 2, **kw)
        for k in range(len(full) + 2):
            assert labels_of(ds, 2, start_batch=k, **kw) == full[k:]


def test_in_memory_batches_are_uint8_images_with_int64_labels() -> None:
    ds = indexed_dataset(5)
    x, y = next(iter(ds.loader(4, shuffle=False)))
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 1, 1) and y.dtype == torch.int64
    assert torch.equal(x.flatten().long(), y)
    assert count_batches(0, 4) == 0 and list(indexed_dataset(0).loader(4, shuffle=True)) == []
    with pytest.raises(ValueError):
        ds.loader(2, shuffle=True, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------- digits / names


def rows(dataset: InMemoryDataset) -> Counter:
    return Counter((img.numpy().tobytes(), int(label)) for img, label in zip(dataset.images, dataset.labels))


def test_digits_splits_partition_the_data_and_have_plausible_stats() -> None:
    from sklearn.datasets import load_digits

    s = build_dataset("digits", seed=1)
    assert (s.in_chans, s.img_size, s.class_names) == (1, (8, 8), [str(i) for i in range(10)])
    assert s.train.images.shape[1:] == (1, 8, 8) and s.train.images.dtype == torch.uint8
    assert (len(s.train), len(s.val), len(s.test)) == (1437, 180, 180)
    assert int(s.train.images.max()) == 255  # 16 -> 255
    full = load_digits()
    everything = Counter(
        (np.round(img * 255 / 16).astype(np.uint8).reshape(1, 8, 8).tobytes(), int(t))
        for img, t in zip(full.data, full.target)
    )
    assert rows(s.train) + rows(s.val) + rows(s.test) == everything  # a partition: nothing lost or duplicated
    assert torch.bincount(s.test.labels).min() >= 17  # stratified: every class in the test split
    assert s.mean == pytest.approx(channel_stats(s.train.images)[0])
    assert 0.2 < s.mean[0] < 0.4 and 0.3 < s.std[0] < 0.45
    other = build_dataset("digits", seed=2)
    assert rows(other.test) == rows(s.test)  # the test split does not move with the seed
    assert rows(other.val) != rows(s.val)


def test_unknown_dataset_suggests_the_closest_name() -> None:
    with pytest.raises(VitlabError, match=r"unknown dataset 'fashion_mnist'.*Did you mean: fashion-mnist") as e:
        build_dataset("fashion_mnist")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in DATASET_NAMES)
    with pytest.raises(VitlabError, match="cifar10, cifar100"):
        build_dataset("cifar")
    with pytest.raises(VitlabError, match="val_fraction"):
        build_dataset("digits", val_fraction=0.5)


# ---------------------------------------------------------------------------------------------- IDX


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def test_idx_reader_decodes_hand_written_files(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "images.gz").write_bytes(gzip.compress(idx_bytes(0x08, (2, 3, 4), images.tobytes())))
    assert torch.equal(read_idx(tmp_path / "images.gz"), torch.from_numpy(images))
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints").write_bytes(idx_bytes(0x0C, (3,), ints.tobytes()))
    assert read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]
    write_idx(tmp_path / "round.gz", np.array([[1.5, -2.0]], dtype=np.float64))
    assert read_idx(tmp_path / "round.gz").tolist() == [[1.5, -2.0]]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
        (b"PK\x03\x04" + bytes(20), "not an IDX file"),
        (bytes([0, 0, 0x08, 3, 0, 0]), "truncated"),
        (idx_bytes(0x08, (2, 3), bytes(5)), r"promises shape \(2, 3\) \(6 bytes of data\) but it holds 5"),
        (idx_bytes(0x08, (2, 3), bytes(7)), "holds 7 bytes"),
    ],
)
def test_idx_reader_rejects_corrupt_files(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(VitlabError, match=message) as e:
        read_idx(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist.SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package() -> None:
    s = build_dataset("fashion-mnist", download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.images.shape[1:] == s.test.images.shape[1:] == (1, 28, 28)
    assert (s.in_chans, s.img_size, s.class_names[0], s.class_names[9]) == (1, (28, 28), "T-shirt/top", "Ankle boot")
    assert s.mean[0] == pytest.approx(0.286, abs=0.002)


def fake_fashion(folder: Path, n_train: int = 40, n_test: int = 10) -> dict[str, bytes]:
    """Write four small IDX .gz files; return their gz bytes by file stem."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.arange(n_train, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.arange(n_test, dtype=torch.uint8) % 10,
    }
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}.gz", array.numpy())
    return {stem: (folder / f"{stem}.gz").read_bytes() for stem in arrays}


def trust(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    """Make the fake files' checksums the expected ones."""
    table = {
        stem: (hashlib.md5(gz).hexdigest(), hashlib.sha256(gzip.decompress(gz)).hexdigest())
        for stem, gz in files.items()
    }
    monkeypatch.setattr(fashion_mnist, "FILES", table)


@pytest.fixture
def no_system_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "absent")


def test_fashion_mnist_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_fashion) -> None:
    trust(monkeypatch, fake_fashion(tmp_path / "data" / "fashion-mnist"))
    s = build_dataset("fashion-mnist", data_dir=str(tmp_path / "data"), download=False, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    assert s.train.images.shape[1:] == (1, 28, 28) and s.train.labels.dtype == torch.int64


def test_fashion_mnist_checksum_mismatch(tmp_path: Path, no_system_fashion) -> None:
    fake_fashion(tmp_path)  # valid IDX files, but not the real data
    with pytest.raises(VitlabError, match=r"checksum mismatch for .*-idx\d-ubyte\.gz: its content has sha256") as e:
        build_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)
    assert "\n" not in str(e.value)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path, no_system_fashion) -> None:
    for allow_download in (False, True):  # downloading fails: the network is closed in tests
        with pytest.raises(VitlabError, match=r"apt-get install dataset-fashion-mnist.*--data-dir") as e:
            build_dataset("fashion-mnist", data_dir=str(tmp_path), download=allow_download)
        assert "\n" not in str(e.value)
    assert "network disabled" in str(e.value)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_fashion_mnist_download_verifies_and_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_fashion, _isolated_cache: Path
) -> None:
    files = fake_fashion(tmp_path / "server")
    trust(monkeypatch, files)
    requested = []

    def serve(url: str, timeout: float):
        requested.append(url)
        return FakeResponse(files[url.rsplit("/", 1)[1].removesuffix(".gz")])

    monkeypatch.setattr(download.urllib.request, "urlopen", serve)
    s = build_dataset("fashion-mnist", download=True)
    assert len(s.test) == 10 and len(requested) == 4
    assert requested[0].startswith(fashion_mnist.MIRRORS[0])
    target = _isolated_cache / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{stem}.gz" for stem in files)  # no .part left

    # A corrupt download on every mirror: nothing is written where the next run would find it.
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"not the file"))
    dest = tmp_path / "out" / "x.gz"
    with pytest.raises(VitlabError, match=r"checksum mismatch for http.*checksum mismatch for https"):
        download.download(["http://a/x.gz", "https://b/x.gz"], dest, md5=hashlib.md5(b"x").hexdigest())
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------- CIFAR


def cifar_pickle(obj: dict) -> bytes:
    # The real files were written with numpy 1, whose arrays reference numpy.core; write the same.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def cifar_batch(n: int, label_key: bytes, first_label: int, classes: int) -> tuple[bytes, np.ndarray]:
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0], data[:, 1], data[:, 2] = 10, 20, 30  # R, G, B planes
    data[:, :, 0, 0] = np.arange(n)[:, None]  # top-left pixel tells the samples apart
    labels = [(first_label + i) % classes for i in range(n)]
    return cifar_pickle({b"data": data.reshape(n, 3072), label_key: labels, b"batch_label": b"x"}), data


def fake_cifar(root: Path, name: str) -> Path:
    source = cifar.SOURCES[name]
    folder = root / source.folder
    folder.mkdir(parents=True)
    classes = 10 if name == "cifar10" else 100
    for i, f in enumerate(source.train_files):
        (folder / f).write_bytes(cifar_batch(4, source.label_key, 4 * i, classes)[0])
    (folder / source.test_files[0]).write_bytes(cifar_batch(6, source.label_key, 0, classes)[0])
    names = [f"class{i}".encode() for i in range(classes)]
    (folder / source.meta_file).write_bytes(cifar_pickle({source.names_key: names}))
    return folder


@pytest.mark.parametrize("name, n_train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_from_pickles(tmp_path: Path, name: str, n_train: int) -> None:
    fake_cifar(tmp_path, name)
    s = build_dataset(name, data_dir=str(tmp_path), download=False, val_fraction=0.0)
    assert (len(s.train), len(s.val), len(s.test)) == (n_train, 0, 6)
    assert (s.in_chans, s.img_size, len(s.class_names), s.class_names[3]) == (3, (32, 32), len(s.class_names), "class3")
    assert len(s.class_names) == (10 if name == "cifar10" else 100)
    x, y = next(iter(s.test.loader(6, shuffle=False)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == list(range(6))
    assert x[:, :, 5, 5].tolist() == [[10, 20, 30]] * 6 and x[:, 0, 0, 0].tolist() == list(range(6))


def test_cifar_from_archive_checks_md5_then_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fake_cifar(tmp_path / "src", "cifar10")
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(VitlabError, match=r"checksum mismatch for .*cifar-10-python.tar.gz"):
        build_dataset("cifar10", data_dir=str(data), download=False)
    source = replace(cifar.SOURCES["cifar10"], md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar.SOURCES, "cifar10", source)
    s = build_dataset("cifar10", data_dir=str(data), download=False, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    assert sorted(p.name for p in (data / "cifar-10-batches-py").iterdir()) == sorted(p.name for p in folder.iterdir())


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = fake_cifar(tmp_path, "cifar10")
    (folder / "batches.meta").write_bytes(pickle.dumps(print))  # stands in for os.system & co
    with pytest.raises(VitlabError, match=r"refusing to load builtins.print"):
        build_dataset("cifar10", data_dir=str(tmp_path), download=False)


def test_cifar_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match=r"CIFAR-100 not found.*cifar-100-python.tar.gz.*--data-dir"):
        build_dataset("cifar100", data_dir=str(tmp_path), download=False)


# ---------------------------------------------------------------------------------------------- folders


def save_image(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = np.full((size[1], size[0], channels), value, dtype=np.uint8).squeeze(-1 if channels == 1 else ())
    if mode == "RGBA":
        array[..., 3] = 255
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix.lower()]
    Image.fromarray(array, mode).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))


# Sources of every kind: formats, grayscale / RGB / RGBA, sizes, an upper-case extension.
KINDS = [(".png", "RGB", (20, 12)), (".jpg", "L", (9, 9)), (".webp", "RGBA", (16, 24)), (".BMP", "RGB", (5, 7))]


def make_class(folder: Path, n: int, value: int) -> None:
    for i in range(n):
        ext, mode, size = KINDS[i % len(KINDS)]
        save_image(folder / f"img{i}{ext}", mode, size, value)
    (folder / "notes.txt").write_text("not an image")


def paths(dataset: FolderDataset) -> set[str]:
    return {p for p, _ in dataset.samples}


def test_folder_of_class_folders_is_split_by_seed(tmp_path: Path) -> None:
    make_class(tmp_path / "dog", 10, 200)
    make_class(tmp_path / "cat", 10, 40)
    s = build_dataset(f"folder:{tmp_path}", img_size=(16, 16), seed=0, val_fraction=0.2)
    assert s.class_names == ["cat", "dog"] and (s.in_chans, s.img_size) == (3, (16, 16))
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4)
    assert paths(s.train) | paths(s.val) | paths(s.test) == {str(p) for p in tmp_path.rglob("img*")}
    assert len(paths(s.train) | paths(s.val) | paths(s.test)) == 20
    assert s.test.labels.tolist() == [0, 0, 1, 1]
    x, y = next(iter(s.train.loader(12, shuffle=False)))
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    # JPEG is lossy: values within a few levels of what was saved
    assert torch.allclose(x.float().mean((1, 2, 3)), torch.where(y == 0, 40.0, 200.0), atol=3)
    assert len(s.mean) == 3 and 40 / 255 < s.mean[0] < 200 / 255 and s.std[0] > 0.2
    other = build_dataset(f"folder:{tmp_path}", img_size=(16, 16), seed=1, val_fraction=0.2)
    assert paths(other.test) == paths(s.test) and paths(other.val) != paths(s.val)


def test_folder_with_train_and_val_folders(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2)):
        make_class(tmp_path / split / "b", n, 100)
        make_class(tmp_path / split / "a", n, 50)
    s = build_dataset(f"folder:{tmp_path}", img_size=(8, 10), in_chans=1)
    assert s.test is None and s.class_names == ["a", "b"] and (len(s.train), len(s.val)) == (8, 4)
    assert paths(s.val) == {str(p) for p in (tmp_path / "val").rglob("img*")}
    x, y = next(iter(s.val.loader(4, shuffle=True, num_workers=2)))
    assert x.shape == (4, 1, 8, 10) and sorted(y.tolist()) == [0, 0, 1, 1]
    assert len(s.mean) == 1 and s.mean[0] == pytest.approx(75 / 255, abs=0.01)

    only_train = tmp_path / "only_train"
    make_class(only_train / "train" / "a", 10, 50)
    make_class(only_train / "train" / "b", 10, 50)
    s = build_dataset(f"folder:{only_train}", img_size=(8, 8), val_fraction=0.2)
    assert (len(s.train), len(s.val), s.test) == (16, 4, None) and not paths(s.train) & paths(s.val)

    make_class(tmp_path / "test" / "a", 3, 50)
    assert len(build_dataset(f"folder:{tmp_path}", img_size=(8, 8)).test) == 3
    make_class(tmp_path / "test" / "zebra", 1, 50)
    with pytest.raises(VitlabError, match=r"zebra is a class that .*train does not have"):
        build_dataset(f"folder:{tmp_path}")


def test_folder_loader_follows_the_batch_order(tmp_path: Path) -> None:
    samples = []
    for i in range(7):
        save_image(tmp_path / f"{i}.png", "L", (4, 4), 30 * i)
        samples.append((tmp_path / f"{i}.png", i))
    ds = FolderDataset(samples, in_chans=1, img_size=(4, 4))
    kw = dict(shuffle=True, seed=5, epoch=2)
    single = labels_of(ds, 4, **kw)
    assert single == labels_of(indexed_dataset(7), 4, **kw)
    assert labels_of(ds, 4, num_workers=2, **kw) == single
    ranks = [labels_of(ds, 2, rank=r, world_size=2, **kw) for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip_longest(*ranks, fillvalue=[])] == single
    assert ds.num_batches(2, world_size=2, rank=1) == len(ranks[1]) == 2
    x, y = next(iter(ds.loader(7, shuffle=False)))
    assert x[:, 0, 0, 0].tolist() == [30 * i for i in range(7)]
    # start_batch does not open the skipped files: a corrupt file there goes unnoticed
    (tmp_path / "0.png").write_bytes(b"broken")
    assert labels_of(ds, 4, shuffle=False, start_batch=1) == [[4, 5, 6]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_a_one_line_error_naming_the_file(tmp_path: Path, num_workers: int) -> None:
    save_image(tmp_path / "good.png", "RGB", (6, 6), 10)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = FolderDataset([(tmp_path / "good.png", 0), (tmp_path / "bad.jpg", 1)], img_size=(6, 6))
    with pytest.raises(VitlabError) as e:
        list(ds.loader(1, shuffle=False, num_workers=num_workers))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "bad.jpg") in message and "--skip-bad-images" in message


def test_skip_bad_images_leaves_out_unreadable_files(tmp_path: Path) -> None:
    make_class(tmp_path / "a", 6, 10)
    make_class(tmp_path / "b", 6, 90)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "b" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    assert Image.open(tmp_path / "b" / "truncated.jpg").verify() is None  # verify() alone would let it through
    with pytest.raises(VitlabError, match="--skip-bad-images"):
        build_dataset(f"folder:{tmp_path}", img_size=(8, 8), val_fraction=0.0)
    s = build_dataset(f"folder:{tmp_path}", img_size=(8, 8), val_fraction=0.0, skip_bad_images=True)
    assert sorted(Path(p).name for p in s.skipped) == ["empty.png", "truncated.jpg"]
    assert len(s.train) == 12 and len(list(s.train.loader(5, shuffle=True))) == 3


def test_folder_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="is not a directory"):
        build_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(VitlabError, match="no class folders"):
        build_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(VitlabError, match="empty_class has no images"):
        build_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------------------------------------- model input


def test_to_float_converts_channels_and_size() -> None:
    gray = torch.full((2, 1, 4, 4), 51, dtype=torch.uint8)
    rgb = to_float(gray, 3, (4, 4))
    assert rgb.shape == (2, 3, 4, 4) and torch.allclose(rgb, torch.full_like(rgb, 0.2))
    color = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    color[:, 0], color[:, 1], color[:, 2] = 255, 0, 255
    luma = to_float(color, 1, (2, 2))
    assert luma.shape == (1, 1, 2, 2) and torch.allclose(luma, torch.full_like(luma, 0.299 + 0.114))
    ramp = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8) * 4
    small, big = to_float(ramp, 1, (4, 4)), to_float(ramp, 1, (16, 12))
    assert small.shape == (1, 1, 4, 4) and big.shape == (1, 1, 16, 12)
    assert small.mean().item() == pytest.approx(ramp.float().mean().item() / 255, abs=1e-3)  # antialiased
    assert 0 <= big.min() and big.max() <= 1 and small.dtype == torch.float32


def test_normalize_and_to_model_input() -> None:
    x = torch.tensor([0.2, 0.4, 0.6]).reshape(1, 3, 1, 1)
    assert normalize(x, (0.2, 0.3, 0.4), (0.1, 0.1, 0.2)).flatten().tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert normalize(x, (0.5,), (0.5,)).flatten().tolist() == pytest.approx([-0.6, -0.2, 0.2])
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = to_model_input(images, in_chans=3, img_size=(4, 4), mean=(0.5,), std=(0.25,))
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out, torch.full_like(out, 2.0))
    with pytest.raises(ValueError):
        normalize(x, (0.1, 0.2), (1.0, 1.0))
