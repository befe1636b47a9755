"""CaiT: parameter counts, timm checkpoints against an independent functional reference, and the structure the paper
defines (talking heads, no class token in self-attention, class attention updating the class token only,
LayerScale's depth-dependent initial values)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import vitlab
from conftest import move_off_init
from vitlab._registry import get_variant
from vitlab.layers import Attention, record_attention, resample_pos_embed
from vitlab.models.cait import CaiT, TalkingHeadAttention
from vitlab.stats import count_params, model_stats


def test_parameter_counts_of_the_issue() -> None:
    assert model_stats("cait_xxs24_224")["params"] == 11_956_264
    assert model_stats("cait_s24_224")["params"] == 46_916_200


@pytest.mark.parametrize(
    ("name", "millions"),  # the paper's Table 1, counted at 224x224 and rounded to 0.1M
    [("cait_xxs36_224", 17.3), ("cait_xs24_384", 26.6), ("cait_s36_384", 68.2), ("cait_m48_448", 356.0)],
)
def test_parameter_counts_of_the_paper(name: str, millions: float) -> None:
    with torch.device("meta"):  # model_stats without its FLOP count
        model = vitlab.create_model(name, img_size=224)
    assert round(count_params(model) / 1e6, 1) == millions


def tiny(**kw) -> CaiT:
    args = {"embed_dim": 32, "depth": 3, "num_heads": 4, "img_size": 32, "patch_size": 8, "num_classes": 4}
    return move_off_init(vitlab.create_model("cait_xxs24_224", **{**args, **kw})).eval()


# --- timm names -------------------------------------------------------------------------------------------------
def to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitlab -> timm names, the inverse of the converter: LayerScale as the block's gamma_1 / gamma_2, class
    attention's fused kv split into k and v."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"(blocks_token_only\.\d+\.attn)\.kv\.(weight|bias)$", k):
            out[f"{m[1]}.k.{m[2]}"], out[f"{m[1]}.v.{m[2]}"] = v.chunk(2, dim=0)
        else:
            out[re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k)] = v
    return out


def timm_keys(depth: int, depth_token_only: int) -> set[str]:
    """The parameter names of timm's ``Cait`` (timm/models/cait.py: LayerScaleBlock, TalkingHeadAttn,
    LayerScaleBlockClassAttn, ClassAttn)."""
    wb = lambda p: {f"{p}.weight", f"{p}.bias"}
    keys = {"cls_token", "pos_embed"} | wb("patch_embed.proj") | wb("norm") | wb("head")
    for i in range(depth):
        for mod in ("norm1", "attn.qkv", "attn.proj", "attn.proj_l", "attn.proj_w", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= wb(f"blocks.{i}.{mod}")
        keys |= {f"blocks.{i}.gamma_1", f"blocks.{i}.gamma_2"}
    for i in range(depth_token_only):
        for mod in ("norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= wb(f"blocks_token_only.{i}.{mod}")
        keys |= {f"blocks_token_only.{i}.gamma_1", f"blocks_token_only.{i}.gamma_2"}
    return keys


def reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """CaiT written out from the paper's equations on a timm-named state dict, sharing no code with vitlab."""

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)

    def lin(t, p):
        return F.linear(t, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def mlp(t, p):
        return lin(F.gelu(lin(t, f"{p}.fc1")), f"{p}.fc2")

    def mix_heads(a, p):  # a linear map across the head axis of a (B, h, N, M) map: talking heads
        return torch.einsum("bhnm,gh->bgnm", a, sd[f"{p}.weight"]) + sd[f"{p}.bias"][:, None, None]

    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = t + sd["pos_embed"]  # patches only, no class token
    B, N, D = t.shape
    hd = D // heads

    def split(u):
        return u.reshape(B, -1, heads, hd).transpose(1, 2)

    def merge(u):
        return u.transpose(1, 2).reshape(B, -1, D)

    i = 0
    while f"blocks.{i}.gamma_1" in sd:
        p = f"blocks.{i}"
        q, k, v = lin(ln(t, f"{p}.norm1"), f"{p}.attn.qkv").chunk(3, dim=-1)
        logits = mix_heads(split(q) @ split(k).transpose(-1, -2) * hd**-0.5, f"{p}.attn.proj_l")
        probs = mix_heads(logits.softmax(-1), f"{p}.attn.proj_w")
        t = t + sd[f"{p}.gamma_1"] * lin(merge(probs @ split(v)), f"{p}.attn.proj")
        t = t + sd[f"{p}.gamma_2"] * mlp(ln(t, f"{p}.norm2"), f"{p}.mlp")
        i += 1
    c = sd["cls_token"].expand(B, -1, -1)
    i = 0
    while f"blocks_token_only.{i}.gamma_1" in sd:
        p = f"blocks_token_only.{i}"
        z = ln(torch.cat([c, t], dim=1), f"{p}.norm1")  # z = [x_class; x_patches]
        q, k, v = lin(z[:, :1], f"{p}.attn.q"), lin(z, f"{p}.attn.k"), lin(z, f"{p}.attn.v")
        a = (split(q) @ split(k).transpose(-1, -2) * hd**-0.5).softmax(-1)  # (B, h, 1, 1 + N)
        c = c + sd[f"{p}.gamma_1"] * lin(merge(a @ split(v)), f"{p}.attn.proj")
        c = c + sd[f"{p}.gamma_2"] * mlp(ln(c, f"{p}.norm2"), f"{p}.mlp")
        i += 1
    return lin(ln(torch.cat([c, t], dim=1), "norm")[:, 0], "head")


@pytest.mark.parametrize(
    "size", [{"img_size": 32, "patch_size": 8}, {"img_size": 24, "patch_size": 4, "depth_token_only": 1}]
)
def test_timm_state_dict_matches_the_reference(size, tmp_path) -> None:
    ours = tiny(**size)
    sd = to_timm(ours.state_dict())
    assert set(sd) == timm_keys(len(ours.blocks), len(ours.blocks_token_only))
    x = torch.randn(2, 3, size["img_size"], size["img_size"])
    with torch.no_grad():
        ref = reference_logits(sd, x, heads=4)
        torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-4)
    torch.save({"model": sd}, tmp_path / "cait.pth")  # as the official checkpoints wrap it
    loaded = vitlab.from_pretrained(tmp_path / "cait.pth")  # every argument read off the shapes
    assert isinstance(loaded, CaiT) and loaded.blocks[0].attn.num_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded(x), ours(x), atol=0, rtol=0)


