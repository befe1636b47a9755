"""Text-video retrieval scores as MMT reports them: R@1/5/10, median and mean rank, both directions.

Reproduces ``t2v_metrics``, ``v2t_metrics`` and ``cols2metrics`` of MMT's ``model/metric.py`` (Gabeur et al.,
ECCV 2020), themselves Collaborative Experts' (Liu et al., BMVC 2019), with ``break_ties = "averaging"``.

``sims[i, j]`` is the similarity of text query i and item (video) j; the queries of item j are the rows
``j * queries_per_item ... (j + 1) * queries_per_item - 1``. Higher is closer.

**Ranks and ties.** A score's 0-based rank in a list is the number of strictly higher scores, plus the average
position among the scores equal to it (itself included): ``above + (tied - 1) / 2`` (McSherry & Najork, ECIR 2008).
Two items tied at the top both get 1-based rank 1.5; a constant similarity matrix over N items gives every query
rank (N + 1) / 2 rather than the perfect score that breaking ties "optimistically" would give.

- **t2v**: one rank per text query, of its own item among all items of its row (``num_items * queries_per_item``
  queries in all).
- **v2t**: one rank per item: among ALL text queries of its column, each of the item's own captions gets its
  averaged rank as above (the item's other captions compete like any caption), and the item keeps the smallest,
  its closest relevant caption (VSE's convention). So two of an item's captions tied at the top give it rank 1.5,
  not 1: with several captions per item MMT's averaging can be worse than chance when everything is tied.

**Summary** (``cols2metrics``), with r the averaged 0-based ranks: ``r1 = 100 * mean(r == 0)``, ``r5 = 100 *
mean(r < 5)``, ``r10 = 100 * mean(r < 10)`` (percent), ``medr = median(r) + 1`` and ``meanr = mean(r) + 1``
(1-based). Note the asymmetry MMT has with fractional ranks: R@1 counts only an untied first place (1-based rank
exactly 1), while R@5 counts any 1-based rank up to 5.5 (a tie over places 5 and 6) and R@10 up to 10.5.

Inputs are numpy arrays or torch tensors of any real dtype; float16 / bfloat16 / float32 are widened to float64
exactly, so ties are the ties of the given values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitlab.errors import VitlabError
from vitlab.metrics._arrays import as_numpy


def averaged_ranks(scores: np.ndarray, own: np.ndarray) -> np.ndarray:
    """0-based rank of ``own[r]`` among ``scores[r]`` for each row r, ties averaged: ``[R, M], [R] -> [R]``.

    ``own[r]`` must be one of the values of row r (it counts among the tied).
    """
    above = (scores > own[:, None]).sum(1)
    tied = (scores == own[:, None]).sum(1)  # >= 1: own itself
    return above + (tied - 1) / 2


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """MMT's ``cols2metrics`` over 0-based (possibly fractional) ranks."""
    return {
        f"{prefix}_r1": 100 * float(np.mean(ranks == 0)),  # == 0, not < 1: a tie for first place is a miss
        f"{prefix}_r5": 100 * float(np.mean(ranks < 5)),
        f"{prefix}_r10": 100 * float(np.mean(ranks < 10)),
        f"{prefix}_medr": float(np.median(ranks)) + 1,
        f"{prefix}_meanr": float(np.mean(ranks)) + 1,
    }


def _check(sims: Any, queries_per_item: int) -> np.ndarray:
    s = as_numpy(sims, name="sims", kind="float")
    if isinstance(queries_per_item, bool) or not isinstance(queries_per_item, (int, np.integer)):
        raise VitlabError(f"queries_per_item must be a positive integer, not {queries_per_item!r}")
    if queries_per_item < 1:
        raise VitlabError(f"queries_per_item must be a positive integer, not {queries_per_item}")
    if s.ndim != 2 or s.shape[1] == 0:
        raise VitlabError(f"sims must be a matrix [text queries, items] with at least one item, not shape {s.shape}")
    if s.shape[0] != s.shape[1] * queries_per_item:
        raise VitlabError(
            f"sims has {s.shape[0]} rows but {s.shape[1]} items x queries_per_item {queries_per_item} = "
            f"{s.shape[1] * queries_per_item}: give queries_per_item text queries per item, item 0's first"
        )
    if np.isnan(s).any():
        raise VitlabError("sims contains NaN: every query-item similarity must be a number")
    return s


def retrieval_metrics(sims: Any, queries_per_item: int = 1) -> dict[str, float]:
    """``{"t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "v2t_r1", ..., "v2t_meanr"}`` of a similarity
    matrix ``[num_items * queries_per_item, num_items]``, exactly as MMT's evaluation computes them (module doc:
    recalls in percent, ranks 1-based, ties averaged, v2t ranks each item's closest relevant caption)."""
    s = _check(sims, queries_per_item)
    num_queries, num_items = s.shape
    q = np.arange(num_queries)
    t2v = averaged_ranks(s, s[q, q // queries_per_item])  # (num_queries,)

    items = np.arange(num_items)
    by_item = s.T  # (num_items, num_queries): each item's column of scores over all captions
    # one caption slot at a time keeps memory at one [num_items, num_queries] comparison
    v2t = np.min(
        [averaged_ranks(by_item, s[items * queries_per_item + k, items]) for k in range(queries_per_item)], axis=0
    )  # (num_items,)
    return {**_summary(t2v, "t2v"), **_summary(v2t, "v2t")}
