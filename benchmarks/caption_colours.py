"""Does an item's colour survive the captioning pipeline? (docs/captioning.md, "white coat" -> "red coat")

    python benchmarks/caption_colours.py runs/cap_soft    # after vitlab caption eval runs/cap_soft/checkpoints/best

On the run's scenes (its data must be ``scenes:...?count=N&size=PX``, seed 0), from the drawing to the words:

1. the grammar: the colour word of every caption of a single-item scene against the colour read off its pixels
   (the palette colour nearest in direction: shading scales brightness only);
2. the model's input: the normalised input (`vitlab.captioning._model_input`, what the encoder reads) averaged over
   the item pixels of each colour, per channel;
3. the encoder: logistic-regression probes of a single-item scene's colour, trained on the training scenes, scored
   on the test scenes, from 8x8 average-pooled input pixels and from the mean annotation vector;
4. the decoder, teacher-forced: at every colour word of the test captions, the colour word it scores highest;
5. the decoder, generating: the first colour word of each single-item test scene's caption (eval-test/captions.json).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from vitlab.captioning import _model_input, load_captioner
from vitlab.data.scenes import _COLOUR_RGB, COLOURS, SPLITS, generate_scenes, parse_scene_spec
from vitlab.train.captioning import teacher_forcing

WORD = re.compile(rf"\b({'|'.join(COLOURS)})\b")


def show(title: str, table: np.ndarray, columns: tuple[str, ...] = COLOURS) -> None:
    print(title)
    print(" " * 9 + "".join(f"{c:>8}" for c in columns))
    for name, row in zip(COLOURS, table):
        print(f"{name:>9}" + "".join(f"{v:8d}" for v in row))
    n = table[:, : len(COLOURS)].sum()
    print(f"  accuracy {np.trace(table[:, : len(COLOURS)]) / max(n, 1):.3f} over {n}")


def main(run: str) -> None:
    torch.set_num_threads(2)
    best = Path(run) / "checkpoints" / "best"
    model = load_captioner(best)
    spec = json.loads((best / "config.json").read_text())["train_config"]["data"]
    source, options = parse_scene_spec(spec)
    scenes = generate_scenes(**options, source=source, val_fraction=0.1)
    alone = (scenes.item_classes >= 0).sum(1) == 1
    colour = scenes.item_colours[:, 0]
    train, test = alone & (scenes.split == SPLITS.index("train")), scenes.split == SPLITS.index("test")

    # 1. the grammar
    agree = 0
    for i in np.flatnonzero(alone):
        rgb = scenes.images[i][scenes.instances[i] == 1].astype(float).mean(0)
        drawn = int(np.argmax((_COLOUR_RGB / np.linalg.norm(_COLOUR_RGB, axis=1, keepdims=True)) @ rgb))
        agree += {w for c in scenes.captions[i] for w in WORD.findall(c)} == {COLOURS[drawn]}
    print(f"1. captions' colour word = colour of the pixels: {agree}/{alone.sum()} single-item scenes")

    # 2. the model's input
    x = _model_input(model, torch.from_numpy(scenes.images).permute(0, 3, 1, 2))  # (N, 3, H, W)
    print(f"2. model input {tuple(x.shape[1:])}; mean over item pixels per channel, normalised:")
    for c, name in enumerate(COLOURS):
        slots = [(scenes.instances == j + 1) & (scenes.item_colours[:, j, None, None] == c) for j in range(3)]
        where = torch.from_numpy(np.logical_or.reduce(slots))  # (N, H, W): pixels of items of colour c
        print(f"   {name:>7}: {x.permute(1, 0, 2, 3)[:, where].mean(1).numpy().round(2)}")

    # 3. the encoder
    with torch.no_grad():
        pooled = torch.cat([model.encode(x[i : i + 256])[0].float().mean(1) for i in range(0, len(x), 256)]).numpy()
    raw = F.adaptive_avg_pool2d(x, 8).flatten(1).numpy()
    for what, features in (("8x8 input pixels", raw), ("mean annotation vector", pooled)):
        probe = LogisticRegression(max_iter=3000).fit(features[train], colour[train])
        score = probe.score(features[alone & test], colour[alone & test])
        print(f"3. probe of the colour from the {what}: {score:.3f} on {int((alone & test).sum())} test scenes")

    # 4. the decoder, teacher-forced
    ids = torch.tensor([model.tokenizer.tokenizer.token_to_id(c) for c in COLOURS])
    forced = np.zeros((4, 4), dtype=int)
    with torch.no_grad():
        for i in np.flatnonzero(test):
            inputs, targets, mask = teacher_forcing(model.tokenize(scenes.captions[i]), model.pad_id)
            logits = model(x[i : i + 1].expand(len(inputs), -1, -1, -1), inputs).logits  # (5, T, V)
            at = torch.isin(targets, ids) & mask
            truth = (targets[at][:, None] == ids).float().argmax(1)
            for t, p in zip(truth.tolist(), logits[at][:, ids].argmax(1).tolist()):
                forced[t, p] += 1
    show("4. teacher-forced, at each colour word of the test captions (rows: the word, columns: its best guess)",
         forced)  # fmt: skip

    # 5. the decoder, generating
    generated = json.loads((best / "eval-test" / "captions.json").read_text())
    table = np.zeros((4, 5), dtype=int)
    named = 0
    for c, i in zip(generated, np.flatnonzero(test)):
        if alone[i]:
            words = WORD.findall(c["caption"])
            table[colour[i], COLOURS.index(words[0]) if words else 4] += 1
            name = scenes.item_names[scenes.item_classes[i, 0]]
            named += f" {name} " in f" {c['caption'].replace(',', ' ')} "
    show("5. generated (beam 3), single-item test scenes: first colour word (rows: drawn colour)", table,
         (*COLOURS, "none"))  # fmt: skip
    print(f"   and the item's class named: {named} of {table.sum()} (chance about 1 in {len(scenes.item_names)})")


if __name__ == "__main__":
    main(sys.argv[1])
