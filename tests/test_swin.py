"""Swin Transformer: parity with HF transformers and timm names, parameter counts, and the shifted-window mask."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import vitlab
from conftest import assert_hf_classifier_parity, move_off_init
from vitlab.layers import record_attention, relative_position_index, window_partition, window_reverse
from vitlab.stats import count_flops, model_stats

transformers = pytest.importorskip("transformers")
from transformers import SwinConfig, SwinForImageClassification, SwinModel  # noqa: E402

HF_CASES = [
    # (image size, patch, channels, embed_dim, depths, heads, window)
    (26, 2, 3, 16, (2, 2, 2), (1, 2, 4), 3),  # maps 13, 7, 4: no side a window multiple, all padded and shifted
    (24, 2, 1, 16, (2, 2), (2, 2), 3),  # grayscale, maps 12 and 6: window multiples
    (56, 4, 3, 16, (2, 2), (1, 2), 7),  # maps 14 and 7: the second is one window, so no shift (Swin-T's last stage)
    ((31, 22), 2, 3, 16, (2, 3), (2, 2), 3),  # non-square, height not a patch multiple, odd side at the merge
]


def hf_swin(cls, img, patch, chans, dim, depths, heads, window, **kw):
    cfg = SwinConfig(
        image_size=img,
        patch_size=patch,
        num_channels=chans,
        embed_dim=dim,
        depths=list(depths),
        num_heads=list(heads),
        window_size=window,
        num_labels=7,
        id2label={i: f"class{i}" for i in range(7)},
        label2id={f"class{i}": i for i in range(7)},
        **kw,
    )
    # HF zero-initialises the bias tables and LayerNorm biases: noise everywhere tests every mapping
    return move_off_init(cls(cfg).eval(), std=0.2)


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_swin_for_image_classification_parity(case, tmp_path) -> None:
    assert_hf_classifier_parity(hf_swin(SwinForImageClassification, *case), case, tmp_path)


def test_hf_parity_at_several_sizes_of_one_model(tmp_path) -> None:
    """One checkpoint at sizes that pad differently. HF is defined where every stage's map is at least a window
    (a smaller map breaks its bias lookup) and keeps a clamped window once it has run at such a size, so every size
    runs on a fresh copy of the HF model."""
    hf = hf_swin(SwinForImageClassification, 24, 2, 3, 16, (2, 2), (1, 2), 3)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    for size in [(24, 24), (25, 25), (28, 20), (36, 30), (13, 14)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = copy.deepcopy(hf)(pixel_values=x).logits
            torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4, msg=f"size {size}")


def test_hf_swin_model_features_and_pooler(tmp_path) -> None:
    hf = hf_swin(SwinModel, 26, 2, 3, 16, (2, 2), (1, 2), 3, hidden_act="gelu_new")
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    assert ours.num_classes == 0
    x = torch.randn(2, 3, 26, 26)
    with torch.no_grad():
        out = hf(pixel_values=x)
        maps = ours.forward_features(x)  # (B, C, H, W)
        pooled = ours(x)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), out.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=1e-4)


def test_hf_in_memory_names(tmp_path) -> None:
    """pytorch_model.bin with transformers 5's module names (q_proj, relative_position_bias.*) instead of the saved
    file's (attention.self.query, ...)."""
    hf = hf_swin(SwinForImageClassification, 24, 2, 3, 16, (2, 2), (1, 2), 3)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)


