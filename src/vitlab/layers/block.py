"""The pre-norm transformer encoder block shared by ViT and its family.

ViT (Dosovitskiy et al., 2021), eqs. 2-3:

    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l  = MLP(LN(z'_l)) + z'_l

with optional LayerScale (CaiT) and stochastic depth (DeiT) on each residual branch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitlab.layers.attention import Attention
from vitlab.layers.drop import DropPath, drop_path_rates
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel, 2016, section 2) that OpenAI's
    CLIP was trained with; its checkpoints need it to reproduce their features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def get_act_layer(name: str) -> Callable[[], nn.Module]:
    """Activation constructor by name ("gelu" is exact erf GELU, as in the ViT paper and HF's default)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def low_precision_inference(x: torch.Tensor) -> torch.Tensor:
    """Under autocast without autograd, carry the residual stream in the autocast dtype.

    Autocast runs matmuls in bf16 but leaves the residual stream in fp32 (the class token and position embedding
    are fp32 parameters), so every block pays fp32 <-> bf16 copies around each LayerNorm and matmul: about a fifth
    of bf16 inference time on CPU. Inference can run the whole stream in bf16, as a model cast to bf16 does;
    training keeps the fp32 stream, whose precision the optimizer needs.
    """
    device = x.device.type
    if device in ("cpu", "cuda") and not torch.is_grad_enabled() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        attn_layer: Callable[..., nn.Module] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # attn_layer: any AttentionBase subclass taking these arguments (CaiT's talking heads and class attention)
        self.attn = attn_layer(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_eps=norm_eps,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=get_act_layer(act), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        """``attn_args`` go to the attention after the tokens: a mask, or the grid size a convolutional
        projection needs (CvT)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *attn_args)))  # eq. 2
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))  # eq. 3
        return x


def block_stack(depth: int, dim: int, *, drop_path_rate: float = 0.0, **block_kwargs) -> nn.Sequential:
    """``depth`` Blocks of width ``dim`` with stochastic depth rising linearly to ``drop_path_rate`` (DeiT's rule,
    `drop_path_rates`); every other keyword argument goes to each Block (heads, MLP ratio, ``attn_layer``, ...)."""
    return nn.Sequential(*[Block(dim, drop_path=p, **block_kwargs) for p in drop_path_rates(drop_path_rate, depth)])
