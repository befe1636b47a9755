"""Caption metrics as the captioning papers compute them, and attention correctness.

- `caption_scores`: BLEU-1..4 (Papineni et al. 2002), METEOR (Denkowski & Lavie 2014), ROUGE-L (Lin 2004) and
  CIDEr-D (Vedantam et al. 2015) through ``pycocoevalcap``, the COCO caption evaluation code that Show, Attend and
  Tell and its successors report with: captions lower-cased and split by Stanford's PTB tokenizer, punctuation
  dropped, BLEU over the whole corpus (closest reference length), CIDEr-D's document frequencies from the references
  scored. The references are the raw captions: scoring against references mapped through a vocabulary (``<unk>`` for
  rare words) would let an ``<unk>`` in a generated caption match one in a reference and inflate every score. The
  tokenizer and METEOR run on Java (`metrics_unavailable` says when it or pycocoevalcap is missing).
- `attention_correctness`: the share of a word's attention mass inside the box of the item the word names
  (Liu et al., "Attention Correctness in Neural Image Captioning", AAAI 2017, with boxes in place of their
  segmentations), averaged over the words that name an item of the image.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError

CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
_EMPTY = "<empty>"  # stands for an empty generated caption: no reference has it, so it scores 0 (ROUGE-L divides by
# the candidate's length)


def metrics_unavailable() -> str | None:
    """Why `caption_scores` cannot run here, in one line, or None when it can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'vitlab[caption]')"
    if shutil.which("java") is None:
        return (
            "Java is not installed: pycocoevalcap's PTB tokenizer and METEOR run on it (apt-get install "
            "default-jre-headless; `make setup` does as root)"
        )
    return None


def caption_scores(
    references: Sequence[Sequence[str]], candidates: Sequence[str], *, meteor: bool = True
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (`CAPTION_METRICS`) of one candidate caption per image against that
    image's raw reference captions (``references[i]``, at least one each), as fractions (CIDEr-D up to 10).
    ``meteor=False`` leaves METEOR out (None), and the few seconds its Java process takes to start."""
    why = metrics_unavailable()
    if why is not None:
        raise VitlabError(f"caption metrics unavailable: {why}")
    if len(references) != len(candidates) or not candidates or not all(references):
        raise VitlabError("caption_scores needs one candidate and at least one reference caption per image")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    with _quiet_stderr():
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    res = {i: [c if c.strip() else _EMPTY] for i, (c,) in res.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    meteor_score = None
    if meteor:
        scorer = Meteor()  # a Java process, ended when the scorer is deleted
        try:
            meteor_score, _ = scorer.compute_score(gts, res)
        finally:
            del scorer
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    values = [*bleu, meteor_score, rouge, cider]
    return {k: None if v is None else float(v) for k, v in zip(CAPTION_METRICS, values)}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The PTB tokenizer's Java process writes its speed to the stderr it inherits: send that to /dev/null."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --- attention correctness ------------------------------------------------------------------------------------------
def attention_in_box(
    alpha: torch.Tensor, grid: tuple[int, int], box: Sequence[int], image_size: tuple[int, int]
) -> float:
    """The share of ``alpha`` [L] (over a grid (h, w), L = h * w, covering the whole image) inside ``box`` (x0, y0,
    x1, y1 in pixels of an image of ``image_size`` (H, W), x1 and y1 exclusive). Each location's mass is spread
    evenly over the pixels it covers, as the papers upsample the map onto the image."""
    h, w = grid
    H, W = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    # each pixel's location (nearest upsampling of the grid): where H is not a multiple of h a location covers a
    # few pixels more or fewer than another, so its mass is divided among the pixels it covers
    location = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    owner = F.interpolate(location, size=(H, W), mode="nearest")[0, 0].long()  # (H, W)
    pixels = torch.bincount(owner.flatten(), minlength=h * w).clamp(min=1)  # (L,)
    per_pixel = (alpha.float().flatten() / pixels)[owner]  # (H, W)
    total = per_pixel.sum()
    return float(per_pixel[y0:y1, x0:x1].sum() / total) if total > 0 else 0.0


def attention_correctness(
    maps: Sequence[torch.Tensor],
    named: Sequence[Sequence[tuple[int, Sequence[int]]]],
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
) -> float | None:
    """The mean share of attention inside the named item's box over every word that names one: ``maps[i]`` [T, L]
    are image i's maps per generated word, ``named[i]`` its (word position, item box) pairs. None when no generated
    word names an item of its image."""
    shares = [attention_in_box(maps[i][t], grid, box, image_size) for i, pairs in enumerate(named) for t, box in pairs]
    return sum(shares) / len(shares) if shares else None
