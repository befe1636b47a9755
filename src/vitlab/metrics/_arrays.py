"""Inputs of the metrics as numpy arrays, whether the caller holds numpy arrays, torch tensors or lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vitlab.errors import VitlabError


def as_numpy(x: Any, *, name: str, kind: str) -> np.ndarray:
    """`x` as a numpy array of integers (``kind="int"``) or of float64 (``kind="float"``).

    Tensors are detached and moved to the CPU; float16 / bfloat16 / float32 values are widened to float64, which
    represents each of them exactly, so equal scores stay equal (ties matter to the retrieval ranks). Label maps must
    already be integers (or booleans): a float map is usually logits or probabilities that still need an argmax.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.to(torch.float64) if x.is_floating_point() else x
        x = x.numpy()
    a = np.asarray(x)
    if kind == "int":
        if a.dtype == np.bool_:
            return a.astype(np.int64)
        if not np.issubdtype(a.dtype, np.integer):
            raise VitlabError(
                f"{name} must hold integer class indices, not {a.dtype}: take the argmax over the class dimension first"
            )
        return a.astype(np.int64, copy=False)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(a.dtype, np.complexfloating):
        raise VitlabError(f"{name} must hold real numbers, not {a.dtype}")
    return a.astype(np.float64, copy=False)
