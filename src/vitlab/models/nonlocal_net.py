"""Networks with non-local blocks: ResNets as the paper builds them, and a small plain CNN for 28 / 32 pixels.

Wang, Girshick, Gupta & He, "Non-local Neural Networks", CVPR 2018 (arXiv:1711.07971). The paper inserts
non-local blocks (`vitlab.layers.NonLocalBlock`, eq. 6) between the residual blocks of a ResNet-50: one before
the last block of res4, five after every other block of res3 and res4 (2 + 3), ten after every block of both.

* ``resnet50_nonlocal``: the 5-block ResNet-50, through `vitlab.models.resnet`'s insert points (the blocks become
  children ``extra<j>`` of ``layer2`` / ``layer3``, so ResNet-50 weights load with the blocks at the identity);
  ``resnet18_nonlocal_28`` / ``_32``: ResNet-18 with the small-image stem and one block in each of those stages.
* ``nonlocal_cnn_tiny_28`` / ``_32``: the same placement on a plain stack of 3x3 conv-BN-ReLU layers, 30x fewer
  parameters than ResNet-18, for quick CPU runs: a block after every ``nl_every``-th conv layer of the stages in
  ``nl_stages``. The stages halve the resolution (28 -> 14 -> 7), so the blocks see 196 and 49 positions.

All sub-sample phi and g by 2x2 max-pooling (section 3.3), which shrinks the keys 4x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitlab._registry import get_variant, register_architecture, register_model
from vitlab.errors import VitlabError
from vitlab.layers import NonLocalBlock
from vitlab.layers.non_local import MODES, PairwiseFn
from vitlab.models._features import stage_intermediates
from vitlab.models._head import image_cfg, record_num_classes, zero_classifier
from vitlab.models.resnet import INSERT_LAYERS

PAPER = "Wang et al., Non-local Neural Networks, CVPR 2018 (arXiv:1711.07971)"


def conv_bn_relu(in_chs: int, out_chs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False),  # BN carries the bias
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


@register_architecture
class NonLocalNet(nn.Module):
    arch = "nonlocal_cnn"
    head_names = ("head",)

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 2),
        nl_stages: Sequence[int] = (1, 2),
        nl_every: int = 2,
        nl_mode: PairwiseFn = "embedded_gaussian",
        nl_sub_sample: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise VitlabError(f"widths {tuple(widths)} and depths {tuple(depths)} must name the same stages")
        if nl_mode not in MODES:
            raise VitlabError(f"unknown non-local pairwise function {nl_mode!r}; choose from {', '.join(MODES)}")
        if any(not 0 <= s < len(depths) for s in nl_stages):
            raise VitlabError(f"nl_stages {tuple(nl_stages)} must index the {len(depths)} stages")
        self.num_classes = num_classes  # img_size only sets default_cfg: the network takes any size
        self.stem = conv_bn_relu(in_chans, widths[0])
        # (stage, layer) after which a non-local block goes: every nl_every-th layer, counting from 1
        where = [(i, j) for i in nl_stages for j in range(depths[i]) if j % nl_every == nl_every - 1]
        dpr = iter([drop_path_rate * n / max(len(where) - 1, 1) for n in range(len(where))])
        stages, in_chs = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            for j in range(depth):
                layers.append(conv_bn_relu(in_chs, width, stride=2 if i > 0 and j == 0 else 1))
                in_chs = width
                if (i, j) in where:
                    layers.append(
                        NonLocalBlock(width, dim=2, mode=nl_mode, sub_sample=nl_sub_sample, drop_path=next(dpr))
                    )
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = zero_classifier(self.num_features, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal convolutions (fan-out, as ResNets) and unit BatchNorm; each non-local block keeps its own
        initialisation (identity at insertion), the classifier its zeros (`zero_classifier`)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, NonLocalBlock):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's map [B, widths[-1], H / 2^(stages-1), W / 2^(stages-1)]."""
        return self.stages(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The stage maps [B, C_i, H_i, W_i] (see `vitlab.models._features`); ``norm`` has nothing to apply."""
        return stage_intermediates(self.stem(x), self.stages, indices, intermediates_only)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pooling
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = zero_classifier(self.num_features, num_classes, device=self.stem[0].weight.device)
        record_num_classes(self, num_classes)


# --- registered variants -------------------------------------------------------------------------------------
def _add_variant(img: int, in_chans: int) -> None:
    name = f"nonlocal_cnn_tiny_{img}"
    kwargs = {"img_size": img, "in_chans": in_chans, "num_classes": 10, "widths": (32, 64, 128), "depths": (2, 2, 2)}

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return NonLocalNet, kwargs, image_cfg(img, in_chans, num_classes=10, paper=PAPER)

    variant.__name__ = name
    variant.__doc__ = (
        f"A 3x3 stem and six 3x3 conv layers (32-64-128 channels) at {img}x{img}, {in_chans}-channel input, with "
        "embedded-gaussian non-local blocks (sub-sampled) after the second layer of the last two stages."
    )
    register_model(variant)


_add_variant(28, 1)  # Fashion-MNIST, MNIST
_add_variant(32, 3)  # CIFAR


# --- non-local ResNets, through vitlab.models.resnet's insert points ---------------------------------------------
INSERT_LAYERS["nonlocal"] = NonLocalBlock  # ResNet(insert_layer="nonlocal") builds NonLocalBlock(width, **kwargs)


def _add_resnet_variant(name: str, base: str, insert_after: list[list[int]], doc: str) -> None:
    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        cls, kwargs, cfg = get_variant(base)
        kwargs.update(insert_layer="nonlocal", insert_after=insert_after, insert_kwargs={"sub_sample": True})
        return cls, kwargs, {**cfg, "paper": PAPER}

    variant.__name__ = name
    variant.__doc__ = doc
    register_model(variant)


_add_resnet_variant(
    "resnet50_nonlocal",
    "resnet50",
    [[], [0, 2], [0, 2, 4], []],
    "ResNet-50 with Wang et al.'s 5 embedded-gaussian non-local blocks: after blocks 0 and 2 of res3 (layer2), "
    "0, 2 and 4 of res4 (layer3).",
)
for _img in (28, 32):
    _add_resnet_variant(
        f"resnet18_nonlocal_{_img}",
        f"resnet18_{_img}",
        [[], [0], [0], []],
        f"ResNet-18 (small-image stem) at {_img}x{_img} with a non-local block after the first block of layer2 and "
        "of layer3.",
    )
