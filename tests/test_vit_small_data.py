"""ViT for small data: what defines each lever (SPT's shifted copies, LSA's masked diagonal and learned temperature,
the conv stem's shapes and parameters) and that a tiny model with each one learns digits."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from conftest import move_off_init, tiny_model, train_on_digits
from vitlab.layers import (
    Attention,
    ConvStem,
    LocalitySelfAttention,
    PatchEmbed,
    ShiftedPatchTokenization,
    record_attention,
    set_fused_attn,
    shifted_copies,
)

LEVERS = ["vit_tiny_spt_lsa_patch4_28", "vit_tiny_spt_patch4_28", "vit_tiny_lsa_patch4_28", "vit_tiny_convstem_28"]


# --- shifted patch tokenization --------------------------------------------------------------------------------
def test_shifted_copies_of_a_hand_made_image() -> None:
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # pixel (i, j) = 4 i + j + 1: no two alike, none zero
    out = shifted_copies(x, 1)
    assert out.shape == (1, 5, 4, 4)
    torch.testing.assert_close(out[:, :1], x)
    # left-up, right-up, left-down, right-down: the window moved by (dy, dx), zeros where it leaves the image
    for c, (dy, dx) in enumerate([(-1, -1), (-1, 1), (1, -1), (1, 1)], start=1):
        for i in range(4):
            for j in range(4):
                inside = 0 <= i + dy < 4 and 0 <= j + dx < 4
                assert out[0, c, i, j] == (x[0, 0, i + dy, j + dx] if inside else 0), (c, i, j)
    assert out[0, 1, 1, 1] == x[0, 0, 0, 0] and out[0, 4, 2, 2] == x[0, 0, 3, 3]  # spelled out once


def test_spt_tokens_see_half_a_patch_beyond_their_own() -> None:
    """A pixel near a patch's corner reaches the diagonal neighbours' tokens through the shifted copies; one more
    than half a patch inside reaches only its own token; patchify keeps every pixel in its own token."""
    spt = ShiftedPatchTokenization(8, 4, 1, 16)
    patchify = PatchEmbed(8, 4, 1, 16)
    x = torch.randn(1, 1, 8, 8)

    def changed_tokens(embed: torch.nn.Module, i: int, j: int) -> list[int]:
        y = x.clone()
        y[0, 0, i, j] += 1.0
        with torch.no_grad():
            diff = (embed(y) - embed(x)).abs().amax(-1)[0]  # (N,)
        return torch.nonzero(diff > 1e-6).flatten().tolist()

    assert spt.grid_size == (2, 2) and spt.num_patches == 4 and spt.shift == 2
    assert changed_tokens(spt, 3, 3) == [0, 1, 2, 3]  # the corner every token's shifted copies reach
    assert changed_tokens(spt, 1, 1) == [0]  # the shifts bring it into no other patch
    assert changed_tokens(spt, 3, 4) == [0, 1, 2, 3]
    assert changed_tokens(patchify, 3, 3) == [0]


def test_spt_is_layernorm_then_projection_of_each_flattened_patch() -> None:
    spt = move_off_init(ShiftedPatchTokenization(8, 4, 3, 16))
    x = torch.randn(2, 3, 8, 8)
    s = shifted_copies(x, 2)  # (2, 15, 8, 8)
    # the patch of token (r, c), flattened row, column, channel (channel fastest)
    patches = [s[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] for r in (0, 1) for c in (0, 1)]  # (2, 15, 4, 4) each
    patches = torch.stack([p.permute(0, 2, 3, 1).reshape(2, -1) for p in patches], dim=1)  # (2, 4, 240)
    expected = spt.proj(torch.nn.functional.layer_norm(patches, (240,), spt.norm.weight, spt.norm.bias, 1e-5))
    torch.testing.assert_close(spt(x), expected)


# --- locality self-attention -----------------------------------------------------------------------------------
def test_lsa_masks_the_diagonal_and_scales_by_its_learned_temperature() -> None:
    attn = move_off_init(LocalitySelfAttention(16, num_heads=2)).eval()
    with torch.no_grad():
        attn.inv_temperature.copy_(torch.tensor([0.1, 2.0]))  # one head flat, one sharp
    x = torch.randn(3, 5, 16)
    with record_attention(attn) as maps, torch.no_grad():
        explicit = attn(x)
    (probs,) = maps[""]
    q, k, _ = attn.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
    logits = (q @ k.transpose(-2, -1)) * torch.tensor([0.1, 2.0]).view(1, 2, 1, 1)  # q k^T / tau, per head
    expected = logits.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert (probs.diagonal(dim1=-2, dim2=-1) == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(attn(x), explicit, atol=1e-6, rtol=1e-5)  # the fused path computes the same


def test_lsa_temperature_starts_at_sqrt_dk_and_is_learned() -> None:
    attn = LocalitySelfAttention(24, num_heads=3)  # d_k = 8
    assert isinstance(attn.inv_temperature, torch.nn.Parameter)
    torch.testing.assert_close(attn.inv_temperature.detach(), torch.full((3,), 8**-0.5))
    # at initialisation LSA is the plain scaled dot product with only the diagonal masked
    plain = Attention(24, num_heads=3)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "inv_temperature"})
    x = torch.randn(2, 6, 24)
    mask = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(attn(x), plain(x, mask))
    for fused in (True, False):  # a gradient on both paths
        attn.inv_temperature.grad = None
        set_fused_attn(attn, fused)
        attn(torch.randn(2, 6, 24)).square().sum().backward()
        assert attn.inv_temperature.grad is not None and (attn.inv_temperature.grad != 0).all()


def test_lsa_keeps_the_callers_mask_and_a_single_token() -> None:
    attn = LocalitySelfAttention(8, num_heads=2).eval()
    keys = torch.tensor([True, True, False, True])  # the third token is padding
    with record_attention(attn) as maps, torch.no_grad():
        attn(torch.randn(1, 4, 8), keys)
        one = attn(torch.randn(1, 1, 8))  # nothing else to attend to: its own token, not NaN
    probs = maps[""][0]
    assert (probs[..., 2] == 0).all() and (probs.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert torch.isfinite(one).all()
    with pytest.raises(vitlab.VitlabError, match="qk_norm"):
        LocalitySelfAttention(8, num_heads=2, qk_norm=True)


# --- convolutional stem ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("img", "chans", "grid"), [(28, 1, 7), (32, 3, 8)])
def test_conv_stem_shapes_and_parameter_count(img: int, chans: int, grid: int) -> None:
    D, W = 192, 96  # the stem's widths: D / 2, then D
    stem = ConvStem(img, 4, chans, D)
    convs = [m for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (chans, W, (3, 3), (2, 2)),
        (W, D, (3, 3), (2, 2)),
    ]
    x = torch.randn(2, chans, img, img)
    assert stem.stem[:3](x).shape == (2, W, img // 2, img // 2)
    assert stem(x).shape == (2, grid * grid, D) and stem.grid_size == (grid, grid) and stem.num_patches == grid**2
    # 3x3 convolutions without bias, BatchNorm's weight and bias, the 1x1 projection with its bias
    expected = (9 * chans * W + 2 * W) + (9 * W * D + 2 * D) + (D * D + D)
    assert sum(p.numel() for p in stem.parameters()) == expected
    # the ViT with the stem: the plain ViT-Ti/4 with patchify (P^2 C D + D) exchanged for the stem, 12 blocks kept
    model = vitlab.create_model(f"vit_tiny_convstem_{img}")
    plain = vitlab.create_model(f"vit_tiny_patch4_{img}")
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in plain.parameters()) - (16 * chans * D + D) + expected
    assert len(model.blocks) == 12


def test_conv_stem_widths_and_errors() -> None:
    assert [m.out_channels for m in ConvStem(32, 8, 3, 64).stem if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64]
    assert ConvStem(32, 8, 3, 64, widths=(8, 8, 8)).stem[0].out_channels == 8
    with pytest.raises(vitlab.VitlabError, match="power of 2"):
        ConvStem(24, 6, 3, 64)
    with pytest.raises(vitlab.VitlabError, match="make patch size 4, not 8"):
        ConvStem(32, 8, 3, 64, widths=(8, 8))
    with pytest.raises(vitlab.VitlabError, match="not divisible"):
        ConvStem(30, 4, 3, 64)


# --- the registered variants -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "embed", "attn"),
    [
        ("vit_tiny_spt_lsa_patch4_32", ShiftedPatchTokenization, LocalitySelfAttention),
        ("vit_tiny_spt_patch4_28", ShiftedPatchTokenization, Attention),
        ("vit_tiny_lsa_patch4_28", PatchEmbed, LocalitySelfAttention),
        ("vit_tiny_convstem_32", ConvStem, Attention),
    ],
)
def test_variants_carry_their_levers(name: str, embed: type, attn: type) -> None:
    model = tiny_model(name)
    assert type(model.patch_embed) is embed
    assert all(type(b.attn) is attn for b in model.blocks)
    assert ("Xiao et al." if embed is ConvStem else "Lee, Lee and Song") in model.default_cfg["paper"]
    with pytest.raises(vitlab.VitlabError, match="tokenizer must be one of"):
        vitlab.create_model(name, tokenizer="shifted")


def test_stem_keeps_he_initialisation_after_vits() -> None:
    """ViT's init gives every Conv2d trunc-normal(0.02); the stem's ReLU convolutions get He-normal back."""
    conv = vitlab.create_model("vit_tiny_convstem_28").patch_embed.stem[3]  # 96 -> 192, fan-out 9 * 192
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 192)), rel=0.05)


@pytest.mark.parametrize("name", LEVERS)
def test_each_lever_learns_digits(name: str) -> None:
    model = vitlab.create_model(name, img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
    losses, accuracy = train_on_digits(model)
    assert sum(losses[-10:]) / 10 < 0.7 * math.log(10), losses[-10:]
    assert accuracy > 0.35, accuracy  # chance is 0.1; measured 0.45-0.85 over three seeds
