"""The CNN baselines: ResNet and ConvNeXt parity with HF transformers (random weights, BatchNorm statistics moved
off their initialisation), timm-named state dicts, parameter counts, channels-last, and what each paper defines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlab
from conftest import move_off_init, tiny_model
from vitlab.models import resnet
from vitlab.stats import model_stats

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
)

LABELS = {"num_labels": 7, "id2label": {i: f"c{i}" for i in range(7)}, "label2id": {f"c{i}": i for i in range(7)}}


def hf_model(cls, config):
    model = cls(config).eval()
    move_off_init(model, std=0.1)  # weights, BN gamma / beta and running mean / var all away from init
    return model


def assert_parity(hf, ours, x, atol=1e-4):
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = ours(x)
    assert expected.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)


# --- ResNet ------------------------------------------------------------------------------------------------------
# The published microsoft/resnet-50 is v1.5 (its model card: "stride = 2 in the 3x3 convolution"), i.e. HF's defaults
# downsample_in_bottleneck=False and downsample_in_first_stage=False: the first two cases. The last two cover the
# options: the paper's v1 (stride on the first 1x1) and a first stage that downsamples.
RESNET_CASES = {
    "bottleneck_v1.5": dict(layer_type="bottleneck", hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1]),
    "basic_gray": dict(layer_type="basic", hidden_sizes=[8, 16, 32], depths=[1, 2, 1], num_channels=1),
    "bottleneck_v1": dict(layer_type="bottleneck", hidden_sizes=[16, 32], depths=[2, 2], downsample_in_bottleneck=True),
    "basic_first_stride": dict(layer_type="basic", hidden_sizes=[8, 16], depths=[2, 1], downsample_in_first_stage=True),
}


@pytest.mark.parametrize("case", RESNET_CASES)
@pytest.mark.parametrize("size", [(32, 32), (56, 40)])
def test_hf_resnet_parity(case, size, tmp_path) -> None:
    cfg = ResNetConfig(embedding_size=8, **RESNET_CASES[case], **LABELS)
    hf = hf_model(ResNetForImageClassification, cfg)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    assert ours.arch == "resnet" and not ours.training
    assert_parity(hf, ours, torch.randn(2, cfg.num_channels, *size))
    assert ours.pretrained_cfg["class_names"] == [f"c{i}" for i in range(7)]


def test_hf_resnet_model_stage_maps(tmp_path) -> None:
    """A headless ResNetModel: our stage maps are HF's hidden states after the embedder."""
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64], depths=[1, 1, 2], layer_type="bottleneck")
    hf = hf_model(ResNetModel, cfg)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        final, stages = ours.forward_intermediates(x)
        pooled = ours(x)
    assert len(stages) == 3
    for got, expected in zip(stages, out.hidden_states[1:]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, out.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output.flatten(1), atol=1e-4, rtol=1e-4)


