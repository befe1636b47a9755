"""CCT: the paper's parameter counts, the convolutional tokenizer's grid, sequence pooling, the three position
embeddings, the official layer layout, and the official repository's checkpoints."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vitlab
from conftest import move_off_init, tiny_overrides
from vitlab.stats import model_stats

# Hassani et al., Table 2 (CIFAR, 10 classes) and Table 3 (ImageNet, 1000 classes), in millions
PAPER_PARAMS_M = {"cct_2_3x2_32": 0.28, "cct_7_3x1_32": 3.76, "cct_7_3x2_32": 3.85, "cct_14_7x2_224": 22.36}


@pytest.mark.parametrize(("name", "millions"), PAPER_PARAMS_M.items())
def test_parameter_counts_match_the_paper(name: str, millions: float) -> None:
    params = model_stats(name)["params"]
    assert params == pytest.approx(millions * 1e6, rel=0.014)
    assert math.floor(params / 1e4) == round(millions * 100)  # the table truncates to 0.01M: every digit agrees


def small(**kw) -> nn.Module:
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "conv_width": 8, "num_classes": 4}
    return move_off_init(vitlab.create_model("cct_7_3x2_32", **{**args, **kw})).eval()


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("cct_7_3x1_32", (16, 16)),  # 3x3 / 1 conv keeps 32, max-pool halves it
        ("cct_7_3x2_32", (8, 8)),
        ("cct_7_3x2_28", (7, 7)),
        ("cct_7_3x1_28", (14, 14)),
        ("cct_14_7x2_224", (14, 14)),  # (7x7 / 2 conv, pool) twice: 224 / 16
    ],
)
def test_tokenizer_grid(name: str, grid: tuple[int, int]) -> None:
    with torch.device("meta"):
        m = vitlab.create_model(name)
        x = torch.empty(1, *m.default_cfg["input_size"])
        maps = m.patch_embed.conv_layers(x)
    assert m.patch_embed.grid_size == grid == tuple(maps.shape[-2:])
    assert m.forward_features(x).shape == (1, grid[0] * grid[1], m.embed_dim)


def test_tokenizer_layers_are_conv_relu_maxpool_without_bias() -> None:
    with torch.device("meta"):
        m = vitlab.create_model("cct_14_7x2_224")
    layers = list(m.patch_embed.conv_layers)
    assert len(layers) == 2
    widths = [layer[0].out_channels for layer in layers]
    assert widths == [64, 384]  # intermediate layers 64 channels, the last one D
    for conv, act, pool in layers:
        assert conv.bias is None and conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
        assert isinstance(act, nn.ReLU)
        assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)


def test_no_class_token() -> None:
    m = small()
    assert m.num_prefix_tokens == 0 and not hasattr(m, "cls_token")
    assert not any("cls" in n or "class" in n for n, _ in m.named_parameters())
    tokens = m.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, m.patch_embed.num_patches, 32)  # every token is an image token


def test_sequence_pooling_is_an_attention_weighted_average() -> None:
    m = small()
    tokens = m.forward_features(torch.randn(3, 3, 32, 32))
    w = m.pool_weights(tokens)
    assert w.shape == tokens.shape[:2] and (w > 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    # x_L' = softmax(g(x_L)^T) with g linear, z = x_L' x_L
    g = tokens @ m.attention_pool.weight[0] + m.attention_pool.bias
    torch.testing.assert_close(w, g.softmax(dim=1))
    expected = (w[:, :, None] * tokens).sum(dim=1)
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), expected)
    x = torch.zeros(1, 3, 32, 32)
    torch.testing.assert_close(m(x), m.head(m.pool(m.forward_features(x))))
    assert not torch.allclose(w, torch.full_like(w, 1 / w.shape[1]))  # learned weights, not a plain average


def test_average_pooling_alternative() -> None:
    m = small(global_pool="avg")
    assert m.attention_pool is None
    tokens = m.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens.mean(1))


def _added_embedding(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m._pos_embed(m.patch_embed(x)) - m.patch_embed(x)


def test_learned_position_embedding() -> None:
    m = small(pos_embed="learn")
    assert m.pos_embed.shape == (1, 64, 32) and m.pos_embed.requires_grad
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_added_embedding(m, x), m.pos_embed.expand(2, -1, -1))
    with pytest.raises(vitlab.VitlabError, match="differs from the model's"):
        m(torch.randn(1, 3, 48, 48))  # the table fixes the sequence length ...
    m.set_input_size(48)  # ... until it is resampled
    assert m.pos_embed.shape == (1, 144, 32) and m(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_sine_position_embedding_is_the_official_1d_table() -> None:
    m = small(pos_embed="sine")
    assert m.pos_embed is None and not any("pos" in n for n, _ in m.named_parameters())  # computed, not stored
    for size in (32, 48):  # any input size: the table follows the sequence length
        x = torch.randn(2, 3, size, size)
        added = _added_embedding(m, x)[0]
        n, d = added.shape
        p = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(d)
        angle = p / 10000 ** (2 * (i // 2) / d)  # PE(p, i) = sin / cos(p / 10000^{2 floor(i/2) / D})
        expected = torch.where(i % 2 == 0, angle.sin(), angle.cos()).float()
        torch.testing.assert_close(added, expected, atol=1e-5, rtol=1e-5)


def test_no_position_embedding_runs_at_any_size() -> None:
    m = small(pos_embed="none")
    assert m.pos_embed is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_added_embedding(m, x), torch.zeros(2, 64, 32))
    for size in (16, 40, 64):
        assert m(torch.randn(1, 3, size, size)).shape == (1, 4)


def test_dynamic_img_size_resamples_the_learned_table() -> None:
    m = small(dynamic_img_size=True)
    for h, w in [(32, 32), (16, 48), (40, 24)]:
        assert m(torch.randn(1, 3, h, w)).shape == (1, 4)
    fixed = small()
    fixed.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), fixed(x))  # at the native size the table is used as it is


def test_block_normalises_the_residual_stream_between_attention_and_mlp() -> None:
    m = small()
    block = m.blocks[0]
    x = torch.randn(2, 64, 32)
    y = x + block.attn(block.norm1(x))
    y = block.norm2(y)
    expected = y + block.mlp(y)  # the official TransformerEncoderLayer's order
    torch.testing.assert_close(block(x), expected)
    assert block.attn.qkv.bias is None  # the official qkv projection has no bias


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(vitlab.VitlabError, match="pos_embed"):
        small(pos_embed="sincos")
    with pytest.raises(vitlab.VitlabError, match="global_pool"):
        small(global_pool="token")
    with pytest.raises(vitlab.VitlabError, match="expects 3"):
        small()(torch.randn(1, 1, 32, 32))


# --- the official repository's checkpoints -----------------------------------------------------------------------
OFFICIAL_BLOCK = {
    "norm1": "pre_norm",
    "attn": "self_attn",
    "mlp.fc1": "linear1",
    "norm2": "norm1",
    "mlp.fc2": "linear2",
}
OFFICIAL_TOP = {"pos_embed": "positional_emb", "head.weight": "fc.weight", "head.bias": "fc.bias"}


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitlab names -> SHI-Labs/Compact-Transformers' (tokenizer.*, classifier.*)."""
    out = {}
    for k, v in state.items():
        if k.startswith("patch_embed."):
            k = "tokenizer." + k.removeprefix("patch_embed.")
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for ours, theirs in OFFICIAL_BLOCK.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            k = f"classifier.blocks.{i}.{rest}"
        else:
            k = "classifier." + OFFICIAL_TOP.get(k, k)
        out[k] = v.contiguous()
    return out