def tiny_swin(**kw) -> torch.nn.Module:
    args = {"embed_dim": 8, "depths": (2, 3), "num_heads": (1, 2), "img_size": 24, "num_classes": 4, **kw}
    return move_off_init(vitlab.create_model("swin_nano_patch2_window4_32", **args)).eval()


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_timm_state_dict(layout, tmp_path) -> None:
    """timm's current names, and the official / timm < 0.9 ones: merging at the end of the stage before, ``head``
    for ``head.fc``, and the index and mask buffers saved."""
    m = tiny_swin(window_size=3)
    sd = m.state_dict()
    if layout == "timm":
        sd = {k.replace("head.", "head.fc.", 1) if k.startswith("head.") else k: v for k, v in sd.items()}
    else:
        sd = {k.replace("layers.1.downsample", "layers.0.downsample"): v for k, v in sd.items()}
        sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(9, 9, dtype=torch.long)
        sd["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 9, 9)
    torch.save({"model": sd}, tmp_path / "swin.pth")
    # the image size is not in timm's weights (named here); the official files' saved mask tells it (16 windows)
    loaded = vitlab.from_pretrained(tmp_path / "swin.pth", **({"img_size": 24} if layout == "timm" else {}))
    assert loaded.default_cfg["input_size"] == m.default_cfg["input_size"] == (3, 24, 24)
    assert loaded.init_kwargs["depths"] == [2, 3] and loaded.init_kwargs["num_heads"] == [1, 2]
    assert loaded.init_kwargs["window_size"] == 3 and loaded.init_kwargs["patch_size"] == [2, 2]
    x = torch.randn(2, 3, 30, 27)
    torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)


