"""CvT: parity with HF transformers (BatchNorm statistics included), parameter counts, and the properties the paper
defines (squeezed key/value projection, class token only in the last stage, no position embedding)."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
from conftest import move_off_init, tiny_model
from vitlab.layers import record_attention
from vitlab.stats import model_stats

transformers = pytest.importorskip("transformers")
from transformers import CvtConfig, CvtForImageClassification, CvtModel  # noqa: E402

COUNTS = {"cvt_13_224": 19_997_480, "cvt_21_224": 31_622_696}


@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_parameter_counts(name: str, count: int) -> None:
    assert model_stats(name)["params"] == count


def test_w24_parameter_count_matches_hf() -> None:
    cfg = CvtConfig(embed_dim=[192, 768, 1024], num_heads=[3, 12, 16], depth=[2, 2, 20], num_labels=1000)
    with torch.device("meta"):
        hf = CvtForImageClassification(cfg)
    assert model_stats("cvt_w24_384")["params"] == sum(p.numel() for p in hf.parameters())


def hf_cvt(cls, chans: int = 3, labels: int = 7, **kw):
    # HF indexes its per-stage drop-path list by the stage number, so stage i needs at least i + 1 blocks
    args = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3], "num_channels": chans, **kw}
    model = cls(CvtConfig(**args, num_labels=labels)).eval()
    # every weight and BatchNorm running statistic off its initialisation, so that each mapping is exercised
    return move_off_init(model, std=0.1)


@pytest.mark.parametrize(
    ("size", "chans", "kw"),
    [
        ((32, 32), 3, {}),
        ((48, 48), 3, {}),
        ((36, 52), 3, {}),  # odd maps (9x13 -> 5x7 -> 3x4): stride-2 keys and values round up
        ((28, 28), 1, {"patch_sizes": [3, 3, 3], "patch_stride": [2, 2, 2], "patch_padding": [1, 1, 1]}),
        ((32, 40), 3, {"qkv_bias": [False] * 3, "mlp_ratio": [2.0, 3.0, 4.0]}),
        ((32, 32), 3, {"cls_token": [False, False, False]}),  # average pooling of the normalised tokens
    ],
)
def test_hf_cvt_for_image_classification_parity(size, chans, kw, tmp_path) -> None:
    hf = hf_cvt(CvtForImageClassification, chans, **kw)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(3, chans, *size)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        logits = ours(x)
        maps = ours.forward_intermediates(x, intermediates_only=True)
    assert out.logits.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    for got, expected in zip(maps, out.hidden_states, strict=True):  # per-stage maps, class token left out
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_hf_cvt_model_parity(tmp_path) -> None:
    """A bare CvtModel has neither the final LayerNorm nor a classifier: the tokens are HF's last map with the class
    token in front, and the pre-logits are the class token."""
    hf = hf_cvt(CvtModel)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = hf(pixel_values=x)
        tokens = ours.forward_features(x)
        pooled = ours(x)
    B, D, H, W = out.last_hidden_state.shape
    expected = torch.cat([out.cls_token_value, out.last_hidden_state.flatten(2).transpose(1, 2)], dim=1)
    assert tokens.shape == (B, 1 + H * W, D)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.cls_token_value[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [384, {"shortest_edge": 384}])
def test_hf_cvt_preprocessor_sets_input_size_and_normalisation(size, tmp_path) -> None:
    """CvT's published directories carry a ConvNeXt-style preprocessor: one side (an int in the published files, a
    ``shortest_edge`` dict when saved by current transformers) and ImageNet statistics."""
    hf_cvt(CvtForImageClassification).save_pretrained(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pre = {"image_processor_type": "ConvNextImageProcessor", "size": size, "image_mean": mean, "image_std": std}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    ours = vitlab.from_pretrained(tmp_path)
    assert tuple(ours.default_cfg["input_size"]) == (3, 384, 384)
    assert tuple(ours.default_cfg["mean"]) == tuple(mean) and tuple(ours.default_cfg["std"]) == tuple(std)


def test_hf_cvt_unsupported_projection_is_one_line_error(tmp_path) -> None:
    cfg = CvtConfig(embed_dim=[8, 8, 8], num_heads=[1, 1, 1], depth=[1, 2, 3], stride_q=[1, 1, 2])
    hf = CvtForImageClassification(cfg)
    hf.save_pretrained(tmp_path)
    with pytest.raises(vitlab.VitlabError, match="stride_q"):
        vitlab.from_pretrained(tmp_path)


@pytest.mark.parametrize("size", [(32, 32), (64, 96)])  # even maps at every stage
def test_keys_and_values_are_a_quarter_of_the_queries(size) -> None:
    """Section 3.2.2: stride-2 key and value projections squeeze their sequence 4x; the class token is kept whole."""
    model = move_off_init(tiny_model("cvt_13_224", global_pool="token")).eval()
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(2, 3, *size))
    assert len(maps) == sum(len(s.blocks) for s in model.stages)
    for name, (attn,) in maps.items():
        prefix = model.stages[int(name.split(".")[1])].num_prefix_tokens
        N, M = attn.shape[-2:]  # (B, h, N, M): queries x keys
        assert (N - prefix) == 4 * (M - prefix), name
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


def test_class_token_last_stage_only_and_any_input_size() -> None:
    """No position embedding: a model built for 32x32 runs at other sizes, its last stage one token per 16x16
    pixels after the class token."""
    model = move_off_init(tiny_model("cvt_13_224", global_pool="token")).eval()
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    for h, w in [(32, 32), (64, 48), (80, 112)]:
        with torch.no_grad():
            tokens = model.forward_features(torch.randn(1, 3, h, w))
            assert tokens.shape == (1, 1 + (h // 16) * (w // 16), model.num_features)
            assert torch.isfinite(model.forward_head(tokens)).all()
