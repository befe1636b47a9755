"""Bag of visual words + SVM, the image classifier of the 2000s that ViT is measured against.

Csurka, Dance, Fan, Willamowski and Bray, "Visual Categorization with Bags of Keypoints", ECCV workshop 2004;
Lazebnik, Schmid and Ponce, "Beyond Bags of Features: Spatial Pyramid Matching", CVPR 2006; Vedaldi and Zisserman,
"Efficient Additive Kernels via Explicit Feature Maps", TPAMI 2012.

1. Dense local descriptors on a regular grid: HOG blocks (Dalal and Triggs, CVPR 2005; 2 x 2 cells of ``cell_size``
   pixels, 9 orientations, one block per cell step), scikit-image's definition computed batched in torch
   (`dense_hog`), or scikit-image's DAISY (Tola, Lepetit and Fua, TPAMI 2010). Images smaller than 32 pixels
   (digits, MNIST) are upscaled to 32 first, so that HOG has cells to work with.
2. A codebook of ``codebook_size`` visual words: k-means (scikit-learn's MiniBatchKMeans) on descriptors sampled
   from the training images.
3. Each image becomes the histogram of its descriptors' nearest words, over the whole image and, with a spatial
   pyramid (``pyramid=(1, 2)``), over each cell of a 2 x 2 grid too; each level is normalised to sum to
   1 / 2^(L - l) (Lazebnik's level weights), then the whole vector to unit L1 or L2 norm.
4. A linear SVM on the histograms, or a chi-squared-kernel SVM (k(x, y) = sum 2 x_i y_i / (x_i + y_i)) through
   the kernel's explicit feature map (scikit-learn's AdditiveChi2Sampler) and a linear SVM, which scales to
   Fashion-MNIST's 54,000 training images where an exact kernel matrix would not. The SVM's C is chosen on the
   val split.

Datasets, splits and seeds are `vitlab train`'s (`vitlab.data.build_dataset`), so the test accuracy is comparable.
`train_bow` writes ``model.joblib`` (atomically) and ``summary.json`` into the run directory.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vitlab._io import write_json
from vitlab.data import build_dataset
from vitlab.data.base import Dataset
from vitlab.errors import VitlabError

MODEL_FILE = "model.joblib"
MIN_SIZE = 32  # images with a shorter side are upscaled to it: HOG needs a few cells per side


@dataclass
class BowConfig:
    descriptor: Literal["hog", "daisy"] = "hog"
    cell_size: int | None = None  # HOG cell / DAISY step in pixels; None: 4 up to 64-pixel images, 8 above
    codebook_size: int = 256
    codebook_samples: int = 200_000  # descriptors k-means is fit on
    pyramid: tuple[int, ...] = (1, 2)  # grid sides of the spatial pyramid levels; (1,) is a plain bag of words
    norm: Literal["l1", "l2"] = "l1"
    svm: Literal["linear", "chi2"] = "chi2"
    C: tuple[float, ...] = (0.1, 1.0, 10.0)  # tried on the val split, best kept
    seed: int = 0
    val_fraction: float = 0.1
    jobs: int = 1  # processes for DAISY descriptors (-1: every core); HOG runs batched in torch
    batch_size: int = 2048

    def check(self) -> None:
        if self.descriptor not in ("hog", "daisy"):
            raise VitlabError(f"descriptor must be 'hog' or 'daisy', got {self.descriptor!r}")
        if self.norm not in ("l1", "l2"):
            raise VitlabError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.svm not in ("linear", "chi2"):
            raise VitlabError(f"svm must be 'linear' or 'chi2', got {self.svm!r}")
        if self.codebook_size < 2:
            raise VitlabError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not self.pyramid or any(int(s) < 1 for s in self.pyramid):
            raise VitlabError(f"pyramid must list grid sides >= 1, e.g. 1,2; got {self.pyramid}")
        if not self.C or any(c <= 0 for c in self.C):
            raise VitlabError(f"C must list positive values, got {self.C}")

    @property
    def name(self) -> str:
        levels = "".join(str(s) for s in self.pyramid)
        return f"bow_{self.descriptor}_k{self.codebook_size}_sp{levels}_{self.svm}"


# --- descriptors ---------------------------------------------------------------------------------------------
def dense_hog(images: torch.Tensor, cell: int, orientations: int = 9) -> torch.Tensor:
    """HOG blocks of 2 x 2 cells at every cell step, for a batch: float [B, C, H, W] -> [B, R, Q, 4 * orientations]
    (R x Q blocks). The same numbers as ``skimage.feature.hog(img, orientations, (cell, cell), (2, 2), "L2-Hys",
    feature_vector=False)`` image by image (a test checks it), computed for the whole batch at once: scikit-image
    normalises its blocks in a Python loop, 5-10 ms for a 32 x 32 image."""
    B, C, H, W = images.shape
    # central differences, zero on the border rows / columns (scikit-image's _hog_channel_gradient)
    g_row = torch.zeros_like(images)
    g_row[..., 1:-1, :] = images[..., 2:, :] - images[..., :-2, :]
    g_col = torch.zeros_like(images)
    g_col[..., :, 1:-1] = images[..., :, 2:] - images[..., :, :-2]
    if C > 1:  # colour: each pixel takes the gradient of its channel with the largest magnitude
        pick = torch.hypot(g_row, g_col).argmax(1, keepdim=True)  # in the input's precision, as scikit-image
        g_row, g_col = g_row.gather(1, pick), g_col.gather(1, pick)
    g_row, g_col = g_row[:, 0].double(), g_col[:, 0].double()  # (B, H, W)
    magnitude = torch.hypot(g_row, g_col)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180)  # unsigned orientation in [0, 180)
    bins = (angle / (180 / orientations)).floor().long().clamp_(max=orientations - 1)
    votes = torch.zeros(B, orientations, H, W, dtype=torch.float64).scatter_(1, bins[:, None], magnitude[:, None])
    R, Q = H // cell, W // cell
    if R < 2 or Q < 2:
        raise VitlabError(f"a {H}x{W} image has fewer than 2 x 2 HOG cells of {cell} pixels; lower the cell size")
    votes = votes[..., : R * cell, : Q * cell]  # the pixels past the last whole cell vote for none
    hist = votes.reshape(B, orientations, R, cell, Q, cell).sum((3, 5)).permute(0, 2, 3, 1)  # (B, R, Q, o)
    blocks = torch.stack(
        [hist[:, :-1, :-1], hist[:, :-1, 1:], hist[:, 1:, :-1], hist[:, 1:, 1:]], 3
    )  # (B, R-1, Q-1, 4, o)
    blocks = blocks.flatten(3)
    eps2 = 1e-5**2  # L2-Hys: L2-normalise, clip at 0.2, L2-normalise again
    blocks = blocks / (blocks.square().sum(-1, keepdim=True) + eps2).sqrt()
    blocks = blocks.clamp(max=0.2)
    return (blocks / (blocks.square().sum(-1, keepdim=True) + eps2).sqrt()).float()


def _daisy_chunk(images: np.ndarray, cell: int) -> np.ndarray:
    from skimage.feature import daisy

    radius = max(2 * cell, 3)
    return np.stack([daisy(img, step=cell, radius=radius, rings=2, histograms=6, orientations=8) for img in images])


def descriptors(images: torch.Tensor, cfg: BowConfig, parallel=None) -> tuple[np.ndarray, np.ndarray]:
    """Dense descriptors of uint8 images [B, C, H, W]: ([B, G, D], their centres (row, col) in [0, 1) [G, 2])."""
    x = images.float() / 255
    H, W = x.shape[-2:]
    if min(H, W) < MIN_SIZE:
        s = MIN_SIZE / min(H, W)
        x = F.interpolate(x, size=(round(H * s), round(W * s)), mode="bilinear", align_corners=False).clamp(0, 1)
    H, W = x.shape[-2:]
    cell = cfg.cell_size or (4 if min(H, W) <= 64 else 8)
    if cfg.descriptor == "hog":
        d = dense_hog(x, cell).numpy()  # (B, R, Q, D)
        cy, cx = (np.arange(d.shape[1]) + 1) * cell, (np.arange(d.shape[2]) + 1) * cell  # block centres
    else:
        from joblib import delayed

        gray = x.mean(1).numpy()  # DAISY is defined on one channel
        pieces = [p for p in np.array_split(gray, max(1, 4 * abs(cfg.jobs))) if len(p)]
        d = np.concatenate(parallel(delayed(_daisy_chunk)(p, cell) for p in pieces))  # (B, R, Q, D)
        radius = max(2 * cell, 3)
        cy, cx = radius + np.arange(d.shape[1]) * cell, radius + np.arange(d.shape[2]) * cell
    centres = np.stack(np.meshgrid(cy / H, cx / W, indexing="ij"), -1).reshape(-1, 2)
    return d.reshape(len(d), -1, d.shape[-1]).astype(np.float32), centres.astype(np.float32)


def extract_descriptors(split: Dataset, cfg: BowConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense descriptors of every image of ``split``: (descriptors [N, G, D], centres [G, 2], labels [N])."""
    from joblib import Parallel

    descs, labels, centres = [], [], None
    with Parallel(n_jobs=cfg.jobs) as parallel:
        for images, y in split.loader(cfg.batch_size, shuffle=False):
            d, centres = descriptors(images, cfg, parallel)
            descs.append(d)
            labels.append(y.numpy())
    return np.concatenate(descs), centres, np.concatenate(labels)