def hf_to_timm_swin(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF's saved Swin names -> timm's (0.9 and later), written here from the two libraries' module names:
    separate query / key / value -> ``qkv``, merging at the start of the next stage, the classifier ``head.fc``."""
    renames = [
        (r"^swin\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^swin\.embeddings\.norm\.", "patch_embed.norm."),
        (r"^swin\.layernorm\.", "norm."),
        (r"^classifier\.", "head.fc."),
        (r"^swin\.encoder\.layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
        (r"^swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2."),
        (r"attention\.self\.relative_position_bias_table$", "attn.relative_position_bias_table"),
        (r"attention\.output\.dense\.", "attn.proj."),
        (r"layernorm_before\.", "norm1."),
        (r"layernorm_after\.", "norm2."),
        (r"intermediate\.dense\.", "mlp.fc1."),
        (r"output\.dense\.", "mlp.fc2."),
    ]
    out, qkv = {}, {}
    for key, v in hf.items():
        for pattern, to in renames:
            key = re.sub(pattern, to, key)
        if m := re.fullmatch(r"(.+)\.attention\.self\.(query|key|value)\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        else:
            out[key] = v
    for (block, kind), p in qkv.items():
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([p["query"], p["key"], p["value"]])
    return out


def test_timm_swin_at_384_takes_its_size_from_the_config_the_name_or_the_masks(tmp_path) -> None:
    """Swin-B/384's geometry (window 12 at 384 px: maps 96, 48, 24, 12; the last is one window) at a tiny width,
    in timm's layout and in the official one. The weights run at any size; the size they were trained at, which
    preprocessing resizes to, comes from timm's config.json, the named variant or the official file's saved
    shifted-window masks, and is refused rather than taken to be 224 when nothing says it."""
    from safetensors.torch import load_file, save_file

    hf = hf_swin(SwinForImageClassification, 384, 4, 3, 8, (2, 2, 2, 2), (1, 1, 2, 2), 12)
    hf.save_pretrained(tmp_path / "hf")
    sd = hf_to_timm_swin(load_file(tmp_path / "hf" / "model.safetensors"))
    sizes = {"embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 1, 2, 2]}
    torch.save(sd, tmp_path / "swin.pth")
    with pytest.raises(vitlab.VitlabError, match=r"do not say img_size.*model_name="):
        vitlab.from_pretrained(tmp_path / "swin.pth")
    named = vitlab.from_pretrained(tmp_path / "swin.pth", model_name="swin_base_patch4_window12_384", **sizes,
                                   num_classes=7)  # fmt: skip
    (tmp_path / "hub").mkdir()
    save_file(sd, str(tmp_path / "hub" / "model.safetensors"))
    pre = {"input_size": [3, 384, 384], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    config = {"architecture": "swin_base_patch4_window12_384", "num_classes": 7, "pretrained_cfg": pre}
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**config, "model_args": sizes}))
    # the official layout: merging at the end of the stage, head, and the index and mask buffers saved
    official = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
                for k, v in sd.items()}  # fmt: skip
    official = {k.replace("head.fc.", "head."): v for k, v in official.items()}
    for i, side in enumerate((96, 48, 24)):  # a stage of one window (12) has no shift and no mask
        official[f"layers.{i}.blocks.1.attn_mask"] = torch.zeros((side // 12) ** 2, 144, 144)
        official[f"layers.{i}.blocks.0.attn.relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
    torch.save({"model": official}, tmp_path / "official.pth")
    x, small = torch.randn(1, 3, 384, 384), torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(named(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)
        for model in (named, *(vitlab.from_pretrained(tmp_path / f) for f in ("hub", "official.pth"))):
            assert model.default_cfg["input_size"] == (3, 384, 384) and model.init_kwargs["window_size"] == 12
            torch.testing.assert_close(model(small), named(small), atol=0, rtol=0)  # one function: named's


# --- parameter counts and cost ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params",
    [
        ("swin_tiny_patch4_window7_224", 28_288_354),  # issue 6; HF's SwinForImageClassification and timm agree
        ("swin_small_patch4_window7_224", 49_606_258),  # HF and timm (paper: 50M)
        ("swin_base_patch4_window7_224", 87_768_224),  # HF and timm (paper: 88M)
    ],
)
def test_parameter_counts(name, params) -> None:
    assert model_stats(name)["params"] == params


def test_cost_is_linear_in_pixels_and_any_size_runs() -> None:
    """4x the pixels, 4x the FLOPs of the backbone (global attention would grow 16x in its quadratic part); and
    every size from one patch up runs, padded (on the meta device: shapes only)."""
    with torch.device("meta"):
        m = vitlab.create_model("swin_tiny_patch4_window7_224")
        for size in (4, 64, 97, 512):
            feats = m.forward_features(torch.empty(1, 3, size, size + 5))
            assert feats.shape == (1, 768, -(-size // 32), -(-(size + 5) // 32))
            assert m.forward_head(feats).shape == (1, 1000)
        m.reset_classifier(0)  # the classifier's cost does not depend on the size
        assert count_flops(m, (3, 448, 448)) == 4 * count_flops(m, (3, 224, 224))


# --- the shifted-window mask ------------------------------------------------------------------------------------
def wrapped_pairs(padded: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """[nW, N, N] True where two tokens share a window of the map shifted by -shift but are not neighbours in the
    unshifted (padded) map: their distance along some axis exceeds window - 1 once the shift is undone. Written from
    the geometry of Figure 4, independently of vitlab's mask."""
    (H, W), M = padded, window
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    orig = torch.stack([(rows + shift) % H, (cols + shift) % W], -1)  # where each shifted token came from
    orig = orig.view(H // M, M, W // M, M, 2).permute(0, 2, 1, 3, 4).reshape(-1, M * M, 2)  # (nW, N, 2)
    dist = (orig[:, :, None] - orig[:, None, :]).abs()  # (nW, N, N, 2)
    return (dist > M - 1).any(-1)


@pytest.mark.parametrize("size", [(16, 16), (14, 14), (16, 10)])
def test_shift_mask_blocks_exactly_the_wrapped_pairs_on_alternate_blocks(size) -> None:
    """W-MSA and SW-MSA alternate; after the shift, attention between tokens brought together from opposite
    borders is exactly zero, and every other pair (padding included, as in the references) keeps a weight."""
    M = 4
    model = tiny_swin(depths=(4,), num_heads=(2,), window_size=M, img_size=list(size))
    x = torch.randn(2, 3, *size)
    with record_attention(model) as maps:
        model(x)
    padded = tuple(-(-s // 2 // M) * M for s in size)  # patch 2, then a window multiple
    blocked = wrapped_pairs(padded, M, M // 2).repeat(2, 1, 1)[:, None]  # (B * nW, 1, N, N)
    for i in range(4):
        (attn,) = maps[f"layers.0.blocks.{i}.attn"]  # (B * nW, heads, N, N)
        assert attn.shape == (2 * padded[0] * padded[1] // M**2, 2, M * M, M * M)
        if i % 2 == 0:  # W-MSA: no mask
            assert (attn > 0).all(), i
        else:  # SW-MSA
            assert blocked.any()
            assert (attn.masked_select(blocked) == 0).all(), i
            assert (attn.masked_select(~blocked) > 0).all(), i
            torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


def test_no_shift_where_one_window_covers_the_map() -> None:
    """A map no larger than the window is one window and is not shifted (the official code's rule), so the SW-MSA
    block sees every token like the W-MSA block."""
    model = tiny_swin(depths=(2,), num_heads=(2,), window_size=4, img_size=8)  # a 4 x 4 map
    with record_attention(model) as maps:
        model(torch.randn(2, 3, 8, 8))
    (attn,) = maps["layers.0.blocks.1.attn"]
    assert attn.shape == (2, 2, 16, 16) and (attn > 0).all()


def test_window_clamped_to_a_small_map_reads_its_offsets_from_the_table() -> None:
    """On a map smaller than the window (where HF fails), the clamped window's biases are the table entries of its
    offsets: the model equals one built with that window whose table is the centre of the larger one."""
    big = tiny_swin(depths=(2,), num_heads=(2,), window_size=7, img_size=[8, 6])  # a 4 x 3 map
    small = tiny_swin(depths=(2,), num_heads=(2,), window_size=4, img_size=[8, 6])
    state = big.state_dict()
    for k, v in state.items():
        if k.endswith("relative_position_bias_table"):  # (13 * 13, heads) -> centre (7 * 7, heads)
            state[k] = v.view(13, 13, -1)[3:10, 3:10].reshape(49, -1)
    small.load_state_dict(state)
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(big(x), small(x), atol=1e-6, rtol=1e-6)


def test_window_helpers() -> None:
    """Partition cuts the map into its M x M blocks and reverse undoes it; the relative position index gives equal
    offsets one table entry and distinct offsets distinct ones, covering the (2M-1)^2 table."""
    x = torch.randn(2, 6, 8, 5)
    windows = window_partition(x, (3, 4))  # (2 * 2 * 2, 12, 5)
    torch.testing.assert_close(windows[3], x[0, 3:6, 4:8].reshape(12, 5), atol=0, rtol=0)
    torch.testing.assert_close(window_reverse(windows, (3, 4), 6, 8), x, atol=0, rtol=0)
    index = relative_position_index((3, 4))
    ys, xs = torch.arange(12) // 4, torch.arange(12) % 4
    offsets = torch.stack([ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]], -1).view(-1, 2)
    pairs = {(tuple(o.tolist()), int(i)) for o, i in zip(offsets, index.view(-1))}
    assert len({o for o, _ in pairs}) == len({i for _, i in pairs}) == len(pairs) == 5 * 7
    assert {i for _, i in pairs} == set(range(5 * 7))


def test_window_maps_mapped_back_to_image_positions() -> None:
    from vitlab.analysis import attention_maps

    model = vitlab.create_model(
        "swin_nano_patch2_window4_32", embed_dim=8, depths=(2, 2), num_heads=(1, 2), img_size=2 * 9, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 18, 18)
    per_window = attention_maps(model, x, image_positions=False)
    maps = attention_maps(model, x)
    assert len(maps) == len(per_window) == 4
    # stage 1: a 9x9 map padded to 12x12, windows of 4x4; 9 windows per image
    assert per_window[0].shape == (2 * 9, 1, 16, 16) and maps[0].shape == (2, 1, 144, 144)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)
    # W-MSA: position (0, 0) attends only inside the top-left 4x4 window of the padded 12x12 grid
    row = maps[0][0, 0, 0].view(12, 12)
    assert row[:4, :4].gt(0).all() and row[4:].eq(0).all() and row[:, 4:].eq(0).all()
    # SW-MSA (shift 2): position (2, 2) shares a window with (2..5, 2..5) of the unshifted grid
    row = maps[1][0, 0, 2 * 12 + 2].view(12, 12)
    assert row[2:6, 2:6].gt(0).all() and row.gt(0).sum() == 16
