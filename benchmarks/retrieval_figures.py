"""docs/retrieval.md's table, word probes and pictures from `vitlab retrieval` runs (issue 20).

For each run directory (``vitlab retrieval train --out RUN`` then ``vitlab retrieval eval RUN/checkpoints/best``):

* the row of its table: t2v R@1/5/10, MdR and v2t R@1 from ``RUN/checkpoints/best/eval-test/retrieval_metrics.json``;
* word probes: for each test clip's first caption, one word group changed at a time (left <-> right, high <-> low
  pitch, the sign's digit + 1, an item's colour, an item's class, and the two items' order of entrance); a probe
  counts as passed where the model scores the clip higher with its true caption than with the changed one (ties
  half). 50% is chance: a word the model does not read. The probes say which modality each kind of word is read
  from, and whether the order of events is;
* ``--bars PNG``: a bar chart of t2v R@1 per run; ``--query PNG``: the best checkpoint of ``--query-run`` on one
  test caption, its top clips' frames (the true clip framed in green).

    python benchmarks/retrieval_figures.py runs/retrieval/{all,appearance,...} --bars docs/figures/retrieval/r1.png \\
        --query-run runs/retrieval/all --query docs/figures/retrieval/query.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

ITEM = re.compile(r"a (white|red|blue|yellow) (.+?) moving (left|right)")
ORDER = re.compile(r"^first (.+?), then (.+?) comes in")
COLOURS = ("white", "red", "blue", "yellow")
KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "v2t_r1")
LABELS = {  # docs/retrieval.md's run directories -> bar labels (other names are shown as they are)
    "all": "MMT, all experts (10 epochs)",
    "all5": "MMT, all experts",
    "appearance": "appearance alone",
    "motion": "motion alone",
    "audio": "audio alone",
    "ocr": "OCR alone",
    "no_temporal": "no temporal embeddings",
    "mean_pool": "mean-pool + GEU baseline",
    "tune_text": "caption encoder fine-tuned",
    "encoder_appearance": "appearance alone, CvT-7 features",
}


def probes(caption: str, names: tuple[str, ...]) -> dict[str, str]:
    """The caption with one word group changed, per group that it has (the first item's words where two are)."""
    out = {}
    item = ITEM.search(caption)
    swap = {"left": "right", "right": "left", "high": "low", "low": "high"}
    if item:
        colour, name, way = item.groups()
        s, e = item.span()
        out["direction (motion)"] = caption[:s] + f"a {colour} {name} moving {swap[way]}" + caption[e:]
        other = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
        out["colour (appearance)"] = caption[:s] + f"a {other} {name} moving {way}" + caption[e:]
        other = names[(names.index(name) + 1) % len(names)]
        out["class (appearance)"] = caption[:s] + f"a {colour} {other} moving {way}" + caption[e:]
    pitch = re.search(r"with a (high|low) ", caption)
    if pitch:
        s, e = pitch.span(1)
        out["pitch (audio)"] = caption[:s] + swap[pitch.group(1)] + caption[e:]
    digit = re.search(r"the sign shows (\d)", caption)
    if digit:
        s, e = digit.span(1)
        out["digit (ocr)"] = caption[:s] + str((int(digit.group(1)) + 1) % 10) + caption[e:]
    order = ORDER.search(caption)
    if order and order.group(1) != order.group(2):
        out["order of entrance"] = ORDER.sub(f"first {order.group(2)}, then {order.group(1)} comes in", caption)
    return out


_TEST_CLIPS: dict[str, Any] = {}  # spec -> test split: runs on the same data build it once


def load(run: Path) -> tuple[Any, Any, str]:
    """The best checkpoint of a run, its test clips (rebuilt from the run's data spec) and the spec."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.data import build_dataset

    best = run / "checkpoints" / "best"
    model = from_pretrained(best, map_location="cpu").eval()
    spec = json.loads((best / "config.json").read_text())["train_config"]["data"]
    if spec not in _TEST_CLIPS:
        _TEST_CLIPS[spec] = build_dataset(spec).test
    return model, _TEST_CLIPS[spec], spec


@torch.no_grad()
def probe_scores(model: Any, test: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Per word group: % of test clips scored higher with their true first caption than with it changed."""
    video, available = model.encode_video(*test.batch(torch.arange(len(test))))
    texts, owner, groups = [], [], []
    for i, captions in enumerate(test.captions):
        changed = probes(captions[0], names)
        texts += [captions[0], *changed.values()]
        owner += [i] * (1 + len(changed))
        groups += [None, *changed]
    parts = [model.encode_text(model.tokenize(texts[k : k + 256])) for k in range(0, len(texts), 256)]
    text = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    owner_t = torch.tensor(owner)
    passed: dict[str, list[float]] = {}
    for i in range(len(test)):
        rows = (owner_t == i).nonzero()[:, 0]  # the true caption first, then its changed versions
        s = model.similarity((text[0][rows], text[1][rows]), (video[i : i + 1], available[i : i + 1]))[:, 0].float()
        for k, score in zip(rows[1:].tolist(), s[1:].tolist()):
            passed.setdefault(groups[k], []).append(1.0 if s[0] > score else 0.5 if s[0] == score else 0.0)
    return {g: 100 * float(np.mean(v)) for g, v in sorted(passed.items())}


def bars(rows: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
    names = list(rows)
    ax.barh([LABELS.get(n, n) for n in names[::-1]], [rows[n]["t2v_r1"] for n in names[::-1]], color="#4477aa")
    for y, n in enumerate(names[::-1]):
        ax.text(rows[n]["t2v_r1"] + 0.5, y, f"{rows[n]['t2v_r1']:.1f}", va="center", fontsize=8)
    ax.set_xlabel("text-to-video R@1 (%), test clips")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def clip_frames(clip_id: str, spec: str) -> np.ndarray:
    """A clip's frames [T, S, S, 3] drawn again (the clip generator keeps features, not frames)."""
    from vitlab.data.base import derive_seed
    from vitlab.data.clips import draw_clip, parse_clip_spec
    from vitlab.data.scenes import load_item_pool

    source, options = parse_clip_spec(spec)
    frames: list[np.ndarray] = []

    def keep(f: np.ndarray) -> np.ndarray:
        frames.append(f)
        return np.zeros((len(f), 1), np.float32)

    i = int(clip_id)
    rng = np.random.default_rng([derive_seed("clips", options["seed"]) % 2**32, i])
    draw_clip(rng, load_item_pool(source), size=options["size"], val_fraction=0.1, index=i, appearance=keep)
    return frames[0]


@torch.no_grad()
def query_figure(run: Path, out: Path, *, top: int = 4, shown: int = 6) -> str:
    """A two-item test caption (order words in it), its top clips, ``shown`` frames of each; the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, test, spec = load(run)
    wanted = [k for k, c in enumerate(test.captions) if c[0].startswith("first") and "sign" in c[0]]
    i = (wanted or [0])[0]  # the first two-item caption with a sign: order and OCR words in one query
    video = model.encode_video(*test.batch(torch.arange(len(test))))
    sims = model.similarity(model.encode_text(model.tokenize([test.captions[i][0]])), video)[0].float()
    order = sims.argsort(descending=True)[:top].tolist()
    fig, axes = plt.subplots(top, shown, figsize=(shown * 0.9, top * 1.0 + 0.5), dpi=80)
    for r, j in enumerate(order):
        frames = clip_frames(test.clips[j].id, spec)
        pick = np.linspace(0, len(frames) - 1, shown).round().astype(int)
        for c, t in enumerate(pick):
            ax = axes[r, c]
            ax.imshow(frames[t].astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == i:
                for side in ax.spines.values():
                    side.set_color("#22aa22")
                    side.set_linewidth(3)
            if c == 0:
                ax.set_ylabel(f"#{r + 1}\n{sims[j]:.2f}", fontsize=7, rotation=0, labelpad=14, va="center")
            ax.text(1, 3, f"{t}s", color="white", fontsize=6, va="top")
    caption = test.captions[i][0]
    fig.suptitle(f'"{caption}"\n(top {top} test clips, {shown} frames of each; the true clip framed)', fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return caption


def main() -> None:
    from vitlab.data.scenes import load_item_pool

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--bars", type=Path)
    p.add_argument("--query", type=Path)
    p.add_argument("--query-run", type=Path)
    p.add_argument("--json", type=Path, help="Write the rows and probes here.")
    args = p.parse_args()
    names = load_item_pool("fashion-mnist").names
    rows, table = {}, {}
    torch.set_num_threads(2)
    for run in args.runs:
        metrics = json.loads((run / "checkpoints" / "best" / "eval-test" / "retrieval_metrics.json").read_text())
        rows[run.name] = {k: metrics[k] for k in KEYS}
        model, test, _ = load(run)
        table[run.name] = probe_scores(model, test, names)
        cells = " | ".join(f"{metrics[k]:.1f}" for k in KEYS)
        print(f"| {run.name} | {cells} | " + " | ".join(f"{v:.0f}" for v in table[run.name].values()) + " |")
    print("probe columns:", ", ".join(next(iter(table.values()))))
    if args.bars:
        bars(rows, args.bars)
    if args.query:
        print("query:", query_figure(args.query_run or args.runs[0], args.query))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "probes": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
