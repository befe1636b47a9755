"""Soft against hard attention over the locations of a CNN feature map.

Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel and Bengio, "Show, Attend and Tell: Neural Image Caption
Generation with Visual Attention", ICML 2015 (arXiv:1502.03044), section 4, reduced from captioning to one
classification step.

A small residual CNN turns the image into L = H' x W' annotation vectors a_i in R^D (section 3.1.1). The query is
the paper's initial LSTM state, predicted from the mean annotation (section 3.1.2): h = f_init(mean_i a_i). The
attention model is additive (Bahdanau et al., 2015), eq. 4-5:

    e_i = w^T tanh(W_a a_i + W_h h),        alpha = softmax(e)

* soft (section 4.2): z = sum_i alpha_i a_i, the expectation of the context; trained end to end by backprop.
* hard (section 4.1): s ~ Multinoulli(alpha), z = a_s. The classifier p(y | a_s) is trained by backprop through
  a_s; the attention by REINFORCE (eq. 10-12): the gradient of
      lambda_r (log p(y | s) - b) log p(s | a) + lambda_e H[s]
  with b a moving average of the reward log p(y | s) (decay 0.9, as the paper), and the entropy term keeping the
  attention from collapsing early. As in the paper (section 4.1, among its ways to make the learning rule robust),
  each training image uses the sampled location with probability ``sample_prob`` (0.5) and the expected context
  (soft attention's z) otherwise; only the sampled images get a REINFORCE term. At inference s = argmax alpha (the
  paper samples; argmax is its deterministic reading, Xu et al. section 5.2).

The classification loss is computed by the training loop. The REINFORCE and entropy terms come from
`auxiliary_loss(target)`, which reads what the last training forward stored; a training loop adds it to the loss
when the model defines it. Soft attention has no such term (its auxiliary loss is 0).

The attention over locations goes through ``attn.attn_probs`` as a map [B, 1, 1, L] (one head, one query), and
``attn.fused_attn`` is the switch that vitlab's attention tools look for. Additive attention has no fused kernel:
both settings compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._registry import register_architecture, register_model
from vitlab.errors import VitlabError
from vitlab.layers import DropPath, drop_path_rates, trunc_normal_init, zero_init
from vitlab.models._features import take_indices
from vitlab.models._head import image_cfg

PAPER = (
    "Xu et al., Show, Attend and Tell: Neural Image Caption Generation with Visual Attention, ICML 2015"
    " (arXiv:1502.03044)"
)


class ResidualBlock(nn.Module):
    """conv3x3 (stride s) - BN - ReLU - conv3x3 - BN, plus a 1x1-conv shortcut when the shape changes (He et al.,
    2016); stochastic depth on the residual branch."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
            if stride != 1 or in_chs != out_chs
            else nn.Identity()
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(self.shortcut(x) + self.drop_path(y))


class LocationAttention(nn.Module):
    """Additive attention of one query over L locations (eq. 4-5): a [B, L, D] -> probabilities alpha [B, L]."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.init_h = nn.Linear(dim, attn_dim)  # f_init: the query from the mean annotation
        self.proj_a = nn.Linear(dim, attn_dim, bias=False)  # W_a
        self.score = nn.Linear(attn_dim, 1, bias=False)  # w; a bias would cancel in the softmax
        self.fused_attn = True  # no fused kernel for additive attention; kept so the attention tools find us
        self.attn_probs = nn.Identity()

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.init_h(a.mean(1)))  # (B, A)
        return self.score(torch.tanh(self.proj_a(a) + h[:, None])).squeeze(-1)  # (B, L): e_i

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (alpha [B, L], log alpha [B, L])."""
        B, L, _ = a.shape
        log_alpha = self.logits(a).float().log_softmax(-1)
        alpha = self.attn_probs(log_alpha.exp().view(B, 1, 1, L)).view(B, L)  # the recorded map [B, 1, 1, L]
        return alpha, log_alpha


