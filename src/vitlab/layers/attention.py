"""Scaled dot-product attention, multi-head self-attention and cross-attention.

Vaswani et al., "Attention Is All You Need" (2017), eq. 1 and section 3.2.2:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Every attention module has two paths that compute the same function:

* fused (default): `torch.nn.functional.scaled_dot_product_attention`, which picks a flash / memory-efficient
  kernel and never materialises the N x N probabilities;
* explicit: softmax(QK^T / sqrt(d)) V written out, with the probabilities passed through the submodule
  ``attn_probs`` (an identity). A forward hook on ``attn_probs`` sees every attention map ``[B, heads, N, M]``.
  The fused path also takes this route where it is faster: low-precision training on CPU.

Analysis tools call `explicit_attention(model)` so they never record from the fused path, where the maps do not
exist (a trap in libraries whose hooks silently return nothing when the fused kernel is on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _composed_is_faster(q: torch.Tensor) -> bool:
    """On CPU, PyTorch's fused attention backward in bf16/fp16 is 1.3-4x slower than the same attention composed
    of two batched matmuls and a softmax (`python benchmarks/cpu_kernels.py`), so low-precision CPU training
    takes the composed path. fp32 (0.9-1.1x either way), inference and CUDA keep the fused kernel."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad


class AttentionBase(nn.Module):
    """Shared core of every attention module: the attention itself (both paths) and the output projection.

    Family-specific attention (window attention with a relative position bias, class attention, convolutional
    projections, non-local and axial attention) subclasses this and calls `attend`, so that `attention_modules`,
    `set_fused_attn` and `record_attention` find it and its maps pass through ``attn_probs``. An additive float
    ``attn_mask`` carries position biases and shift masks; a boolean one marks the keys each query may see.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        # qk_norm (Dehghani et al., 2023) normalises queries and keys per head to keep logits bounded at scale.
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop_p = attn_drop
        self.attn_probs = nn.Identity()  # the one named point every attention map passes through
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """q: (B, h, N, hd), k and v: (B, h, M, hd), attn_mask broadcastable to (B, h, N, M) -> (B, N, h * hd)
        after the output projection."""
        B, _, N, _ = q.shape
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn and not _composed_is_faster(q):
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop_p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, M)
            if attn_mask is not None:
                attn = (
                    attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
                )
            # softmax in fp32 even under bf16 autocast: exp() in bf16 keeps ~3 digits, too few for the
            # probabilities of a long sequence
            attn = self.attn_probs(attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype))
            x = self.attn_drop(attn) @ v  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, -1)  # (B, N, h * hd)
        return self.proj_drop(self.proj(x))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)


class Attention(AttentionBase):
    """Multi-head self-attention with one fused qkv projection (W^Q, W^K, W^V stacked in ``qkv``)."""

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = True, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        return self.attend(q, k, v, attn_mask)


class CrossAttention(AttentionBase):
    """Multi-head cross-attention: queries from ``x`` [B, N, dim], keys and values from ``context``
    [B, M, context_dim] (the encoder-decoder attention of Vaswani et al., section 3.2.3)."""

    def __init__(
        self, dim: int, *, context_dim: int | None = None, num_heads: int = 8, qkv_bias: bool = True, **kwargs
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, dim * 2, bias=qkv_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, _ = context.shape
        q = self.split_heads(self.q(x))
        kv = self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, M, hd)
        k, v = kv.unbind(0)
        return self.attend(q, k, v, attn_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All attention modules of ``model`` with their qualified names, in order of registration.

    An attention module is one with a boolean ``fused_attn`` switch and an ``attn_probs`` submodule that its
    explicit path sends every map through: `AttentionBase` and its subclasses, and attention that cannot share
    its core (talking heads, the non-local block's pairwise functions) but keeps the same two attributes."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "fused_attn", None), bool) and isinstance(getattr(m, "attn_probs", None), nn.Module)
    ]


def set_fused_attn(model: nn.Module, fused: bool) -> None:
    for _, m in attention_modules(model):
        m.fused_attn = fused


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Run ``model``'s attention on the explicit path inside the block, restoring each module's setting after."""
    mods = attention_modules(model)
    saved = [m.fused_attn for _, m in mods]
    set_fused_attn(model, False)
    try:
        yield mods
    finally:
        for (_, m), fused in zip(mods, saved):
            m.fused_attn = fused


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record every attention map ``[B, heads, N, M]`` computed inside the block, keyed by module name.

    >>> with record_attention(model) as maps:
    ...     model(x)
    >>> maps["blocks.0.attn"][0].shape
    """
    maps: dict[str, list[torch.Tensor]] = {}
    handles = []
    with explicit_attention(model) as mods:
        for name, m in mods:
            maps[name] = []
            handles.append(m.attn_probs.register_forward_hook(lambda _m, _i, out, n=name: maps[n].append(out.detach())))
        try:
            yield maps
        finally:
            for h in handles:
                h.remove()
