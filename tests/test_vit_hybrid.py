"""R50+ViT hybrid: timm's parameter count, tokens from the stride-16 map, the BiT backbone's pieces (weight
standardisation, TF "SAME" padding), parity with HF's DPT-hybrid encoder (a BiT backbone + ViT), timm state dicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vitlab
from conftest import move_off_init, tiny_overrides
from vitlab.layers import MaxPool2dSame, StdConv2d, pad_same
from vitlab.models.vit import convert_hf_encoder_layers
from vitlab.models.vit_hybrid import HybridEmbed, HybridVisionTransformer
from vitlab.stats import count_params


def params(name: str) -> int:
    with torch.device("meta"):  # model_stats would also count FLOPs: seconds for R50 at 384
        return count_params(vitlab.create_model(name))


def test_parameter_count_as_timm_builds_it() -> None:
    assert params("vit_base_r50_s16_384") == 98_950_952
    # at 224 only the position table is shorter: (1 + 14^2) instead of (1 + 24^2) rows of 768
    assert 98_950_952 - params("vit_base_r50_s16_224") == (24**2 - 14**2) * 768


def test_r50_structure() -> None:
    with torch.device("meta"):
        m = vitlab.create_model("vit_base_r50_s16_384")
    assert isinstance(m, vitlab.models.VisionTransformer) and isinstance(m.patch_embed, HybridEmbed)
    backbone = m.patch_embed.backbone
    assert [len(s.blocks) for s in backbone.stages] == [3, 4, 9]
    assert [s.blocks[0].conv3.out_channels for s in backbone.stages] == [256, 512, 1024]
    assert [s.blocks[0].conv2.stride for s in backbone.stages] == [(1, 1), (2, 2), (2, 2)]  # stride on the 3x3
    stem = backbone.stem
    assert stem.conv.kernel_size == (7, 7) and stem.conv.stride == (2, 2) and stem.conv.in_channels == 3
    assert (stem.pool.kernel_size, stem.pool.stride) == (3, 2)
    convs = [mod for mod in backbone.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert all(isinstance(c, StdConv2d) and c.bias is None and c.eps == 1e-8 for c in convs)
    norms = [mod for mod in backbone.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 for n in norms)
    assert m.patch_embed.proj.kernel_size == (1, 1) and m.patch_embed.proj.in_channels == 1024  # 1x1 "patches"
    assert m.patch_embed.patch_size == (16, 16) and m.patch_embed.grid_size == (24, 24)
    x = torch.empty(1, 3, 384, 384, device="meta")
    assert m.forward_features(x).shape == (1, 1 + 24 * 24, 768)


def tiny(**kw) -> HybridVisionTransformer:
    return move_off_init(
        vitlab.create_model("vit_base_r50_s16_384", **{**tiny_overrides("vit_base_r50_s16_384"), **kw})
    )


@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 80), (64, 32), (112, 16)])
def test_token_count_is_the_stride_16_grid(h: int, w: int) -> None:
    m = tiny(dynamic_img_size=True).eval()
    tokens = m.forward_features(torch.randn(2, 3, h, w))
    assert tokens.shape == (2, 1 + (h // 16) * (w // 16), 32)
    fixed = tiny(img_size=(h, w))
    assert fixed.patch_embed.num_patches == (h // 16) * (w // 16)
    assert fixed.pos_embed.shape[1] == 1 + (h // 16) * (w // 16)


def test_small_variants_give_a_7x7_and_8x8_grid() -> None:
    for name, grid in [("vit_tiny_r11_s4_28", 7), ("vit_tiny_r11_s4_32", 8)]:
        with torch.device("meta"):
            m = vitlab.create_model(name)
        x = torch.empty(1, *m.default_cfg["input_size"], device="meta")
        assert m.patch_embed.grid_size == (grid, grid)
        assert m.forward_features(x).shape == (1, 1 + grid * grid, 192)


def test_image_size_must_be_a_multiple_of_the_stride() -> None:
    with pytest.raises(vitlab.VitlabError, match="not divisible by the backbone's stride"):
        tiny(img_size=40)


# --- the BiT backbone's layers ------------------------------------------------------------------------------------
def test_std_conv_standardises_each_filter() -> None:
    conv = StdConv2d(4, 6, 3, eps=1e-8)
    torch.nn.init.normal_(conv.weight, mean=0.3, std=2.0)
    w = conv.standardized_weight().reshape(6, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(1, correction=0), torch.ones(6), atol=1e-5, rtol=0)
    # so the convolution ignores an affine change of any filter's weights
    x = torch.randn(2, 4, 9, 9)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(6, 1, 1, 1) * 5 + 0.1).add_(torch.randn(6, 1, 1, 1))
    torch.testing.assert_close(conv(x), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [7, 8, 15, 16, 33])
@pytest.mark.parametrize(("kernel", "stride"), [(7, 2), (3, 2), (1, 2), (3, 1)])
def test_same_padding_gives_ceil_of_size_over_stride(size: int, kernel: int, stride: int) -> None:
    conv = StdConv2d(2, 3, kernel, stride=stride, padding="same")
    assert conv(torch.randn(1, 2, size, size)).shape[-2:] == (math.ceil(size / stride),) * 2
    # TF puts the odd pixel of padding after the image: an even input to a 3x3 / 2 layer is padded (0, 1)
    padded = pad_same(torch.ones(1, 1, 8, 8), 3, 2)
    assert padded.shape[-2:] == (9, 9) and padded[0, 0, :8, :8].eq(1).all()
    assert padded[0, 0, 8].eq(0).all() and padded[0, 0, :, 8].eq(0).all()


def test_same_max_pool_never_picks_the_padding() -> None:
    x = -torch.rand(1, 2, 8, 8) - 1  # all negative: a zero-padded pool would return 0 at the border
    y = MaxPool2dSame(3, 2)(x)
    assert y.shape[-2:] == (4, 4) and (y < -1).all()
    torch.testing.assert_close(y[..., :3, :3], F.max_pool2d(x, 3, 2)[..., :3, :3])


# --- parity with HF's DPT-hybrid encoder: the same BiT backbone + 1x1 projection + ViT --------------------------
transformers = pytest.importorskip("transformers")


def hf_dpt_hybrid_to_vitlab(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    backbone = {}
    rest = {}
    for k, v in raw.items():
        if k.startswith("embeddings.backbone.bit."):
            k = k.removeprefix("embeddings.backbone.bit.")
            k = k.replace("embedder.convolution.", "stem.conv.").replace("embedder.norm.", "stem.norm.")
            k = k.replace("encoder.stages.", "stages.").replace(".layers.", ".blocks.")
            backbone["patch_embed.backbone." + k] = v
        else:
            rest[k] = v
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    return {**backbone, **convert_hf_encoder_layers(rest, simple)}


@pytest.mark.parametrize(("img", "depths"), [(32, (1, 1, 1)), (64, (2, 1, 2))])
def test_parity_with_hf_dpt_hybrid_encoder(img: int, depths: tuple[int, ...]) -> None:
    from transformers import DPTConfig, DPTModel

    widths = (16, 32, 64)
    bit = {
        "depths": list(depths),
        "hidden_sizes": list(widths),
        "embedding_size": 8,
        "num_groups": 4,
        "layer_type": "bottleneck",
        "global_padding": "same",
        "embedding_dynamic_padding": True,
        "out_features": ["stage1", "stage2", "stage3"],
    }
    cfg = DPTConfig(
        is_hybrid=True,
        backbone_config=bit,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=img,
        patch_size=16,
        backbone_featmap_shape=[1, widths[-1], img // 16, img // 16],
    )
    hf = DPTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # off HF's initialisation everywhere: zero biases and unit norms hide mapping errors
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = HybridVisionTransformer(
        img_size=img,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        norm_eps=cfg.layer_norm_eps,
        backbone_layers=depths,
        backbone_widths=widths,
        backbone_stem_width=8,
        backbone_groups=4,
    ).eval()
    ours.load_state_dict(hf_dpt_hybrid_to_vitlab(hf.state_dict()))
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        got = ours.forward_features(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --- timm state dicts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_base_r50_s16_384", "vit_tiny_r11_s4_32"])
def test_timm_state_dict_loads_as_a_hybrid(name: str, tmp_path) -> None:
    # timm's names are ours: a state dict of our model is one of timm's
    overrides = {**tiny_overrides(name), "num_heads": 1, "backbone_groups": 32}  # groups: what timm's BiT has
    overrides["backbone_stem_width"] = 32
    overrides["backbone_widths"] = tuple(128 * 2**i for i in range(len(overrides["backbone_widths"])))
    overrides["img_size"] = 2 * overrides["img_size"]
    m = move_off_init(vitlab.create_model(name, **overrides)).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "timm.safetensors")
    loaded = vitlab.from_pretrained(tmp_path / "timm.safetensors", num_heads=1)  # the weights do not say it
    assert isinstance(loaded, HybridVisionTransformer)  # not taken for a plain ViT, whose keys it also has
    assert loaded.init_kwargs["img_size"] == list(m.patch_embed.img_size)
    x = torch.randn(2, *m.default_cfg["input_size"])
    torch.testing.assert_close(loaded(x), m(x), atol=1e-5, rtol=1e-5)
    # fine-tuning at another resolution resamples the position table over the stride-16 grid
    h = m.patch_embed.img_size[0] * 2
    bigger = vitlab.from_pretrained(tmp_path / "timm.safetensors", img_size=h, num_heads=1)
    assert bigger.pos_embed.shape[1] == 1 + (h // m.patch_embed.patch_size[0]) ** 2
    assert bigger(torch.randn(1, m.patch_embed.in_chans, h, h)).shape == (1, 5)