def test_timm_resnet_state_dict_round_trip(tmp_path) -> None:
    """Our names are timm's: our state dict is a timm file (here without num_batches_tracked, as older files)."""
    model = move_off_init(vitlab.create_model("resnet18_32", layers=(1, 2), channels=(8, 16), stem_width=8)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet.pth")
    loaded = vitlab.from_pretrained(tmp_path / "resnet.pth")
    assert loaded.arch == "resnet" and loaded.init_kwargs["stem_type"] == "cifar"  # read off the 3x3 conv1
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_resnet_names_are_timms() -> None:
    with torch.device("meta"):
        keys = set(vitlab.create_model("resnet50").state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer2.0.downsample.1.bias",
              "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):  # fmt: skip
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys  # identity shortcuts hold no parameters


def test_timm_resnet_variants_are_rejected_by_name(tmp_path) -> None:
    model = vitlab.create_model("resnet18_32", layers=(1, 1), channels=(8, 8), stem_width=8)
    state = {**model.state_dict(), "layer1.0.se.fc1.weight": torch.zeros(2, 8, 1, 1)}
    torch.save(state, tmp_path / "se.pth")
    with pytest.raises(vitlab.VitlabError, match="squeeze-excitation"):
        vitlab.from_pretrained(tmp_path / "se.pth")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_last_makes_each_block_start_as_identity(name) -> None:
    kw = {"layers": (2, 2), "channels": (4, 8)}
    block = vitlab.create_model(name, **kw).layer2[1]  # identity shortcut: y = ReLU(F(x) + x), F(x) = 0 at init
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(block(x), x.relu(), atol=0, rtol=0)
    other = vitlab.create_model(name, **kw, zero_init_last=False).layer2[1]
    assert not torch.equal(other(x), x.relu())


def test_stem_strides() -> None:
    """Table 1: the 7x7/2 stem and max-pool bring the last map to 1/32 of the input (224 -> 7); the cifar stem
    keeps 28 -> 4 and 32 -> 4 (shapes only, on the meta device)."""
    with torch.device("meta"):
        for name, size, side in (("resnet50", 224, 7), ("resnet18_28", 28, 4), ("resnet18_32", 32, 4)):
            model = vitlab.create_model(name)
            x = torch.empty(1, model.default_cfg["input_size"][0], size, size)
            assert model.forward_features(x).shape[-2:] == (side, side), name
        assert vitlab.create_model("resnet18_32").conv1.kernel_size == (3, 3)


def test_insert_points_keep_block_names(monkeypatch, tmp_path) -> None:
    """A module inserted after chosen blocks (the non-local block's seam) runs there; block names are unchanged."""
    monkeypatch.setitem(resnet.INSERT_LAYERS, "conv1x1", lambda c, bias=True: nn.Conv2d(c, c, 1, bias=bias))
    kw = {"layers": (2, 3), "channels": (4, 8), "stem_width": 8, "num_classes": 5}
    plain = vitlab.create_model("resnet50", **kw)
    model = vitlab.create_model(
        "resnet50", **kw, insert_layer="conv1x1", insert_after=[[], [0, 2]], insert_kwargs={"bias": False}
    ).eval()
    added = set(model.state_dict()) - set(plain.state_dict())
    assert added == {"layer2.extra0.weight", "layer2.extra2.weight"}
    assert model.layer2.extra0.in_channels == 32
    order = []
    for name, m in model.layer2.named_children():
        m.register_forward_hook(lambda *_, name=name: order.append(name))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert order == ["0", "extra0", "1", "2", "extra2"]
    vitlab.save_pretrained(model, tmp_path / "ckpt")
    torch.testing.assert_close(vitlab.from_pretrained(tmp_path / "ckpt")(x), model(x), atol=0, rtol=0)
    with pytest.raises(vitlab.VitlabError, match="out of range"):
        vitlab.create_model("resnet50", **kw, insert_layer="conv1x1", insert_after=[[2], []])
    with pytest.raises(vitlab.VitlabError, match="unknown insert_layer"):
        vitlab.create_model("resnet50", **kw, insert_layer="nope", insert_after=[[], []])


# --- ConvNeXt ----------------------------------------------------------------------------------------------------
CONVNEXT_CASES = {
    "rgb": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 2, 1, 1]),
    "gray_patch2_no_layerscale": dict(
        hidden_sizes=[8, 16, 24],
        depths=[2, 1, 1],
        num_stages=3,
        patch_size=2,
        num_channels=1,
        layer_scale_init_value=0.0,
    ),
}


@pytest.mark.parametrize("case", CONVNEXT_CASES)
@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_hf_convnext_parity(case, size, tmp_path) -> None:
    cfg = ConvNextConfig(drop_path_rate=0.1, **CONVNEXT_CASES[case], **LABELS)
    hf = hf_model(ConvNextForImageClassification, cfg)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    assert ours.arch == "convnext" and ours.head.norm.eps == 1e-12  # HF's final LayerNorm eps
    assert_parity(hf, ours, torch.randn(2, cfg.num_channels, *size))
    assert ours.pretrained_cfg["class_names"] == [f"c{i}" for i in range(7)]


