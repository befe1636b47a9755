"""Axial attention (Axial-DeepLab; Ho et al.) and local-window self-attention (SASA) against dense attention with
the mask that defines them, and the grid transformers that use them."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from conftest import fit_one_batch, move_off_init, tiny_model
from vitlab.layers import AxialAttention, AxialAttention2d, LocalSelfAttention, record_attention
from vitlab.stats import model_stats


def dense_attention(attn: torch.nn.Module, x: torch.Tensor, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Full multi-head self-attention over all H*W tokens of x [B, H, W, C], with attn's own qkv and proj, and
    logits q_o k_p / sqrt(d) + bias(q, k)[o, p], where bias puts -inf outside the allowed pairs: the output
    [B, H, W, C] and the probabilities [B, h, N, N]."""
    B, H, W, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x.reshape(B, H * W, C)).view(B, H * W, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    probs = (q @ k.transpose(-2, -1) / math.sqrt(C // h) + bias(q, k)).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, H * W, C)
    return attn.proj(out).view(B, H, W, C), probs


def check_against_dense(attn: torch.nn.Module, x: torch.Tensor, bias) -> None:
    """Both paths give the dense masked attention's output, and the recorded maps, placed at image positions by
    `to_image_attention` (what `vitlab.analysis.attention_maps` returns), are its probabilities."""
    expected, probs = dense_attention(attn, x, bias)
    for fused in (True, False):
        attn.fused_attn = fused
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    with record_attention(attn) as maps:
        attn(x)
    torch.testing.assert_close(attn.to_image_attention(maps[""][0]), probs, atol=1e-5, rtol=1e-5)


def grid(H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each token, row-major: (N,), (N,)."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return rows.flatten(), cols.flatten()


def masked(allowed: torch.Tensor, values: torch.Tensor | float = 0.0) -> torch.Tensor:
    return torch.where(allowed, values, torch.tensor(float("-inf")))


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("span", [None, 7])
def test_axial_attention_is_full_attention_within_the_row_or_column(axis: str, span: int | None) -> None:
    """Attention along one axis equals full attention over the image with every pair outside the same column
    (height) or row (width) masked out, plus eq. 4's terms q_o^T r^q_{p-o} + k_p^T r^k_{p-o} for the offset."""
    H, W, C = 5, 6, 16
    attn = move_off_init(AxialAttention(C, num_heads=2, axis=axis, span=span), std=0.3).eval()
    x = torch.randn(2, H, W, C)
    rows, cols = grid(H, W)
    same, along = (cols, rows) if axis == "height" else (rows, cols)  # fixed coordinate, attended coordinate
    allowed = same[:, None] == same[None, :]  # (N, N)

    def bias(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if span is None:
            return masked(allowed)
        offset = along[None, :] - along[:, None] + span - 1  # index of p - o
        pos = torch.einsum("bhod,opd->bhop", q, attn.rel_q[offset]) + torch.einsum(
            "bhpd,opd->bhop", k, attn.rel_k[offset]
        )
        return masked(allowed, pos / math.sqrt(C // 2))

    check_against_dense(attn, x, bias)


def test_axial_2d_is_height_then_width_and_reaches_everywhere() -> None:
    C = 16
    attn = move_off_init(AxialAttention2d(C, num_heads=2, grid_size=(5, 6)), std=0.3).eval()
    x = torch.randn(2, 5, 6, C, requires_grad=True)
    out = attn(x)
    torch.testing.assert_close(out, attn.width(attn.height(x)))
    # two axial steps reach every position: one output depends on every input token
    out[0, 0, 0].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()
    assert (x.grad[1] == 0).all()  # and nothing across the batch
    attn.channels_first = True
    torch.testing.assert_close(attn(x.permute(0, 3, 1, 2)), out.permute(0, 3, 1, 2))


@pytest.mark.parametrize(("H", "W", "kernel_size"), [(5, 6, 3), (4, 4, 5), (3, 7, 7)])
@pytest.mark.parametrize("rel_pos", [True, False])
@pytest.mark.parametrize("block_size", [2, 8])
def test_local_attention_is_full_attention_with_a_neighbourhood_mask(H, W, kernel_size, rel_pos, block_size) -> None:
    """SASA eq. 3: every pixel attends to the pixels of its k x k neighbourhood inside the image, with logit
    q_ij^T r_{a-i,b-j}, r the concatenation of a row-offset and a column-offset embedding (per head); the query
    blocks the work is cut into (here 2x2 or one padded 8x8) do not change it."""
    C, heads = 16, 2
    attn = LocalSelfAttention(C, num_heads=heads, kernel_size=kernel_size, block_size=block_size, rel_pos=rel_pos)
    attn = move_off_init(attn, std=0.3)
    x = torch.randn(2, H, W, C)
    rows, cols = grid(H, W)
    dr, dc = rows[None, :] - rows[:, None], cols[None, :] - cols[:, None]  # a - i, b - j for every (o, p)
    pad = kernel_size // 2
    allowed = (dr.abs() <= pad) & (dc.abs() <= pad)

    def bias(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if not rel_pos:
            return masked(allowed)
        r = torch.cat(
            [attn.rel_h[:, (dr + pad).clamp(0, kernel_size - 1)], attn.rel_w[:, (dc + pad).clamp(0, kernel_size - 1)]],
            dim=-1,
        )  # (h, N, N, d): r_{a-i,b-j} = [r_{a-i}, r_{b-j}]
        pos = torch.einsum("bhod,hopd->bhop", q, r) / math.sqrt(C // heads)
        return masked(allowed, pos)

    check_against_dense(attn, x, bias)
    expected, _ = dense_attention(attn, x, bias)
    attn.channels_first = True
    torch.testing.assert_close(attn(x.permute(0, 3, 1, 2)), expected.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_recorded_maps_and_masked_borders() -> None:
    x = torch.randn(2, 4, 5, 16)
    net = torch.nn.Sequential(AxialAttention2d(16, num_heads=2, grid_size=(4, 5)), LocalSelfAttention(16, num_heads=2))
    with record_attention(net) as maps:
        net(x)
    assert maps["0.height"][0].shape == (2 * 5, 2, 4, 4)  # every column a sequence of 4
    assert maps["0.width"][0].shape == (2 * 4, 2, 5, 5)  # every row a sequence of 5
    local = maps["1"][0]  # one 8x8 query block (the 4x5 grid padded), its 14x14 halo of keys
    assert local.shape == (2, 2, 64, 14 * 14)
    torch.testing.assert_close(local.sum(-1), torch.ones(2, 2, 64))
    for (i, j), rows, cols in [((0, 0), slice(3, 7), slice(3, 7)), ((3, 4), slice(3, 7), slice(4, 8))]:
        # pixel (i, j) sees image rows max(i-3, 0) .. min(i+3, 3) and columns max(j-3, 0) .. min(j+3, 4): 16
        # pixels; halo position = image position + 3
        seen = local[:, :, i * 8 + j].view(2, 2, 14, 14) > 0
        assert seen[:, :, rows, cols].all() and seen.sum() == 2 * 2 * 16


def test_gradients_reach_the_relative_embeddings() -> None:
    for attn in (AxialAttention2d(16, num_heads=2, grid_size=(4, 5)), LocalSelfAttention(16, num_heads=2)):
        attn(torch.randn(2, 4, 5, 16)).square().sum().backward()
        for n, p in attn.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bad_input_is_a_one_line_error() -> None:
    with pytest.raises(vitlab.VitlabError, match="odd kernel_size"):
        LocalSelfAttention(16, num_heads=2, kernel_size=4)
    with pytest.raises(vitlab.VitlabError, match="span 4 got an axis of length 5"):
        AxialAttention2d(16, num_heads=2, grid_size=(4, 4))(torch.randn(1, 4, 5, 16))
    with pytest.raises(vitlab.VitlabError, match="no attn_mask"):
        LocalSelfAttention(16, num_heads=2)(torch.randn(1, 4, 4, 16), torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(vitlab.VitlabError, match="attn_type"):
        vitlab.create_model("axial_vit_tiny_patch2_28", attn_type="window")


def test_variant_parameter_counts() -> None:
    """ViT-Ti sizes on a 14x14 grid, counted by layer: axial blocks hold two attentions (each with r^q, r^k over
    2 * 14 - 1 offsets of a 64-wide head), local blocks one with 3 heads x 7 offsets x 32 for rows and columns."""
    D, depth = 192, 12
    attention = 4 * D * D + 4 * D  # qkv and proj
    block = 4 * D + 8 * D * D + 5 * D  # two LayerNorms, MLP 4x
    outside = (4 * D + D) + 2 * D + (D * 10 + 10)  # patch embedding (1 channel, 2x2), final LN, head
    axial = outside + depth * (block + 2 * (attention + 2 * 27 * 64))
    local = outside + depth * (block + attention + 2 * 3 * 7 * 32)
    assert model_stats("axial_vit_tiny_patch2_28")["params"] == axial
    assert model_stats("sasa_vit_tiny_patch2_28")["params"] == local


@pytest.mark.parametrize("name", ["axial_vit_tiny_patch2_28", "sasa_vit_tiny_patch2_28"])
def test_model_trains_and_records_every_layer(name: str) -> None:
    model = tiny_model(name)
    losses = fit_one_batch(model)
    assert losses[-1] < 0.5 * losses[0], losses
    with record_attention(model.eval()) as maps:
        model(torch.randn(2, 1, 8, 8))
    per_block = 2 if name.startswith("axial") else 1  # height and width
    assert len(maps) == 2 * per_block and all(len(m) == 1 for m in maps.values())
