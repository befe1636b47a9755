"""The non-local block.

Wang, Girshick, Gupta & He, "Non-local Neural Networks", CVPR 2018 (arXiv:1711.07971), section 3:

    y_i = 1 / C(x) * sum_j f(x_i, x_j) g(x_j),     g(x_j) = W_g x_j                              (1)
    z_i = W_z y_i + x_i                                                                           (6)

with the four pairwise functions f of section 3.2 and their normalisers C(x):

    gaussian            f = exp(x_i^T x_j)                          C(x) = sum_j f   (a softmax over j)
    embedded gaussian   f = exp(theta(x_i)^T phi(x_j))              C(x) = sum_j f   (a softmax over j)
    dot product         f = theta(x_i)^T phi(x_j)                   C(x) = N
    concatenation       f = ReLU(w_f^T [theta(x_i), phi(x_j)])      C(x) = N

theta(x) = W_theta x and phi(x) = W_phi x are 1x1 (1x1x1) convolutions to half the input channels, as is W_g
(section 3.3); N is the number of positions j. Sub-sampling (section 3.3) puts a max-pool after phi and g, so
the j run over a coarser grid (2x2 in space; 1x2x2 for space-time, pooling space only, as the authors' video
code). W_z is followed by BatchNorm whose scale is initialised to zero, so a block inserted into a trained network
starts as the identity.

The embedded-gaussian block is single-head softmax self-attention (section 3.2) with W_theta, W_phi and W_g as the
query, key and value projections and no 1/sqrt(d) scaling: the paper writes none, so the default ``scale`` is 1.
(The authors' released code divides by sqrt(C/2), their ``use_scale`` switch: ``use_scale=True`` here.)

The pairwise map [B, N, N'] passes through ``attn_probs`` as a one-head attention map [B, 1, N, N'], so that
`vitlab.layers.record_attention` records it like any other attention map.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers.attention import _composed_is_faster
from vitlab.layers.drop import DropPath

PairwiseFn = Literal["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_SUB_SAMPLE = {1: 2, 2: (2, 2), 3: (1, 2, 2)}  # space-time pools space only
_LAYOUT = {1: "[B, C, L]", 2: "[B, C, H, W]", 3: "[B, C, T, H, W]"}


class NonLocalBlock(nn.Module):
    """Non-local block z = W_z y + x over a [B, C, L] (``dim=1``), [B, C, H, W] (2) or [B, C, T, H, W] (3) input.

    ``fused_attn`` picks how y is computed, never what: the softmax functions use
    `F.scaled_dot_product_attention`; the dot product uses theta (phi^T g) / N, which is (theta phi^T / N) g
    reassociated, linear in the number of positions; concatenation has no shortcut and is always explicit.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int = 2,
        mode: PairwiseFn = "embedded_gaussian",
        inter_channels: int | None = None,
        sub_sample: bool = False,
        use_bn: bool = True,
        use_scale: bool = False,
        drop_path: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if dim not in _CONV:
            raise VitlabError(f"NonLocalBlock dim must be 1, 2 or 3 (spatial dimensions), got {dim!r}")
        if mode not in MODES:
            raise VitlabError(f"unknown non-local pairwise function {mode!r}; choose from {', '.join(MODES)}")
        conv = _CONV[dim]
        self.in_channels = in_channels
        self.inter_channels = inter_channels or max(in_channels // 2, 1)  # section 3.3: half the channels
        self.dim = dim
        self.mode = mode
        self.use_scale = use_scale
        self.init_std = init_std
        self.fused_attn = True
        self.attn_probs = nn.Identity()  # every pairwise map [B, 1, N, N'] passes through here

        self.g = conv(in_channels, self.inter_channels, kernel_size=1)
        if mode == "gaussian":  # f compares the inputs themselves: no embedding
            self.theta = self.phi = None
        else:
            self.theta = conv(in_channels, self.inter_channels, kernel_size=1)
            self.phi = conv(in_channels, self.inter_channels, kernel_size=1)
        # w_f projects the concatenated [theta_i, phi_j] to a scalar (no bias in the paper's f)
        self.w_f = nn.Linear(2 * self.inter_channels, 1, bias=False) if mode == "concatenation" else None
        self.pool = _POOL[dim](kernel_size=_SUB_SAMPLE[dim]) if sub_sample else nn.Identity()
        self.w_z = conv(self.inter_channels, in_channels, kernel_size=1)
        self.norm = _NORM[dim](in_channels) if use_bn else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.01) weights and zero biases (the authors' code), then the identity at insertion.

        The identity comes from the BatchNorm scale alone, as the paper has it: gamma = 0 and beta = 0 make the branch
        exactly zero while d(loss)/d(gamma) = sum(dL/dz * BN-normalised W_z y) is not, so gamma learns first and
        W_z after it. Zeroing W_z as well would leave both without a gradient (the normalised W_z y is then 0),
        and the block would stay the identity for good. Without BatchNorm W_z itself is zeroed, as the authors'
        code does; W_z then gets a gradient through y.
        """
        for m in (self.theta, self.phi, self.g, self.w_z, self.w_f):
            if m is not None:
                nn.init.normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.norm, nn.Identity):
            nn.init.zeros_(self.w_z.weight)
        else:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise VitlabError(
                f"NonLocalBlock(dim={self.dim}) expects {_LAYOUT[self.dim]} with C={self.in_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        B, _, *size = x.shape
        tokens = lambda t: t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, C, *S) -> (B, 1, N, C): one head
        if self.mode == "gaussian":
            q, k = tokens(x), tokens(self.pool(x))  # (B, 1, N, C), (B, 1, N', C)
        else:
            q, k = tokens(self.theta(x)), tokens(self.pool(self.phi(x)))  # (B, 1, N, C/2), (B, 1, N', C/2)
        v = tokens(self.pool(self.g(x)))  # (B, 1, N', C/2)
        y = self.aggregate(q, k, v)  # (B, 1, N, C/2)
        y = y.squeeze(1).transpose(1, 2).reshape(B, self.inter_channels, *size)  # (B, C/2, *S)
        return x + self.drop_path(self.norm(self.w_z(y)))  # eq. 6

    def aggregate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """y = f(q, k) v / C(x) (eq. 1) for q (B, 1, N, d), k (B, 1, N', d), v (B, 1, N', C/2)."""
        n_keys = k.shape[2]
        softmax = self.mode in ("gaussian", "embedded_gaussian")
        scale = q.shape[-1] ** -0.5 if self.use_scale else 1.0
        if self.fused_attn and softmax and not _composed_is_faster(q):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)  # scale=1: no 1/sqrt(d) unless asked
        if self.fused_attn and self.mode == "dot_product":
            return q @ (k.transpose(-2, -1) @ v) / n_keys  # (B, 1, N, d) @ (B, 1, d, C/2)
        return self.attn_probs(self.pairwise(q, k, scale)) @ v

    def pairwise(self, q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The normalised pairwise map f(x_i, x_j) / C(x): (B, 1, N, N')."""
        n_keys = k.shape[2]
        if self.mode in ("gaussian", "embedded_gaussian"):
            logits = (q * scale) @ k.transpose(-2, -1)  # (B, 1, N, N')
            # exp / sum_j exp is a softmax; in fp32 even under bf16 autocast, as AttentionBase
            return logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        if self.mode == "dot_product":
            return q @ k.transpose(-2, -1) / n_keys
        # w_f^T [theta_i, phi_j] = w_theta^T theta_i + w_phi^T phi_j: two projections and a broadcast sum, never
        # the (N, N', 2d) concatenation itself
        w_theta, w_phi = self.w_f.weight[0].split(self.inter_channels)
        return F.relu((q @ w_theta)[..., :, None] + (k @ w_phi)[..., None, :]) / n_keys  # (B, 1, N, N')

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dim={self.dim}, inter_channels={self.inter_channels}"
