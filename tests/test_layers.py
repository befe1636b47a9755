from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.layers import (
    Attention,
    CrossAttention,
    DropPath,
    LayerScale,
    PatchEmbed,
    record_attention,
    resample_pos_embed,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written from the equation, independent of vitlab."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_self_attention_matches_the_equation() -> None:
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 7, 24)
    q, k, v = attn.qkv(x).split(24, dim=-1)
    heads = lambda t: t.view(2, 7, 3, 8).transpose(1, 2)  # (B, h, N, hd)
    expected = reference_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 7, 24)
    expected = attn.proj(expected)
    for fused in (True, False):
        attn.fused_attn = fused
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_mask_paths_agree() -> None:
    attn = Attention(16, num_heads=2).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()  # causal
    attn.fused_attn = True
    fused = attn(x, mask)
    attn.fused_attn = False
    torch.testing.assert_close(attn(x, mask), fused, atol=1e-5, rtol=1e-5)
    # the first token can only see itself, so changing later tokens must not change it
    x2 = x.clone()
    x2[:, 1:] += 1
    torch.testing.assert_close(attn(x2, mask)[:, 0], fused[:, 0], atol=1e-5, rtol=1e-5)


def test_cross_attention_queries_from_x_keys_from_context() -> None:
    ca = CrossAttention(16, context_dim=12, num_heads=2).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 9, 12)
    q = ca.q(x).view(2, 3, 2, 8).transpose(1, 2)
    k, v = ca.kv(ctx).split(16, dim=-1)
    k, v = (t.view(2, 9, 2, 8).transpose(1, 2) for t in (k, v))
    expected = ca.proj(reference_attention(q, k, v).transpose(1, 2).reshape(2, 3, 16))
    for fused in (True, False):
        ca.fused_attn = fused
        out = ca(x, ctx)
        assert out.shape == (2, 3, 16)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_record_attention_switches_path_and_restores() -> None:
    net = torch.nn.Sequential(Attention(16, num_heads=4), Attention(16, num_heads=4)).eval()
    x = torch.randn(3, 6, 16)
    with record_attention(net) as maps:
        net(x)
        assert not net[0].fused_attn
    assert net[0].fused_attn and net[1].fused_attn
    assert set(maps) == {"0", "1"}
    a = maps["0"][0]
    assert a.shape == (3, 4, 6, 6)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 6))
    net(x)  # hooks are removed: nothing more is recorded
    assert len(maps["0"]) == 1


def test_patch_embed_is_a_linear_map_of_flattened_patches() -> None:
    pe = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=2, embed_dim=5)
    x = torch.randn(3, 2, 8, 12)
    patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C*P*P)
    E = pe.proj.weight.reshape(5, -1)  # (D, C*P*P)
    expected = patches @ E.T + pe.proj.bias
    out = pe(x)
    assert out.shape == (3, 6, 5) and pe.grid_size == (2, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_patch_embed_errors_are_clear() -> None:
    pe = PatchEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=8)
    with pytest.raises(Exception, match="1 channels but the model expects 3"):
        pe(torch.randn(1, 1, 16, 16))
    with pytest.raises(Exception, match="differs from the model's"):
        pe(torch.randn(1, 3, 20, 20))
    with pytest.raises(Exception, match="not divisible by patch size"):
        PatchEmbed(img_size=18, patch_size=4)


def test_drop_path_keeps_the_expectation() -> None:
    dp = DropPath(0.25)
    x = torch.ones(20000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert (y == 0).all(1).eq((y == 0).any(1)).all()  # one decision per sample


def test_drop_path_of_one_drops_everything_without_nan() -> None:
    x = torch.randn(8, 5, 4, requires_grad=True)
    y = DropPath(1.0).train()(x)
    assert torch.equal(y, torch.zeros_like(x))  # not 0 / 0
    assert DropPath(1.0).eval()(x) is x


def test_layer_scale() -> None:
    ls = LayerScale(4, init_values=0.1)
    assert torch.equal(ls(torch.ones(2, 4)), torch.full((2, 4), 0.1))


def test_sincos_1d_follows_vaswani() -> None:
    pe = sincos_pos_embed_1d(10, 8)
    pos, i = 3, 2
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_sincos_2d_layout() -> None:
    pe = sincos_pos_embed_2d((3, 4), 16)
    assert pe.shape == (12, 16)
    # row-major grid: token 5 is (y=1, x=1); the first quarter is sin(x * omega) with omega_0 = 1
    assert pe[5, 0].item() == pytest.approx(math.sin(1.0))
    assert pe[4, 0].item() == 0.0 and pe[4, 8].item() == pytest.approx(math.sin(1.0))  # (y=1, x=0)


def test_resample_pos_embed() -> None:
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), num_prefix_tokens=1) is pe
    out = resample_pos_embed(pe, (6, 8), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 48, 8)
    assert torch.equal(out[:, :1], pe[:, :1])  # the class token's embedding is untouched
    # a constant field stays constant under bicubic resampling
    const = torch.cat([torch.zeros(1, 1, 8), torch.ones(1, 16, 8)], 1)
    torch.testing.assert_close(resample_pos_embed(const, (7, 7))[:, 1:], torch.ones(1, 49, 8))
    # bf16 in, bf16 out, computed in fp32
    assert resample_pos_embed(pe.bfloat16(), (2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot infer the grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def test_no_weight_decay_names_prefix_each_part_with_its_name() -> None:
    """A composite model (CLIP, a captioner) keeps its parts' position tables and tokens out of weight decay under
    the names its own state dict gives them; a part without `no_weight_decay` adds none."""
    from vitlab import create_model
    from vitlab.layers import no_weight_decay_names

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = create_model("vit_tiny_patch4_28", depth=1)
            self.head = torch.nn.Linear(2, 2)

    pair = Pair()
    names = no_weight_decay_names(image=pair.image, head=pair.head)
    assert names and names == {f"image.{n}" for n in pair.image.no_weight_decay()}
    assert names <= {n for n, _ in pair.named_parameters()}