def test_hf_convnext_new_classes_keep_the_final_norm(tmp_path) -> None:
    """The classifier is head.fc only: a new number of classes keeps the pretrained head LayerNorm."""
    cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **LABELS)
    hf = hf_model(ConvNextForImageClassification, cfg)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.head.norm.weight, hf.convnext.layernorm.weight)
        torch.testing.assert_close(
            ours.forward_head(ours.forward_features(x), pre_logits=True), hf.convnext(x).pooler_output, atol=1e-4,
            rtol=1e-4,
        )  # fmt: skip
    assert ours(x).shape == (2, 3) and not ours.head.fc.weight.any()


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_timm_convnext_state_dict_round_trip(conv_mlp, tmp_path) -> None:
    """timm names: LayerScale is ``gamma`` on the block; the conv_mlp variants (atto ... nano) store the MLP as 1x1
    convolutions."""
    model = move_off_init(tiny_model("convnext_atto")).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(".ls.gamma"):
            k = k.replace(".ls.gamma", ".gamma")
        if conv_mlp and ".mlp.fc" in k and k.endswith("weight"):
            v = v[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        state[k] = v
    torch.save(state, tmp_path / "convnext.pth")
    loaded = vitlab.from_pretrained(tmp_path / "convnext.pth")
    assert loaded.arch == "convnext" and list(loaded.init_kwargs["dims"]) == [8, 16]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_convnext_names_are_timms() -> None:
    with torch.device("meta"):
        keys = set(vitlab.create_model("convnext_tiny").state_dict())
    for k in ("stem.0.weight", "stem.1.bias", "stages.1.downsample.0.weight", "stages.3.downsample.1.bias",
              "stages.2.blocks.8.conv_dw.weight", "stages.0.blocks.0.norm.weight", "stages.0.blocks.2.mlp.fc1.weight",
              "stages.0.blocks.2.mlp.fc2.bias", "head.norm.weight", "head.fc.weight"):  # fmt: skip
        assert k in keys, k
    assert not any(k.startswith("stages.0.downsample") for k in keys)  # the stem feeds stage 0 directly


def test_convnext_block_starts_near_identity() -> None:
    """LayerScale gamma = 1e-6 at init: each block adds almost nothing to its input."""
    block = vitlab.create_model("convnext_atto").stages[1].blocks[0]
    x = torch.randn(2, 80, 8, 8)
    assert (block(x) - x).abs().max() < 1e-4
    assert block.ls.gamma.eq(1e-6).all()


def test_convnext_small_inputs_keep_a_spatial_map() -> None:
    for name, chans, size, side in (("convnext_atto_28", 1, 28, 3), ("convnext_atto_32", 3, 32, 4)):
        model = vitlab.create_model(name, depths=(1, 1, 1, 1)).eval()
        assert model.stem[0].kernel_size == (1, 1)
        assert model.forward_features(torch.randn(1, chans, size, size)).shape == (1, 320, side, side)


# --- both --------------------------------------------------------------------------------------------------------
PUBLISHED = {  # exact counts at 1000 classes (torchvision / timm / the brief)
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
}
TIMM_MILLIONS = {"convnext_atto": 3.70, "convnext_femto": 5.22, "convnext_pico": 9.05, "convnext_nano": 15.59}


@pytest.mark.parametrize("name", [*PUBLISHED, *TIMM_MILLIONS])
def test_parameter_counts(name) -> None:
    params = model_stats(name)["params"]
    if name in PUBLISHED:
        assert params == PUBLISHED[name]
    else:  # timm's results table rounds to 10k parameters
        assert round(params / 1e6, 2) == TIMM_MILLIONS[name]


SMALL = {  # 28-pixel variant (10 classes) -> (its 1000-class base, stem parameters of the small one, of the base)
    "resnet18_28": ("resnet18", 64 * 1 * 3 * 3, 64 * 3 * 7 * 7),  # bias-free conv1
    "convnext_atto_28": ("convnext_atto", 40 * 1 * 1 * 1 + 40, 40 * 3 * 4 * 4 + 40),  # stem.0 with bias
}


@pytest.mark.parametrize("small", SMALL)
def test_small_variants_change_only_stem_and_head(small) -> None:
    base, small_stem, base_stem = SMALL[small]
    width = vitlab.create_model(small, num_classes=0).num_features
    head = lambda n: width * n + n  # the linear classifier
    expected = model_stats(base)["params"] - base_stem + small_stem - head(1000) + head(10)
    assert model_stats(small)["params"] == expected


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet18_28", "convnext_atto", "convnext_atto_28"])
def test_channels_last(name) -> None:
    """The models run on channels-last maps (the fast layout for convolutions) and give the same numbers."""
    # widths >= 16: torch 2.13's oneDNN CPU kernel corrupts the heap in the weight gradient of a channels-last 1x1
    # stride-2 convolution with few input channels (a tiny ResNet's downsample): 2 to 7 on AVX2, 2 to 15 on an
    # AVX-512 EPYC (measured 2026-12-01); real widths are >= 64
    wide = {"channels": (16, 32)} if name.startswith("resnet") else {}
    model = move_off_init(tiny_model(name, **wide)).eval()
    x = torch.randn(2, *model.default_cfg["input_size"][:1], 64, 64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    feats = model.forward_features(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)  # no silent fall-back to NCHW on the way
    torch.testing.assert_close(model.forward_head(feats), expected, atol=1e-5, rtol=1e-5)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
