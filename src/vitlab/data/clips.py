"""Synthetic video clips for text-to-video retrieval (MMT), from data that ships, as per-expert feature streams.

A clip (8-16 frames at one frame a second, default 32 px) shows 1-2 of the scenes' items (`vitlab.data.scenes`:
Fashion-MNIST, or scikit-learn's digits) over a background texture; each item appears at some frame, moves left or
right, and may leave before the end. Some clips carry a sound (a tone at each item's entrance, high or low: the
pitch is drawn apart from what is seen) and some an overlaid digit on a run of frames (a sign, read by "OCR").

Each clip is kept as its experts' feature streams with timestamps in seconds, as MMT's experts give them:

* ``appearance`` [T, 192]: each frame average-pooled to 8x8 RGB (cheap pooled pixels: on 2 CPU cores this keeps a
  thousand clips to seconds, and needs no weights, which vitlab does not ship); or, with ``encoder=CHECKPOINT``, a
  frozen vitlab image model's pooled features of each frame [T, D] (``forward_head(..., pre_logits=True)``, at its
  input size, channels and normalisation: `FrameEncoder`), e.g. a classifier trained in a minute with
  ``vitlab train --data fashion-mnist``; a grey model sees the frames' luma, so colour is lost to it;
* ``motion`` [T - 1, 64]: the grey difference of consecutive frames pooled to 8x8, at the midpoint between them;
* ``audio`` [E, 16]: a 16-bin spectrum per entrance, a peak at the tone's pitch; absent ([0, 16]) without sound;
* ``ocr`` [F, 10]: what an OCR system reads on each frame that shows the digit (one-hot); absent without it.

Captions come from a grammar whose words depend on one modality only (the pitch: audio; the digit: OCR; moving
left or right: motion; colour and class: appearance) or on the order of events ("first ..., then ... comes in").

``clips:SOURCE[?count=N&size=PX&seed=S&encoder=CHECKPOINT]`` names them in memory; `write_clip_folder` (``vitlab
data clips``) writes ``DIR/features/ID.npz`` (per expert its array and ``EXPERT_t``, its timestamps) and
``DIR/captions.json`` (each clip's id, split and captions, and each expert's width), the format
``videofeatures:DIR`` reads, users' own features included.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from vitlab.data.base import Dataset, DatasetSplits, derive_seed
from vitlab.errors import VitlabError

PREFIX = "clips:"
FOLDER = "videofeatures:"
EXPERTS = {"appearance": 192, "motion": 64, "audio": 16, "ocr": 10}
SPLITS = ("train", "val", "test")
CAPTIONS_FILE = "captions.json"
_GRID = 8  # appearance and motion are pooled to 8x8
# 3x5 glyphs of the digits 0-9 (rows top to bottom, 3 bits each)
_GLYPHS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
           "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111")  # fmt: skip


@dataclass
class Clip:
    """One clip's expert streams (name -> (features float32 [K, d], timestamps float32 [K])) and captions."""

    id: str
    split: int
    experts: dict[str, tuple[np.ndarray, np.ndarray]]
    captions: list[str]


# --- drawing one clip ----------------------------------------------------------------------------------------------
def _pool(x: np.ndarray) -> np.ndarray:
    """[H, W, ...] -> [8, 8, ...] block means (H and W multiples of 8)."""
    H, W = x.shape[:2]
    return x.reshape(_GRID, H // _GRID, _GRID, W // _GRID, *x.shape[2:]).mean(axis=(1, 3))


def _glyph(d: int, scale: int) -> np.ndarray:
    g = np.array([int(b) for b in _GLYPHS[d]], dtype=bool).reshape(5, 3)
    return g.repeat(scale, 0).repeat(scale, 1)


class FrameEncoder:
    """A frozen vitlab image model as the appearance expert: frames float [T, S, S, 3] in 0-255 -> its pooled
    features [T, D] (``forward_head(forward_features(x), pre_logits=True)``), each frame at the model's input size,
    channels and normalisation, as `vitlab.analysis.probe` extracts features."""

    def __init__(self, checkpoint: str | Path) -> None:
        from vitlab.checkpoint import from_pretrained

        self.model = from_pretrained(checkpoint, map_location="cpu").eval()
        if not hasattr(self.model, "forward_head") or "input_size" not in getattr(self.model, "default_cfg", {}):
            raise VitlabError(f"encoder={checkpoint}: not a vitlab image model (train one with vitlab train)")
        self.width = int(self(np.zeros((1, 8, 8, 3), np.float32)).shape[1])

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        from vitlab.data.transforms import to_model_input

        in_chans, h, w = self.model.default_cfg["input_size"]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2) / 255  # (T, 3, S, S) in [0, 1]
        x = to_model_input(x, in_chans=in_chans, img_size=(h, w), mean=self.model.default_cfg["mean"],
                           std=self.model.default_cfg["std"])  # fmt: skip
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).float().numpy()