@pytest.mark.parametrize(
    ("name", "pos"), [("cct_7_3x1_32", "learn"), ("cct_2_3x2_28", "sine"), ("cct_14_7x2_224", "none")]
)
def test_official_state_dict_loads(name: str, pos: str, tmp_path) -> None:

    # one head: the official variants' 64-dimensional heads are what the converter assumes for D = 32
    m = move_off_init(vitlab.create_model(name, **{**tiny_overrides(name), "num_heads": 1, "pos_embed": pos})).eval()
    state = to_official(m.state_dict())
    if pos == "sine":  # the official code stores its sine table as a frozen parameter
        n = m.patch_embed.num_patches
        state["classifier.positional_emb"] = m.sine_table(torch.zeros(1, n, m.embed_dim))
    save_file(state, tmp_path / "cct.safetensors")
    loaded = vitlab.from_pretrained(tmp_path / "cct.safetensors")
    assert loaded.arch == "cct" and loaded.pos_embed_type == pos
    x = torch.randn(2, *m.default_cfg["input_size"])
    torch.testing.assert_close(loaded(x), m(x), atol=1e-6, rtol=1e-6)


def _lucidrains_cct():
    """lucidrains/vit-pytorch's port of the official CCT (same state-dict names), loaded on its own: the package's
    __init__ imports torchvision, which does not import with vitlab's torch. Runs where vit-pytorch is installed
    (``pip install --no-deps vit-pytorch einops``)."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or spec.origin is None or importlib.util.find_spec("einops") is None:
        pytest.skip("vit-pytorch (the reference port of the official CCT) is not installed")
    path = Path(spec.origin).parent / "cct.py"
    module_spec = importlib.util.spec_from_file_location("vit_pytorch_cct", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case",
    [
        ("cct_7", 3, 1, 32, "learnable", 3),
        ("cct_2", 3, 2, 28, "sine", 1),
        ("cct_4", 7, 2, 64, "none", 3),
        ("cct_6", 5, 3, 40, "learnable", 2),
    ],
)
def test_parity_with_the_reference_port(case, tmp_path) -> None:
    fn, kernel, n_conv, img, pos, chans = case
    ref = getattr(_lucidrains_cct(), fn)(
        kernel_size=kernel,
        n_conv_layers=n_conv,
        img_size=img,
        positional_embedding=pos,
        num_classes=7,
        n_input_channels=chans,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "ref.safetensors")
    ours = vitlab.from_pretrained(tmp_path / "ref.safetensors")
    x = torch.randn(3, chans, img, img)
    with torch.no_grad():
        expected = ref(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
