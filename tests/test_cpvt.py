"""CPVT: the Position Encoding Generator, sizes never seen in training without interpolation, and position awareness
that comes from PEG alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlab
from conftest import move_off_init
from vitlab.layers import PEG
from vitlab.models.cpvt import CPVT
from vitlab.stats import count_params


def tiny(name: str = "cpvt_tiny_patch4_32", **kw) -> CPVT:
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 16, "num_classes": 5}
    return vitlab.create_model(name, **{**args, **kw})


# --- PEG -----------------------------------------------------------------------------------------------------
def test_peg_is_a_depthwise_conv_with_a_residual_on_the_grid() -> None:
    peg = move_off_init(PEG(8))
    assert peg.proj.groups == 8 and peg.proj.kernel_size == (3, 3)
    x = torch.randn(2, 1 + 3 * 5, 8)  # a class token and a 3x5 grid
    out = peg(x, (3, 5), num_prefix_tokens=1)
    torch.testing.assert_close(out[:, 0], x[:, 0], atol=0, rtol=0)  # the class token passes through
    grid = x[:, 1:].reshape(2, 3, 5, 8).permute(0, 3, 1, 2)  # (B, C, H, W), row-major tokens
    want = F.conv2d(grid, peg.proj.weight, peg.proj.bias, padding=1, groups=8) + grid
    torch.testing.assert_close(out[:, 1:], want.flatten(2).transpose(1, 2))
    with pytest.raises(vitlab.VitlabError, match="16 tokens for a 3x3 grid"):
        peg(x, (3, 3), num_prefix_tokens=0)
    with pytest.raises(vitlab.VitlabError, match="odd kernel"):
        PEG(8, kernel_size=2)


def test_peg_zero_padding_encodes_absolute_position() -> None:
    # section 3.2: with zero padding, identical tokens get different encodings at the border and in the interior,
    # so the encoding tells a token where it is; away from the border it is translation-equivariant
    peg = move_off_init(PEG(4))
    with torch.no_grad():
        out = peg(torch.ones(1, 25, 4), (5, 5)).reshape(5, 5, 4)
    assert not torch.allclose(out[0, 0], out[2, 2])  # corner vs centre
    assert not torch.allclose(out[0, 2], out[2, 2])  # edge vs centre
    torch.testing.assert_close(out[1, 1], out[2, 3])  # interior positions agree


# --- the model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gap", [False, True])
def test_parameter_counts_are_vit_without_position_embedding_plus_peg(gap: bool) -> None:
    for size, dim in (("tiny", 192), ("small", 384), ("base", 768)):
        with torch.device("meta"):
            vit = count_params(vitlab.create_model(f"vit_{size}_patch16_224"))
            cpvt = count_params(vitlab.create_model(f"cpvt_{size}{'_gap' if gap else ''}_patch16_224"))
        pos_embed, peg, cls = 197 * dim, dim * 9 + dim, dim if gap else 0
        assert cpvt == vit - pos_embed + peg - cls


def test_peg_follows_the_first_block() -> None:
    m = move_off_init(tiny()).eval()
    assert set(m.pegs) == {"0"} and m.pos_embed is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x).reshape(2, 16, 32)], dim=1)
        z = m.pegs["0"](m.blocks[0](z), (4, 4), num_prefix_tokens=1)
        torch.testing.assert_close(m.forward_features(x), m.norm(m.blocks[1](z)))
    with pytest.raises(vitlab.VitlabError, match="peg_indices"):
        tiny(peg_indices=(2,))


@pytest.mark.parametrize("name", ["cpvt_tiny_patch4_32", "cpvt_tiny_gap_patch4_32"])
def test_trained_model_runs_at_unseen_sizes_without_interpolation(name: str, monkeypatch) -> None:
    m = tiny(name).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):  # a few steps at the training size, 16x16
        loss = F.cross_entropy(m(torch.randn(8, 3, 16, 16)), torch.randint(0, 5, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        at_train_size = m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def no_interpolation(*args, **kwargs):
        raise AssertionError("CPVT interpolated something")

    monkeypatch.setattr(F, "interpolate", no_interpolation)
    with torch.no_grad():
        for h, w in [(32, 32), (24, 40), (8, 12)]:  # twice the size, non-square, smaller
            out = m(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5) and torch.isfinite(out).all()
            assert m.forward_features(torch.randn(1, 3, h, w)).shape[1] == m.num_prefix_tokens + h * w // 16
        # running at other sizes changed nothing: same weights, same outputs at the training size
        torch.testing.assert_close(m(x), at_train_size, atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # no parameter's shape depends on the input size: the weights load as they are into a model built for 32x32
    big = tiny(name, img_size=32).eval()
    big.load_state_dict(m.state_dict())
    x32 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(big(x32), m(x32), atol=0, rtol=0)


def permute_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Rearrange the image's patch x patch blocks in the order ``perm`` (row-major block indices)."""
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    blocks = x.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    blocks = blocks[:, perm].reshape(B, gh, gw, C, patch, patch)  # (B, gh, gw, C, p, p)
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@pytest.mark.parametrize("name", ["cpvt_tiny_patch4_32", "cpvt_tiny_gap_patch4_32"])
def test_peg_makes_the_model_position_aware(name: str) -> None:
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    shuffled = permute_patches(x, 4, perm)
    assert not torch.allclose(shuffled, x)
    cpvt = move_off_init(tiny(name)).eval()
    no_position = move_off_init(tiny(name, peg_indices=())).eval()  # a ViT with no position embedding
    gap = "_gap_" in name
    vit = vitlab.create_model(
        "vit_tiny_patch4_32",
        **{"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 16, "num_classes": 5},
        pos_embed="none",
        class_token=not gap,
        global_pool="avg" if gap else "token",
    ).eval()
    vit.load_state_dict(no_position.state_dict())
    with torch.no_grad():
        # without PEG the model sees a bag of patches: shuffling them changes nothing
        torch.testing.assert_close(no_position(shuffled), no_position(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(x), no_position(x), atol=0, rtol=0)
        # with PEG after the first block, where each patch is matters
        assert (cpvt(shuffled) - cpvt(x)).abs().max() > 1e-2