def test_timm_state_dict_at_another_size_resamples_patch_positions_only(tmp_path) -> None:
    ours = tiny()
    torch.save(to_timm(ours.state_dict()), tmp_path / "cait.pth")
    bigger = vitlab.from_pretrained(tmp_path / "cait.pth", img_size=48)
    # CaiT's position embedding has no class-token entry: all 16 entries are a 4x4 grid, resampled to 6x6
    want = resample_pos_embed(ours.pos_embed.detach(), (6, 6), (4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(bigger.pos_embed.detach(), want, atol=0, rtol=0)
    ours.set_input_size(48)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bigger(x), ours(x), atol=0, rtol=0)


# --- the structure the paper defines ------------------------------------------------------------------------------
def test_talking_heads_with_identity_mixing_is_standard_attention() -> None:
    torch.manual_seed(1)
    th, std = TalkingHeadAttention(32, num_heads=4), Attention(32, num_heads=4)
    with torch.no_grad():
        for p in std.parameters():
            p.normal_(0, 0.3)
        th.qkv.load_state_dict(std.qkv.state_dict())
        th.proj.load_state_dict(std.proj.state_dict())
        for mix in (th.proj_l, th.proj_w):
            mix.weight.copy_(torch.eye(4))
            mix.bias.zero_()
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(th(x), std(x), atol=1e-5, rtol=1e-5)
        th.proj_l.weight.copy_(torch.eye(4).roll(1, dims=0))  # now the logits of head h come from head h - 1
        assert (th(x) - std(x)).abs().max() > 1e-2


def test_self_attention_stage_has_no_class_token() -> None:
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record_attention(m) as maps:
        before = m.forward_intermediates(x)
        m.cls_token.add_(1.0)
        after = m.forward_intermediates(x)
    N = 16
    for i in range(len(m.blocks)):
        assert maps[f"blocks.{i}.attn"][0].shape == (2, 4, N, N)  # patches attend to patches only
        torch.testing.assert_close(maps[f"blocks.{i}.attn"][0].sum(-1), torch.ones(2, 4, N))
    for i in range(len(m.blocks_token_only)):
        assert maps[f"blocks_token_only.{i}.attn"][0].shape == (2, 4, 1, 1 + N)  # one query: the class token
    # the class token only enters after the self-attention stage: its blocks' outputs ignore it
    for a, b in zip(before[1], after[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(before[0][:, 0], after[0][:, 0])


def test_class_attention_leaves_patch_tokens_untouched() -> None:
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    patches = m.blocks(m._embed(x))
    out = m.forward_features(x)
    assert out.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(out[:, 1:], m.norm(patches), atol=0, rtol=0)
    # and no gradient flows from the output patch tokens to the class token or the class-attention layers
    out[:, 1:].sum().backward()
    assert m.cls_token.grad is None or m.cls_token.grad.abs().sum() == 0
    for p in m.blocks_token_only.parameters():
        assert p.grad is None or p.grad.abs().sum() == 0
    # each class-attention layer returns only the updated class token
    cls = m.cls_token.expand(2, -1, -1)
    assert m.blocks_token_only[0](patches, cls).shape == (2, 1, 32)


@pytest.mark.parametrize(("depth", "eps"), [(12, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6)])
def test_layer_scale_initial_value_follows_depth(depth: int, eps: float) -> None:
    with torch.device("meta"):
        m = CaiT(embed_dim=8, depth=depth, num_heads=2, img_size=16, patch_size=8)
    assert m.init_values == eps
    with torch.device("meta"):
        explicit = CaiT(embed_dim=8, depth=depth, num_heads=2, img_size=16, patch_size=8, init_values=0.5)
    assert explicit.init_values == 0.5
    real = CaiT(embed_dim=8, depth=2, num_heads=2, img_size=16, patch_size=8, init_values=eps)
    for block in [*real.blocks, *real.blocks_token_only]:  # class-attention layers get the same eps
        for ls in (block.ls1, block.ls2):
            assert torch.equal(ls.gamma, torch.full((8,), eps))


def test_named_variants_use_the_official_init_values() -> None:
    # the official checkpoints: 1e-5 up to 36 layers at width 192 (XXS-36), 1e-6 for S-36 and the M models
    assert get_variant("cait_xxs36_224")[1]["init_values"] == 1e-5
    assert get_variant("cait_s36_384")[1]["init_values"] == 1e-6
    assert get_variant("cait_s24_224")[1]["init_values"] == 1e-5


def test_average_pooling_and_dynamic_size() -> None:
    m = tiny(global_pool="avg")
    tokens = m.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    d = tiny(dynamic_img_size=True)
    assert d(torch.randn(1, 3, 24, 40)).shape == (1, 4)
    with pytest.raises(vitlab.VitlabError, match="global_pool"):
        tiny(global_pool="max")