def draw_clip(
    rng: np.random.Generator,
    pool: Any,
    *,
    size: int,
    val_fraction: float,
    index: int,
    appearance: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Clip:
    """One clip; ``appearance`` (frames [T, S, S, 3] -> [T, D]) replaces the pooled pixels (it draws nothing, so the
    clip and its captions are the same either way)."""
    from vitlab.data.scenes import _COLOUR_RGB, BACKGROUNDS, COLOURS, _item_pixels, background_image

    u = rng.random()
    split = 2 if u < val_fraction else 1 if u < 2 * val_fraction else 0
    T = int(rng.integers(8, 17))
    bg = int(rng.integers(len(BACKGROUNDS)))
    crop = np.array([rng.integers(0, 512 - size), rng.integers(0, 512 - size), 1, rng.integers(4)])
    base = background_image(bg, crop, size).astype(np.float32)
    frames = np.repeat(base[None], T, axis=0)  # (T, S, S, 3)
    items = []
    for j in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(pool.names)))
        side = int(size * 0.4)
        pixels = _item_pixels(pool.images[rng.choice(pool.choices(k, split == 2))], side)
        colour, direction = int(rng.integers(len(COLOURS))), int(rng.choice([-1, 1]))
        start = 0 if j == 0 else int(rng.integers(2, T // 2 + 1))
        stop = T if rng.random() < 0.5 else int(rng.integers(start + 3, T + 1))
        x0, y = (size - side if direction < 0 else 0), int(rng.integers(0, size - side + 1))
        mask = pixels > 40
        shade = (0.35 + 0.65 * pixels[..., None] / 255) * _COLOUR_RGB[colour]  # (side, side, 3)
        for t in range(start, stop):
            x = int(np.clip(x0 + direction * 2 * (t - start), 0, size - side))
            region = frames[t, y : y + side, x : x + side]
            region[mask] = shade[mask]
        items.append({"class": k, "colour": colour, "direction": direction, "start": start, "stop": stop})
    digit = int(rng.integers(10)) if rng.random() < 0.5 else None
    ocr_frames = []
    if digit is not None:
        a = int(rng.integers(0, T - 2))
        ocr_frames = list(range(a, min(T, a + int(rng.integers(2, 5)))))
        glyph = _glyph(digit, max(size // 16, 1))
        for t in ocr_frames:
            frames[t, 1 : 1 + glyph.shape[0], 1 : 1 + glyph.shape[1]][glyph] = 255.0
    pitch = ("low", "high")[int(rng.integers(2))] if rng.random() < 0.75 else None
    experts = clip_experts(frames, items, digit, ocr_frames, pitch, appearance=appearance)
    captions = clip_captions(rng, items, bg, digit, pitch, pool.names)
    return Clip(f"{index:06d}", split, experts, captions)


def clip_experts(
    frames: np.ndarray, items: list, digit: int | None, ocr_frames: list, pitch: str | None, *,
    appearance: Callable[[np.ndarray], np.ndarray] | None = None
) -> dict:  # fmt: skip
    """The four expert streams of a clip's frames [T, S, S, 3] and events."""
    T = len(frames)
    seconds = np.arange(T, dtype=np.float32)
    if appearance is not None:
        appearance = appearance(frames)  # (T, D): a frozen encoder's features
    else:
        appearance = _pool(np.moveaxis(frames / 255, 0, 2)).reshape(64, T, 3).transpose(1, 0, 2).reshape(T, -1)
    grey = frames.mean(-1) / 255  # (T, S, S)
    motion = _pool(np.moveaxis(grey[1:] - grey[:-1], 0, -1)).reshape(-1, T - 1).T  # (T - 1, 64)
    bins = np.arange(16, dtype=np.float32)
    audio = np.zeros((0, 16), np.float32)
    audio_t = np.zeros(0, np.float32)
    if pitch is not None:  # a tone at each entrance: its pitch is the clip's, its timbre the item's class
        peaks = [(8 if pitch == "high" else 0) + it["class"] % 8 for it in items]
        audio = np.stack([np.exp(-0.5 * (bins - p) ** 2) for p in peaks]).astype(np.float32)
        audio_t = np.array([it["start"] for it in items], np.float32)
    ocr = np.zeros((len(ocr_frames), 10), np.float32)
    if digit is not None:
        ocr[:, digit] = 1.0
    return {"appearance": (appearance.astype(np.float32), seconds), "motion": (motion.astype(np.float32),
            seconds[1:] - 0.5), "audio": (audio, audio_t), "ocr": (ocr, np.array(ocr_frames, np.float32))}  # fmt: skip


def clip_captions(rng: np.random.Generator, items: list, bg: int, digit, pitch, names) -> list[str]:
    """Two captions: appearance and motion of each item in order of entrance, then sound and sign."""
    from vitlab.data.scenes import BACKGROUNDS, COLOURS

    def item(it: dict) -> str:
        way = "left" if it["direction"] < 0 else "right"
        return f"a {COLOURS[it['colour']]} {names[it['class']]} moving {way}"

    out = []
    for frame in range(2):
        parts = [item(items[0])]
        if len(items) > 1:
            parts = [f"first {parts[0]}", f"then {item(items[1])} comes in"] if frame == 0 else \
                [f"{item(items[1])} comes in after {parts[0]}"]  # fmt: skip
        text = ", ".join(parts) + f" on {BACKGROUNDS[bg]}"
        if pitch is not None:
            text += f" with a {pitch} {rng.choice(['tone', 'beep'])}"
        if digit is not None:
            text += f", the sign shows {digit}" if frame == 0 else f" and the number {digit} on screen"
        out.append(text)
    return out


# --- a dataset of feature streams --------------------------------------------------------------------------------
class VideoFeatureDataset(Dataset):
    """Clips' expert streams with captions; a batch is (placeholder images uint8 [b, 1, 1, 1], clip indices [b]):
    the retrieval task (`vitlab.train.retrieval`) gathers the streams with `batch`."""

    def __init__(self, clips: list[Clip], experts: dict[str, int]) -> None:
        self.clips, self.experts = clips, experts
        self.captions = [c.captions for c in clips]
        self.labels = torch.arange(len(clips))

    def __len__(self) -> int:
        return len(self.clips)

    def _load_batches(self, batches, num_workers: int, generator: torch.Generator) -> Iterator:
        return ((torch.zeros(len(idx), 1, 1, 1, dtype=torch.uint8), idx) for idx in batches)

    def members(self) -> list[str]:
        return [c.id for c in self.clips]

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> tuple[dict, dict, dict]:
        """Features [b, K, d], timestamps [b, K] and masks [b, K] per expert, padded to the batch's longest stream."""
        feats, times, masks = {}, {}, {}
        clips = [self.clips[i] for i in idx.tolist()]
        for name, dim in self.experts.items():
            K = max(1, max(len(c.experts[name][0]) for c in clips))
            f, t, m = (
                torch.zeros(len(clips), K, dim),
                torch.zeros(len(clips), K),
                torch.zeros(len(clips), K, dtype=torch.bool),
            )
            for b, c in enumerate(clips):
                x, s = c.experts[name]
                f[b, : len(x)], t[b, : len(x)], m[b, : len(x)] = torch.from_numpy(x), torch.from_numpy(s), True
            feats[name], times[name], masks[name] = f.to(device), t.to(device), m.to(device)
        return feats, times, masks


@dataclass
class VideoSplits(DatasetSplits):
    """Splits of clips; ``experts`` the streams' names and widths."""

    experts: dict[str, int] = field(default_factory=dict)


def _splits(clips: list[Clip], experts: dict[str, int], *, name: str, notes: list[str]) -> VideoSplits:
    parts = {s: VideoFeatureDataset([c for c in clips if c.split == i], experts) for i, s in enumerate(SPLITS)}
    if not len(parts["train"]):
        raise VitlabError(f"{name} has no training clips")
    blob = json.dumps([[c.id, c.split, c.captions] for c in clips]).encode()
    digest = hashlib.sha256(blob + b"".join(a.tobytes() for c in clips for x in c.experts.values() for a in x))
    return VideoSplits(name=name, train=parts["train"], val=parts["val"], test=parts["test"], class_names=[],
                       mean=(0.0,), std=(1.0,), in_chans=1, img_size=(1, 1), notes=notes,
                       data_hash=digest.hexdigest(), experts=dict(experts))  # fmt: skip


def parse_clip_spec(spec: str) -> tuple[str, dict[str, Any]]:
    source, _, query = spec[len(PREFIX) :].partition("?")
    options: dict[str, Any] = {"count": 1000, "size": 32, "seed": 0, "encoder": None}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "encoder" and value:
            options[key] = value
            continue
        if key not in options or not value.isdigit():
            raise VitlabError(
                f"clip option {key}={value!r} in {spec!r}: options are count, size, seed (whole numbers) and "
                "encoder (a vitlab checkpoint)"
            )
        options[key] = int(value)
    if source not in ("fashion-mnist", "digits") or options["size"] % _GRID or options["size"] < 16:
        raise VitlabError(f"{spec!r}: clips:fashion-mnist|digits[?count=N&size=PX&seed=S], size a multiple of 8 >= 16")
    return source, options


def generate_clips(*, count: int = 1000, size: int = 32, seed: int = 0, source: str = "fashion-mnist",
                   data_dir: str | None = None, val_fraction: float = 0.1,
                   encoder: str | None = None) -> tuple[list[Clip], list[str]]:  # fmt: skip
    """``count`` clips, clip i drawn from ``numpy.random.default_rng([seed, i])``; and notes (a fallback source).
    ``encoder``: a vitlab checkpoint whose frozen features are the appearance expert (`FrameEncoder`)."""
    from vitlab.data.scenes import load_item_pool

    pool = load_item_pool(source, data_dir=data_dir)
    appearance = FrameEncoder(encoder) if encoder else None
    rng_of = lambda i: np.random.default_rng([derive_seed("clips", seed) % 2**32, i])
    clips = [draw_clip(rng_of(i), pool, size=size, val_fraction=val_fraction, index=i, appearance=appearance)
             for i in range(count)]  # fmt: skip
    return clips, list(pool.notes)


def expert_widths(clips: list[Clip]) -> dict[str, int]:
    """Each expert's feature width, as the clips hold them (appearance's is the encoder's where one made it)."""
    return {name: int(x.shape[1]) for name, (x, _) in clips[0].experts.items()} if clips else dict(EXPERTS)


def build_clip_dataset(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.1) -> VideoSplits:
    if spec.startswith(FOLDER):
        return read_clip_folder(spec[len(FOLDER) :], name=spec)
    source, options = parse_clip_spec(spec)
    clips, notes = generate_clips(**options, source=source, data_dir=data_dir, val_fraction=val_fraction)
    return _splits(clips, expert_widths(clips), name=spec, notes=notes)


def is_clip_spec(spec: str) -> bool:
    return spec.startswith((PREFIX, FOLDER))


# --- on disk -------------------------------------------------------------------------------------------------------
def write_clip_folder(clips: list[Clip], out: str | Path) -> dict[str, int]:
    """``out/features/ID.npz`` and ``out/captions.json`` (atomically); returns the clips per split."""
    from vitlab._io import atomic_directory, write_json

    with atomic_directory(out) as tmp:
        (tmp / "features").mkdir()
        for c in clips:
            arrays = {k: v for name, (x, t) in c.experts.items() for k, v in ((name, x), (f"{name}_t", t))}
            np.savez(tmp / "features" / f"{c.id}.npz", **arrays)
        entries = [{"id": c.id, "split": SPLITS[c.split], "captions": c.captions} for c in clips]
        write_json(tmp / CAPTIONS_FILE, {"experts": expert_widths(clips), "clips": entries})
    return {s: sum(c.split == i for c in clips) for i, s in enumerate(SPLITS)}


def read_clip_folder(root: str, *, name: str) -> VideoSplits:
    """``videofeatures:DIR``: DIR/captions.json ({"experts": {name: width}, "clips": [{id, split, captions}]}) and
    DIR/features/ID.npz; an expert a clip lacks is an absent key or an empty array. Faults are one line."""
    path = Path(root).expanduser()
    index = path / CAPTIONS_FILE
    try:
        meta = json.loads(index.read_text())
        experts = {str(k): int(v) for k, v in meta["experts"].items()}
        entries = [(str(e["id"]), SPLITS.index(e.get("split", "train")), [str(c) for c in e["captions"]])
                   for e in meta["clips"]]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VitlabError(
            f"{index} cannot be read as a clip index ({type(e).__name__}: {e}); see vitlab data clips"
        ) from None
    clips = [Clip(cid, split, read_features(path / "features" / f"{cid}.npz", experts), caps)
             for cid, split, caps in entries]  # fmt: skip
    return _splits(clips, experts, name=name, notes=[])


def read_features(path: Path, experts: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name, dim in experts.items():
                x = z[name].astype(np.float32) if name in z else np.zeros((0, dim), np.float32)
                t = z[f"{name}_t"].astype(np.float32) if f"{name}_t" in z else np.zeros(0, np.float32)
                if x.ndim != 2 or x.shape[1] != dim or t.shape != (len(x),):
                    raise VitlabError(
                        f"{path}: expert {name!r} has features {x.shape} and timestamps {t.shape}; expected "
                        f"[K, {dim}] and [K]"
                    )
                if not np.isfinite(x).all():
                    raise VitlabError(f"{path}: expert {name!r} holds NaN or infinite features")
                out[name] = (x, t)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # .npz is a zip: a torn one fails as a zip
        raise VitlabError(f"{path} cannot be read as a clip's features ({type(e).__name__}: {e})") from None
    if not any(len(x) for x, _ in out.values()):
        raise VitlabError(f"{path} has no feature from any expert")
    return out
