"""`forward_intermediates`, the part of the model contract that inspection tools and dense heads build on.

Every model answers ``forward_intermediates(x, indices=None, *, norm=False, intermediates_only=False)``:

* ``indices`` picks the blocks (token models) or stages (hierarchical and convolutional models) whose outputs are
  returned: ``None`` all of them, an int ``n`` the last ``n``, a sequence the listed ones (negative counts from
  the end), always in depth order;
* token models return tokens ``[B, N, D]`` (prefix tokens included), staged models maps ``[B, C, H, W]``;
* ``norm=True`` applies the model's final norm to each (token models), as timm does;
* the result is ``(final_features, [intermediates])``, where ``final_features`` equals `forward_features(x)`,
  or the list alone with ``intermediates_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vitlab.errors import VitlabError


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """Normalise ``indices`` to sorted non-negative block indices, with a one-line error for an index that does
    not exist."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise VitlabError(f"asked for the last {indices} of {num_blocks} blocks")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise VitlabError(f"block index {i} is out of range for {num_blocks} blocks")
        out.append(j)
    return sorted(set(out))


def stage_intermediates(
    x: torch.Tensor,
    stages: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    indices: int | Sequence[int] | None,
    intermediates_only: bool,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
    """Run ``x`` through ``stages`` (or blocks) in turn, keeping the outputs of those ``indices`` picks, passed
    through ``keep`` if given (a final norm): the body of `forward_intermediates` for a model that is an embedding
    followed by stages or blocks (call it on the embedding's output)."""
    take = take_indices(len(stages), indices)
    out = []
    for i, stage in enumerate(stages):
        x = stage(x)
        if i in take:
            out.append(keep(x) if keep is not None else x)
        if intermediates_only and i == take[-1]:
            return out  # the stages after the last one asked for need not run
    return x, out
