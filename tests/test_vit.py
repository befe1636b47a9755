from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.stats import count_params, model_stats

PAPER_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


@pytest.mark.parametrize(("name", "count"), PAPER_COUNTS.items())
def test_parameter_counts(name: str, count: int) -> None:
    assert model_stats(name)["params"] == count


def test_vit_b16_flops() -> None:
    # 12 layers x (4 N D^2 + 2 N^2 D + 8 N D^2) multiply-adds + patch embedding + head, N = 197, D = 768
    N, D = 197, 768
    macs = 12 * (12 * N * D * D + 2 * N * N * D) + 196 * 768 * 768 + 768 * 1000
    assert model_stats("vit_base_patch16_224")["gflops"] == pytest.approx(2 * macs / 1e9, rel=1e-6)


def small(**kw) -> torch.nn.Module:
    args = {"embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 6, "img_size": 16, "patch_size": 4}
    return vitlab.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def test_sequence_layout_follows_eq1() -> None:
    m = small()
    x = torch.randn(2, 3, 16, 16)
    z0 = m._pos_embed(m.patch_embed(x))
    assert z0.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(z0[:, 0], (m.cls_token + m.pos_embed[:, :1])[0].expand(2, -1))
    # y = LN(z_L^0): the head sees the normalised class token
    tokens = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens[:, 0])


def test_global_average_pooling_without_class_token() -> None:
    m = small(class_token=False, global_pool="avg")
    x = torch.randn(2, 3, 16, 16)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens.mean(1))
    with pytest.raises(vitlab.VitlabError, match="needs class_token"):
        small(class_token=False, global_pool="token")


def test_pre_training_head_has_one_tanh_hidden_layer() -> None:
    m = small(head_hidden_dim=20)
    feats = m.forward_head(m.forward_features(torch.randn(2, 3, 16, 16)), pre_logits=True)
    assert feats.shape == (2, 20) and m.num_features == 20
    assert feats.abs().max() <= 1  # tanh
    assert isinstance(m.pre_logits.act, torch.nn.Tanh)


@pytest.mark.parametrize("chans", [1, 4])
def test_any_number_of_channels(chans: int) -> None:
    m = small(in_chans=chans)
    assert m(torch.randn(2, chans, 16, 16)).shape == (2, 6)


def test_sincos_position_embedding_is_fixed() -> None:
    m = small(pos_embed="sincos")
    assert not m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(32))


def test_dynamic_img_size_runs_on_any_divisible_size() -> None:
    m = small(dynamic_img_size=True)
    for h, w in [(16, 16), (8, 24), (32, 20)]:
        assert m(torch.randn(1, 3, h, w)).shape == (1, 6)
    # at the native size it computes exactly what the static model computes
    static = small()
    static.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m(x), static(x))


def test_set_input_size_resamples_once() -> None:
    m = small()
    m.set_input_size(24)
    assert m.pos_embed.shape == (1, 1 + 36, 32)
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 6)
    assert m.default_cfg["input_size"] == (3, 24, 24)
    with pytest.raises(vitlab.VitlabError, match="differs from the model's"):
        m(torch.randn(1, 3, 16, 16))


def test_stochastic_depth_rates_grow_linearly() -> None:
    m = small(depth=5, drop_path_rate=0.4)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(m(x), m(x))  # no randomness at evaluation


def test_unknown_names_and_arguments_are_one_line_errors() -> None:
    with pytest.raises(vitlab.VitlabError, match="Did you mean: vit_base_patch16_224"):
        vitlab.create_model("vit_base_patch16_244")
    with pytest.raises(vitlab.VitlabError, match="embed_dimm"):
        vitlab.create_model("vit_tiny_patch4_28", embed_dimm=3)


def test_count_params_trainable_only() -> None:
    m = small(pos_embed="sincos")
    assert count_params(m) - count_params(m, trainable_only=True) == m.pos_embed.numel()