@register_architecture
class AttentionCNN(nn.Module):
    arch = "attention_cnn"
    head_names = ("head",)

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        attention: Literal["soft", "hard"] = "soft",
        widths: Sequence[int] = (32, 64, 128),
        attn_dim: int = 128,
        reinforce_weight: float = 1.0,
        sample_prob: float = 0.5,
        entropy_weight: float = 0.01,
        baseline_decay: float = 0.9,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()  # img_size: the input the variant is registered for; the network takes any size
        if attention not in ("soft", "hard"):
            raise VitlabError(f"attention must be 'soft' or 'hard', got {attention!r}")
        if len(widths) < 2:
            raise VitlabError(f"widths needs a stem and at least one stage, got {tuple(widths)}")
        self.num_classes = num_classes
        self.attention = attention
        if not 0 <= sample_prob <= 1:
            raise VitlabError(f"sample_prob must be in [0, 1], got {sample_prob}")
        self.reinforce_weight = reinforce_weight
        self.sample_prob = sample_prob
        self.entropy_weight = entropy_weight
        self.baseline_decay = baseline_decay
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        # each stage halves the map: 28 -> 14 -> 7 locations per side with the default three widths
        dpr = drop_path_rates(drop_path_rate, len(widths) - 1)
        self.stages = nn.Sequential(
            *[ResidualBlock(widths[i], widths[i + 1], stride=2, drop_path=p) for i, p in enumerate(dpr)]
        )
        self.num_features = widths[-1]
        self.attn = LocationAttention(widths[-1], attn_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # b, the moving average of the REINFORCE reward log p(y | s)
        self.register_buffer("reward_baseline", torch.zeros(()))
        self._saved: dict[str, torch.Tensor] | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal convolutions, truncated-normal(0.02) linear maps; a zero classifier as the other vitlab
        models; the last BN of each residual branch at zero, so every block starts as its shortcut (Goyal et al.)."""

        def he_normal(m: nn.Module) -> None:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        trunc_normal_init(self, norms=(), other=he_normal)
        for block in self.stages:
            nn.init.zeros_(block.bn2.weight)
        zero_init(self.head)

    # --- forward --------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> annotation maps [B, D, H', W']."""
        return self.stages(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output maps [B, C_i, H_i, W_i] of the chosen stages (see `vitlab.models._features`); no final
        norm, so ``norm`` changes nothing."""
        take = take_indices(len(self.stages), indices)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take:
                out.append(x)
            if intermediates_only and i == take[-1]:
                return out
        return x, out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Maps [B, D, H', W'] -> the context vector z [B, D] (soft: the alpha-weighted mean of the locations;
        hard: one location, sampled from alpha in training (or, with probability 1 - ``sample_prob``, the
        expected context), argmax alpha in evaluation)."""
        a = x.flatten(2).transpose(1, 2)  # (B, L, D)
        alpha, log_alpha = self.attn(a)
        self._saved = None  # what a previous training forward left unused
        expected = torch.einsum("bl,bld->bd", alpha.to(a.dtype), a)  # (B, D)
        if self.attention == "soft":
            return expected
        rows = torch.arange(a.shape[0], device=a.device)
        if not self.training:
            return a[rows, alpha.argmax(-1)]  # (B, D): a_s
        s = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,)
        sampled = torch.rand(a.shape[0], device=a.device) < self.sample_prob  # (B,): which images sample
        entropy = -(alpha * log_alpha).sum(-1)
        self._saved = {"log_p_s": log_alpha.gather(1, s[:, None]).squeeze(1), "entropy": entropy, "sampled": sampled}
        return torch.where(sampled[:, None], a[rows, s], expected)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.head_drop(self.pool(x))
        if pre_logits:
            return z
        logits = self.head(z)
        if self._saved is not None and self.training:
            self._saved["logits"] = logits
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def auxiliary_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The REINFORCE and entropy terms of hard attention for the last training forward (0 for soft attention).

        ``target``: class indices [B] or class probabilities [B, K] (mixup). The reward is log p(y | s), the log
        likelihood the classifier gave the target from the sampled location; the advantage subtracts the moving
        baseline b from before this batch, and b then moves towards the batch's mean reward. Differentiating the
        returned value gives eq. 12's attention gradient: lambda_r (r - b) grad log p(s) + lambda_e grad H."""
        if self.attention == "soft":
            return self.reward_baseline.new_zeros(())
        saved, self._saved = self._saved, None
        if saved is None or "logits" not in saved:
            raise VitlabError("auxiliary_loss needs a training forward that returns logits first")
        sampled = saved["sampled"]
        with torch.no_grad():
            reward = -F.cross_entropy(saved["logits"].float(), target, reduction="none")  # log p(y | s), (B,)
            advantage = (reward - self.reward_baseline) * sampled  # the expected-context images have no sample
            if sampled.any():  # b follows the reward of sampled locations only
                batch = reward[sampled].mean()
                self.reward_baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * batch)
        reinforce = -(advantage * saved["log_p_s"]).mean()
        return self.reinforce_weight * reinforce - self.entropy_weight * saved["entropy"].mean()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        device = self.reward_baseline.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if hasattr(self, "default_cfg"):
            self.default_cfg["num_classes"] = num_classes
        if hasattr(self, "init_kwargs"):
            self.init_kwargs["num_classes"] = num_classes


# --- registered variants -------------------------------------------------------------------------------------
def _cfg(img_size: int, in_chans: int, num_classes: int) -> dict[str, Any]:
    return image_cfg(img_size, in_chans, paper=PAPER, num_classes=num_classes, interpolation="bilinear")


def _add_variant(attention: str, img: int, in_chans: int) -> None:
    name = f"{attention}_attention_cnn_{img}"
    kwargs = {"img_size": img, "in_chans": in_chans, "num_classes": 10, "attention": attention}

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return AttentionCNN, kwargs, _cfg(img, in_chans, 10)

    variant.__name__ = name
    variant.__doc__ = (
        f"{attention.capitalize()} attention over the 7x7 (or 8x8) locations of a 3-stage CNN, {img}x{img}."
    )
    register_model(variant)


for _attention in ("soft", "hard"):
    _add_variant(_attention, 28, 1)  # MNIST, Fashion-MNIST
    _add_variant(_attention, 32, 3)  # CIFAR