# --- encoding ------------------------------------------------------------------------------------------------
def fit_codebook(descs: np.ndarray, cfg: BowConfig):
    """k-means on at most ``codebook_samples`` descriptors drawn from [N, G, D]."""
    from sklearn.cluster import MiniBatchKMeans

    flat = descs.reshape(-1, descs.shape[-1])
    if len(flat) < cfg.codebook_size:
        raise VitlabError(f"{len(flat)} descriptors cannot make {cfg.codebook_size} words; lower --codebook-size")
    rng = np.random.default_rng(cfg.seed)
    sample = flat[rng.choice(len(flat), min(len(flat), cfg.codebook_samples), replace=False)]
    return MiniBatchKMeans(
        n_clusters=cfg.codebook_size, batch_size=4096, n_init=3, max_iter=100, random_state=cfg.seed
    ).fit(sample)


def encode(descs: np.ndarray, centres: np.ndarray, codebook: np.ndarray, cfg: BowConfig) -> np.ndarray:
    """Spatial-pyramid histograms of visual words [N, K * sum(s^2 for s in pyramid)] (see the module docstring)."""
    N, G, _ = descs.shape
    K = len(codebook)
    words = np.empty((N, G), dtype=np.int64)
    book = torch.from_numpy(codebook).float()
    for lo in range(0, N, 1024):  # nearest word by squared distance, in chunks
        d = torch.from_numpy(descs[lo : lo + 1024]).float()
        dist = (d**2).sum(-1, keepdim=True) - 2 * d @ book.T + (book**2).sum(-1)  # (n, G, K)
        words[lo : lo + 1024] = dist.argmin(-1).numpy()
    levels = []
    L = len(cfg.pyramid)
    for li, side in enumerate(cfg.pyramid):
        cell = np.minimum((centres * side).astype(np.int64), side - 1)  # (G, 2) grid cell of each descriptor
        nb = side * side * K
        bins = (cell[:, 0] * side + cell[:, 1])[None] * K + words + np.arange(N)[:, None] * nb  # (N, G), per image
        hist = np.bincount(bins.ravel(), minlength=N * nb).reshape(N, nb).astype(np.float64)
        weight = 1.0 / 2 ** (L - 1 - li)  # Lazebnik et al.: finer levels count more
        levels.append(weight * hist / np.maximum(hist.sum(1, keepdims=True), 1))
    x = np.concatenate(levels, 1)
    ord_ = 1 if cfg.norm == "l1" else 2
    return (x / np.maximum(np.linalg.norm(x, ord=ord_, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _make_svm(cfg: BowConfig, C: float):
    from sklearn.kernel_approximation import AdditiveChi2Sampler
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=C, max_iter=5000, random_state=cfg.seed)
    return svm if cfg.svm == "linear" else make_pipeline(AdditiveChi2Sampler(sample_steps=2), svm)


# --- train / evaluate ----------------------------------------------------------------------------------------
def default_run_dir(data: str, cfg: BowConfig) -> Path:
    name = data.replace("folder:", "").rstrip("/").split("/")[-1].replace(":", "_")
    return Path("runs") / f"{name}-{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def train_bow(data: str, *, out: str | os.PathLike | None = None, data_dir: str | None = None, **options: Any) -> dict:
    """Train a bag-of-words + SVM classifier on ``data`` (a `vitlab train` dataset name) and test it; writes
    ``model.joblib`` and ``summary.json`` into the run directory and returns the summary."""
    cfg = BowConfig(**{k: tuple(v) if k in ("pyramid", "C") else v for k, v in options.items()})
    cfg.check()
    run_dir = Path(out) if out else default_run_dir(data, cfg)
    if (run_dir / MODEL_FILE).exists():
        raise VitlabError(f"{run_dir} already holds a model; choose another --out")
    splits = build_dataset(data, data_dir=data_dir, seed=cfg.seed, val_fraction=cfg.val_fraction)

    t0 = time.perf_counter()
    descs, centres, y_train = extract_descriptors(splits.train, cfg)
    kmeans = fit_codebook(descs, cfg)
    codebook = kmeans.cluster_centers_.astype(np.float32)
    x_train = encode(descs, centres, codebook, cfg)
    del descs
    v_descs, _, y_val = extract_descriptors(splits.val, cfg)
    x_val = encode(v_descs, centres, codebook, cfg)
    best = None
    for C in cfg.C:  # the SVM's C by val accuracy, as `vitlab train` keeps its best checkpoint by val accuracy
        svm = _make_svm(cfg, C).fit(x_train, y_train)
        acc = float((svm.predict(x_val) == y_val).mean())
        if best is None or acc > best[0]:
            best = (acc, C, svm)
    train_time = time.perf_counter() - t0
    val_acc, best_C, svm = best

    model = {"config": asdict(cfg), "data": splits.name, "class_names": splits.class_names, "codebook": codebook}
    model["centres"], model["svm"] = centres, svm
    _save_atomic(model, run_dir / MODEL_FILE)
    split = splits.test if splits.test is not None else splits.val
    result = _evaluate(model, split, len(splits.class_names))
    svm_params = _svm_params(svm)
    summary = {
        "model": cfg.name,
        "data": splits.name,
        "test_split": "test" if splits.test is not None else "val (no test split)",
        "test_accuracy": result["accuracy"],
        "test_count": result["count"],
        "per_class_accuracy": dict(zip(splits.class_names, result["per_class_accuracy"])),
        "best_val_accuracy": val_acc,
        "svm_C": best_C,
        "train_images": len(y_train),
        "train_time_s": round(train_time, 2),
        "images_per_s": round(len(y_train) / train_time, 1),  # training throughput, as `vitlab train` reports
        "inference_images_per_s": round(result["count"] / result["time_s"], 1),
        "params": int(codebook.size + svm_params),
        "config": asdict(cfg),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def evaluate_bow(run_dir: str | os.PathLike, data: str, *, split: str = "test", data_dir: str | None = None) -> dict:
    """Accuracy of a trained run's model on a split of ``data`` (built with the run's seed and val fraction)."""
    import joblib

    if split not in ("test", "val"):
        raise VitlabError(f"split must be 'test' or 'val', got {split!r}")
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise VitlabError(f"no bag-of-words model at {path}; train one with 'vitlab bow train'")
    model = joblib.load(path)
    cfg = model["config"]
    splits = build_dataset(data, data_dir=data_dir, seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    if splits.class_names != model["class_names"]:
        raise VitlabError(f"{data} has classes {splits.class_names[:5]}..., the model was trained on other classes")
    part = splits.val if split == "val" or splits.test is None else splits.test
    r = _evaluate(model, part, len(splits.class_names))
    return {**r, "data": splits.name, "split": split, "class_names": splits.class_names}


def _evaluate(model: dict, split: Dataset, num_classes: int) -> dict:
    cfg = BowConfig(**{k: tuple(v) if k in ("pyramid", "C") else v for k, v in model["config"].items()})
    t0 = time.perf_counter()
    descs, centres, labels = extract_descriptors(split, cfg)
    pred = model["svm"].predict(encode(descs, centres, model["codebook"], cfg))
    elapsed = time.perf_counter() - t0
    per_class = [
        float((pred[labels == c] == c).mean()) if (labels == c).any() else math.nan for c in range(num_classes)
    ]
    return {
        "accuracy": float((pred == labels).mean()),
        "count": len(labels),
        "per_class_accuracy": per_class,
        "time_s": elapsed,
    }


def _svm_params(svm) -> int:
    linear = svm[-1] if hasattr(svm, "steps") else svm
    return int(linear.coef_.size + linear.intercept_.size)


def _save_atomic(obj: Any, path: Path) -> None:
    """joblib.dump into a temporary file beside ``path``, then one rename: never a half-written model."""
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        joblib.dump(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_ints(text: str | Sequence[int]) -> tuple[int, ...]:
    """'1,2' -> (1, 2) for the CLI's --pyramid."""
    if not isinstance(text, str):
        return tuple(int(t) for t in text)
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise VitlabError(f"expected comma-separated integers such as 1,2; got {text!r}") from None
