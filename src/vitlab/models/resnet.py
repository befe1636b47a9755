"""ResNet.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385).

A residual block learns the residual F of the mapping it stands for and adds its input back (section 3.2):

    y = ReLU( F(x, {W_i}) + W_s x )                                                                  (eqs. 1-2)

W_s is the identity, or a 1x1 convolution + BN where the block changes width or resolution (option B of
section 3.3). F is ``basic`` (3x3 conv - BN - ReLU - 3x3 conv - BN; ResNet-18/34, Fig. 5 left) or ``bottleneck``
(1x1 conv reducing to ``planes`` - BN - ReLU - 3x3 conv - BN - ReLU - 1x1 conv expanding to 4 ``planes`` - BN;
ResNet-50/101/152, Fig. 5 right). The network (Table 1): a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool,
four stages conv2_x ... conv5_x (``layer1`` ... ``layer4``) at 64, 128, 256, 512 planes whose first block halves
the resolution (except in the first stage), global average pooling and one fully connected layer ``fc``.

Choices, each documented where it is made:

* **v1.5** (torchvision, timm and the published HF ``microsoft/resnet-50``): a bottleneck that downsamples puts
  its stride on the 3x3 convolution; the paper's v1 puts it on the first 1x1 (``stride_in_1x1=True``, HF's
  ``downsample_in_bottleneck``).
* **zero_init_last=True** (timm's default): the last BN of every residual branch starts with gamma = 0, so each
  block starts as the identity (plus ReLU) and the deep network as a shallow one (Goyal et al., 2017).
* **Small images**: ``stem_type="cifar"`` replaces the 7x7/2 convolution and max-pool by one 3x3 stride-1
  convolution (the CIFAR stem of section 4.2, at ImageNet widths), so a 28x28 or 32x32 image keeps its resolution
  into ``layer1`` and ends as a 4x4 map instead of 1x1: ``resnet18_28`` (grayscale) and ``resnet18_32`` (RGB).
* **Insert points** for blocks that act on a whole stage's map, such as the non-local block (Wang et al., 2018):
  ``insert_layer`` names a constructor in `INSERT_LAYERS` (called as ``ctor(channels, **insert_kwargs)``) and
  ``insert_after`` lists, per stage, the blocks after which one is inserted. It becomes a child ``extra<j>`` of
  the stage's nn.Sequential, so block names, hence timm weights, are unchanged. A ``resnet50_nonlocal`` is then
  ``INSERT_LAYERS["nonlocal"] = NonLocalBlock`` plus a variant with ``insert_layer="nonlocal",
  insert_after=[[], [0, 2], [0, 2, 4], []]`` (Wang et al.'s 5 blocks: every other residual block of res3 and
  res4). Inserted modules keep their own initialisation.

Parameter names are timm's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``), so timm
ResNet state dicts load as they are.

Channels-last: ``model.to(memory_format=torch.channels_last)`` with channels-last inputs keeps that layout from
the stem to the pooled features (tested), the layout cuDNN and oneDNN convolutions prefer; whether it pays is for
benchmarks/throughput.py to say. (torch 2.13's oneDNN CPU backward of a channels-last 1x1 stride-2 convolution with
2-7 input channels corrupts memory; only toy widths reach it.)
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from vitlab._io import to_jsonable
from vitlab._registry import (
    Converted,
    Exported,
    constructor_args,
    register_architecture,
    register_hf_converter,
    register_hf_exporter,
    register_model,
    register_timm_converter,
    register_timm_exporter,
)
from vitlab.errors import VitlabError
from vitlab.layers import DropPath, drop_path_rates, get_act_layer
from vitlab.models._export import refuse_options
from vitlab.models._features import stage_intermediates
from vitlab.models._head import imagenet_cfg, record_num_classes, zero_classifier
from vitlab.models.vit import hf_act, hf_hidden_act

PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 (arXiv:1512.03385)"

# Modules that ResNet(insert_layer=name) can insert after chosen blocks: name -> ctor(channels, **insert_kwargs).
INSERT_LAYERS: dict[str, Callable[..., nn.Module]] = {}


def _projection(in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    """W_s of eq. 2: None (the identity) where the shapes match, else a strided 1x1 convolution + BN."""
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 5 left); the first carries the stride."""

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        act: str = "relu",
        drop_path: float = 0.0,
        stride_in_1x1: bool = False,  # bottleneck only; accepted so that both blocks share one signature
    ) -> None:
        super().__init__()
        act_layer = get_act_layer(act)
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act_layer()
        self.downsample = _projection(in_chs, planes, stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)  # eq. 2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand x4 (Fig. 5 right); the 3x3 carries the stride (v1.5) unless stride_in_1x1."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        act: str = "relu",
        drop_path: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        act_layer = get_act_layer(act)
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, stride=stride if stride_in_1x1 else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1 if stride_in_1x1 else stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = act_layer()
        self.downsample = _projection(in_chs, out_chs, stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)  # eq. 2


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@register_architecture
class ResNet(nn.Module):
    arch = "resnet"
    head_names = ("fc",)  # the classifier: replaced, not loaded, when a checkpoint has other classes

    def __init__(
        self,
        *,
        block: Literal["basic", "bottleneck"] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
        num_classes: int = 1000,
        stem_width: int = 64,
        stem_type: Literal["imagenet", "cifar"] = "imagenet",
        first_stage_stride: int = 1,
        stride_in_1x1: bool = False,
        act: str = "relu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        insert_layer: str | None = None,
        insert_after: Sequence[Sequence[int]] | None = None,
        insert_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise VitlabError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem_type not in ("imagenet", "cifar"):
            raise VitlabError(f"stem_type must be 'imagenet' or 'cifar', got {stem_type!r}")
        if len(layers) != len(channels):
            raise VitlabError(f"layers {list(layers)} and channels {list(channels)} must name the same stages")
        block_cls = BLOCKS[block]
        self.num_classes = num_classes
        act_layer = get_act_layer(act)

        if stem_type == "imagenet":  # Table 1: 7x7/2 conv, 3x3/2 max-pool -> 1/4 resolution
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        else:  # 3x3/1 conv, no pooling: small images keep their resolution
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = act_layer()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_type == "imagenet" else nn.Identity()

        n = sum(layers)
        dpr = drop_path_rates(drop_path_rate, n)
        self.stage_names: list[str] = []
        in_chs, k = stem_width, 0
        for i, (depth, planes) in enumerate(zip(layers, channels)):
            out_chs = planes * block_cls.expansion
            stage: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(depth):
                stage[str(j)] = block_cls(
                    in_chs if j == 0 else out_chs,
                    planes,
                    stride=(first_stage_stride if i == 0 else 2) if j == 0 else 1,
                    act=act,
                    drop_path=dpr[k],
                    stride_in_1x1=stride_in_1x1,
                )
                k += 1
            in_chs = out_chs
            self.stage_names.append(f"layer{i + 1}")
            self.add_module(self.stage_names[-1], nn.Sequential(stage))
        self.num_features = in_chs
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = zero_classifier(self.num_features, num_classes)
        self.init_weights(zero_init_last=zero_init_last)
        if insert_layer is not None:  # after init_weights: inserted modules keep their own initialisation
            self._insert(insert_layer, insert_after or [], insert_kwargs or {})
        elif insert_after:
            raise VitlabError("insert_after needs insert_layer, the name of the module to insert")

    def _insert(self, layer: str, after: Sequence[Sequence[int]], kwargs: dict[str, Any]) -> None:
        """Put a new ``INSERT_LAYERS[layer](width, **kwargs)`` as child ``extra<j>`` right after block j of each
        stage listed in ``after``; the blocks keep their names."""
        if layer not in INSERT_LAYERS:
            raise VitlabError(f"unknown insert_layer {layer!r}; registered: {sorted(INSERT_LAYERS) or 'none'}")
        if len(after) != len(self.stage_names):
            raise VitlabError(
                f"insert_after needs one list of block indices per stage ({len(self.stage_names)}), got {after}"
            )
        for name, where in zip(self.stage_names, after):
            stage = self.get_submodule(name)
            if any(not 0 <= j < len(stage) for j in where):
                raise VitlabError(f"insert_after {list(where)} is out of range for the {len(stage)} blocks of {name}")
            width = stage[-1].last_bn().num_features
            children: OrderedDict[str, nn.Module] = OrderedDict()
            for j, block in enumerate(stage):
                children[str(j)] = block
                if j in where:
                    children[f"extra{j}"] = INSERT_LAYERS[layer](width, **kwargs)
            setattr(self, name, nn.Sequential(children))

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """He-normal convolutions (the paper's reference [13]; fan-out as torchvision / timm), unit BN and, if
        asked, a zero gamma in the last BN of each residual branch. The classifier is zero (`zero_classifier`)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    # --- forward --------------------------------------------------------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's map [B, num_features, H/32, W/32] (H, W with the cifar stem)."""
        x = self.stem(x)
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The output maps [B, C, H, W] of the chosen stages (see `vitlab.models._features`; the stem is not a
        stage, and ``norm`` has nothing to apply: ResNet has no final norm)."""
        stages = [self.get_submodule(name) for name in self.stage_names]
        return stage_intermediates(self.stem(x), stages, indices, intermediates_only)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pooling: (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = zero_classifier(self.num_features, num_classes, device=self.conv1.weight.device)
        record_num_classes(self, num_classes)


# --- checkpoint converters: HF transformers and timm names -> ours ---------------------------------------------
def fill_bn_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add BatchNorm's ``num_batches_tracked`` where a checkpoint lacks it (torchvision-era files); it only
    matters for cumulative-average BN (momentum=None), which vitlab does not use."""
    for k in list(state):
        if k.endswith(".running_mean"):
            state.setdefault(k.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return state


_HF_STAGE = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")


def convert_hf_resnet_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ResNetModel`` / ``ResNetForImageClassification`` names -> timm's (ours)."""
    out: dict[str, torch.Tensor] = {}
    for key, v in raw.items():
        k = key.removeprefix("resnet.")
        if k.startswith("embedder.embedder."):
            name = k.removeprefix("embedder.embedder.")
            out[name.replace("convolution.", "conv1.").replace("normalization.", "bn1.")] = v
        elif k.startswith("classifier.1."):  # nn.Sequential(Flatten, Linear)
            out["fc." + k.removeprefix("classifier.1.")] = v
        elif m := _HF_STAGE.match(k):
            stage, blk, rest = int(m.group(1)), m.group(2), m.group(3)
            rest = rest.replace("shortcut.convolution.", "downsample.0.")
            rest = rest.replace("shortcut.normalization.", "downsample.1.")
            # layer.{i}.convolution / layer.{i}.normalization -> conv{i+1} / bn{i+1}
            rest = re.sub(r"^layer\.(\d)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", rest)
            rest = re.sub(r"^layer\.(\d)\.normalization\.", lambda g: f"bn{int(g.group(1)) + 1}.", rest)
            out[f"layer{stage + 1}.{blk}.{rest}"] = v
        else:
            raise VitlabError(f"HF checkpoint parameter {key!r} has no vitlab counterpart")
    return fill_bn_counters(out)


@register_hf_converter("resnet")
def convert_hf_resnet(config: dict[str, Any], raw: dict[str, torch.Tensor]) -> Converted:
    """HF ``ResNetForImageClassification`` directory (e.g. microsoft/resnet-50: bottleneck, v1.5, no downsampling
    in the first stage) -> ResNet arguments and state."""
    state = convert_hf_resnet_state(raw)
    block = config.get("layer_type", "bottleneck")
    if block not in BLOCKS:
        raise VitlabError(f"layer_type {block!r} is not a ResNet block vitlab knows ('basic', 'bottleneck')")
    expansion = BLOCKS[block].expansion
    kwargs = {
        "block": block,
        "layers": list(config.get("depths", [3, 4, 6, 3])),
        "channels": [h // expansion for h in config.get("hidden_sizes", [256, 512, 1024, 2048])],
        "in_chans": config.get("num_channels", 3),
        "num_classes": state["fc.weight"].shape[0] if "fc.weight" in state else 0,
        "stem_width": config.get("embedding_size", 64),
        "first_stage_stride": 2 if config.get("downsample_in_first_stage", False) else 1,
        "stride_in_1x1": bool(config.get("downsample_in_bottleneck", False)),
        "act": hf_act({**config, "hidden_act": config.get("hidden_act", "relu")}),
    }
    return Converted("resnet", state, kwargs, _cfg(224, kwargs["in_chans"]))


def _is_timm_resnet(state: dict[str, torch.Tensor]) -> bool:
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


@register_timm_converter(_is_timm_resnet)
def convert_timm_resnet(state: dict[str, torch.Tensor], declared: dict[str, Any]) -> Converted:
    """timm's ResNet names are ours: only the constructor arguments are read off the tensor shapes."""
    for key, what in (("layer1.0.se.fc1.weight", "squeeze-excitation"), ("layer2.0.downsample.2.weight", "ResNet-D")):
        if key in state:
            raise VitlabError(f"timm {what} ResNets (parameter {key!r}) are not supported by vitlab yet")
    kwargs = infer_resnet_args(state)
    return Converted("resnet", fill_bn_counters(dict(state)), kwargs, _cfg(224, kwargs["in_chans"]))


def infer_resnet_args(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ResNet arguments from a timm-named state dict. A 3x3 stem is taken for the cifar stem (stride 1, no
    max-pool); the stride placement (v1 / v1.5) cannot be seen in shapes and is timm's v1.5."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"layer(\d+)\.(\d+)\.", k))})
    layers = [1 + max(int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))) for s in stages]
    w = state["conv1.weight"]  # (stem_width, C, k, k)
    return {
        "block": "bottleneck" if "layer1.0.conv3.weight" in state else "basic",
        "layers": layers,
        "channels": [state[f"layer{s}.0.conv1.weight"].shape[0] for s in stages],
        "in_chans": w.shape[1],
        "num_classes": state["fc.weight"].shape[0] if "fc.weight" in state else 0,
        "stem_width": w.shape[0],
        "stem_type": "cifar" if w.shape[-1] == 3 else "imagenet",
    }


# --- checkpoint exporters: ours -> HF transformers and timm names ----------------------------------------------
# options HF's and timm's ResNets build one way: the 7x7 / 2 stem with max-pool, no inserted modules; timm also
# strides the first stage by 1 and a bottleneck on its 3x3 convolution
RESNET_FIXED = {"stem_type": "imagenet", "insert_layer": None}
TIMM_RESNET_FIXED = {**RESNET_FIXED, "first_stage_stride": 1, "stride_in_1x1": False}


def _export_hf_resnet_key(k: str) -> str:
    """One of our (timm's) ResNet names -> HF's (the inverse of `convert_hf_resnet_state`)."""
    if m := re.match(r"(conv1|bn1)\.(.+)$", k):
        return f"resnet.embedder.embedder.{'convolution' if m.group(1) == 'conv1' else 'normalization'}.{m.group(2)}"
    if k.startswith("fc."):
        return "classifier.1." + k.removeprefix("fc.")  # HF's classifier is nn.Sequential(Flatten, Linear)
    if m := re.match(r"layer(\d+)\.(\d+)\.(.+)$", k):
        rest = (
            m.group(3)
            .replace("downsample.0.", "shortcut.convolution.")
            .replace("downsample.1.", "shortcut.normalization.")
        )
        rest = re.sub(r"^conv(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.convolution.", rest)
        rest = re.sub(r"^bn(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.normalization.", rest)
        return f"resnet.encoder.stages.{int(m.group(1)) - 1}.layers.{m.group(2)}.{rest}"
    raise VitlabError(f"parameter {k!r} has no HF ResNet counterpart")


@register_hf_exporter("resnet")
def export_hf_resnet(model: nn.Module) -> Exported:
    """ResNet -> HF ``ResNetForImageClassification``."""
    args = constructor_args(model)
    refuse_options(args, RESNET_FIXED, "HF transformers' ResNet")
    refuse_options(args, {"first_stage_stride": (1, 2)}, "HF transformers' ResNet")
    expansion = BLOCKS[args["block"]].expansion
    config = {
        "model_type": "resnet",
        "architectures": ["ResNetForImageClassification"],
        "num_channels": args["in_chans"],
        "embedding_size": args["stem_width"],
        "hidden_sizes": [c * expansion for c in args["channels"]],
        "depths": list(args["layers"]),
        "layer_type": args["block"],
        "hidden_act": hf_hidden_act(args["act"]),
        "downsample_in_first_stage": args["first_stage_stride"] == 2,
        "downsample_in_bottleneck": bool(args["stride_in_1x1"]),
    }
    state = {_export_hf_resnet_key(k): v for k, v in model.state_dict().items()}
    return Exported(state, to_jsonable(config))


@register_timm_exporter("resnet")
def export_timm_resnet(model: nn.Module) -> Exported:
    """ResNet -> timm's ResNet (the names are the same). timm takes the block type from the architecture name."""
    args = constructor_args(model)
    refuse_options(args, TIMM_RESNET_FIXED, "timm's ResNet")
    model_args = {
        "layers": list(args["layers"]),
        "channels": list(args["channels"]),
        "in_chans": args["in_chans"],
        "num_classes": model.num_classes,
        "stem_width": args["stem_width"],
        **({"act_layer": args["act"]} if args["act"] != "relu" else {}),
    }
    config = {
        "architecture": "resnet50" if args["block"] == "bottleneck" else "resnet18",
        "model_args": to_jsonable(model_args),
        "pretrained_cfg": {"first_conv": "conv1", "classifier": "fc"},
    }
    return Exported(dict(model.state_dict()), config)


# --- registered variants -------------------------------------------------------------------------------------
# name -> (block, blocks per stage), Table 1
_DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _cfg(img_size: int, in_chans: int = 3, **extra: Any) -> dict[str, Any]:
    return imagenet_cfg(img_size, in_chans, PAPER, **extra)


def _add_variant(name: str, depth: str, img: int = 224, in_chans: int = 3, num_classes: int = 1000) -> None:
    block, layers = _DEPTHS[depth]
    small = img < 64
    kwargs = {
        "block": block,
        "layers": layers,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "stem_type": "cifar" if small else "imagenet",
    }
    cfg = _cfg(img, in_chans, num_classes=num_classes)

    def variant() -> tuple[type[nn.Module], dict[str, Any], dict[str, Any]]:
        return ResNet, kwargs, cfg

    variant.__name__ = name
    stem = "3x3/1 stem, no max-pool" if small else "7x7/2 stem and max-pool"
    variant.__doc__ = f"ResNet-{depth[6:]} ({block} blocks {list(layers)}, {stem}) at {img}x{img}."
    register_model(variant)


for _name in _DEPTHS:
    _add_variant(_name, _name)
# Small inputs for CPU training: 28x28 grayscale (MNIST, Fashion-MNIST) and 32x32 RGB (CIFAR), 10 classes.
_add_variant("resnet18_28", "resnet18", 28, in_chans=1, num_classes=10)
_add_variant("resnet18_32", "resnet18", 32, in_chans=3, num_classes=10)
