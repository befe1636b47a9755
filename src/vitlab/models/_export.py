"""What every family's exporters share (`register_hf_exporter` / `register_timm_exporter`, the inverses of its
checkpoint converters): refusing, in one line, an option the other library cannot express, and writing a ViT-style
`Block` under the parameter names HF transformers saves."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from vitlab.errors import VitlabError


def refuse_options(args: dict[str, Any], unsupported: dict[str, Any], target: str) -> None:
    """A one-line error naming the first constructor argument whose value ``target`` cannot express:
    ``unsupported`` maps an argument to the one value (or, given a tuple, the values) that ``target`` takes."""
    for key, allowed in unsupported.items():
        value = args.get(key)
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise VitlabError(f"{key}={value!r} cannot be expressed in {target} (it takes {key}={allowed!r})")


# per-layer names HF's save_pretrained writes (every transformers version reads them), for ours in a `Block`
HF_SAVED_LAYER_NAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_SAVED_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def export_hf_block(
    key: str, v: torch.Tensor, *, names: dict[str, str] = HF_SAVED_LAYER_NAMES, qkv: Sequence[str] = HF_SAVED_QKV
) -> dict[str, torch.Tensor]:
    """One parameter of a `Block` (``key`` relative to it) under HF's names: the fused ``qkv`` split back into
    query / key / value (the rows of each, in that order), the rest renamed by ``names``."""
    mod, _, kind = key.rpartition(".")
    if mod == "attn.qkv":
        return {f"{name}.{kind}": part for name, part in zip(qkv, v.chunk(3, dim=0))}
    if mod not in names:
        raise VitlabError(f"parameter {key!r} of a block has no HF counterpart")
    return {f"{names[mod]}.{kind}": v}


def export_hf_encoder(
    state: dict[str, torch.Tensor], simple: dict[str, str], *, layer: str = "encoder.layer", **block_names: Any
) -> dict[str, torch.Tensor]:
    """vitlab ViT-style names -> HF's: ``simple`` renames whole keys, ``blocks.i.*`` go to ``{layer}.i.*``
    (`export_hf_block`); the inverse of `convert_hf_encoder_layers`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif m := re.match(r"blocks\.(\d+)\.(.+)$", k):
            out.update(
                {f"{layer}.{m.group(1)}.{n}": t for n, t in export_hf_block(m.group(2), v, **block_names).items()}
            )
        else:
            raise VitlabError(f"parameter {k!r} has no HF counterpart")
    return out
