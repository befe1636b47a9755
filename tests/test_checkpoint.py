"""Checkpoints: vitlab round trips, parity with HF transformers ViT, timm state dicts, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import vitlab

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

from conftest import assert_hf_classifier_parity  # noqa: E402

HF_CASES = [
    # (image size, patch, channels, hidden, heads, layers)
    (28, 4, 1, 64, 4, 2),  # grayscale, patch 4
    (32, 16, 3, 48, 3, 2),  # RGB, patch 16
    ((24, 40), 4, 3, 32, 2, 3),  # non-square RGB
    ((64, 32), 16, 1, 64, 8, 1),  # non-square grayscale, patch 16
]


def hf_vit(cls, img, patch, chans, hidden, heads, layers, **kw):
    cfg = ViTConfig(
        image_size=img,
        patch_size=patch,
        num_channels=chans,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=7,
        id2label={i: f"class{i}" for i in range(7)},
        label2id={f"class{i}": i for i in range(7)},
        **kw,
    )
    model = cls(cfg).eval()
    with torch.no_grad():  # HF initialises some tensors to zero; random everywhere tests every mapping
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_vit_for_image_classification_parity(case, tmp_path) -> None:
    assert_hf_classifier_parity(hf_vit(ViTForImageClassification, *case), case, tmp_path)


def test_hf_vit_model_parity_with_pooler(tmp_path) -> None:
    hf = hf_vit(ViTModel, 32, 8, 3, 64, 4, 2, layer_norm_eps=1e-6, hidden_act="gelu_new")
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=x)
        tokens = ours.forward_features(x)
        pooled = ours(x)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("names", ["saved", "in_memory"])
def test_hf_pytorch_model_bin(names, tmp_path) -> None:
    """pytorch_model.bin with the names HF writes to disk, or with transformers 5's in-memory module names."""
    from safetensors.torch import load_file

    hf = hf_vit(ViTForImageClassification, 16, 4, 3, 32, 2, 1)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors") if names == "saved" else hf.state_dict()
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = vitlab.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)


def test_hf_model_loaded_at_224_runs_at_384(tmp_path) -> None:
    hf = hf_vit(ViTForImageClassification, 224, 16, 3, 32, 2, 1)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path, img_size=384)
    assert ours.pos_embed.shape == (1, 1 + 24 * 24, 32)
    x = torch.randn(1, 3, 384, 384)
    assert torch.isfinite(ours(x)).all()
    # HF's own interpolation lands near ours (both bicubic; HF's corner alignment differs slightly)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).logits
    assert torch.nn.functional.cosine_similarity(ours(x), ref).item() > 0.9


def tiny_vit(**kw):
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 4}
    m = vitlab.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.2)
    return m


def test_resample_at_same_size_is_identity(tmp_path) -> None:
    m = tiny_vit()
    vitlab.save_pretrained(m, tmp_path / "a")
    same = vitlab.from_pretrained(tmp_path / "a", img_size=32)
    assert torch.equal(same.pos_embed, m.pos_embed)


@pytest.mark.parametrize("wrap", ["plain", "model", "module", "safetensors"])
def test_timm_state_dict(wrap, tmp_path) -> None:
    m = tiny_vit(head_hidden_dim=16)  # timm names are vitlab names; pre_logits.fc as timm's older models
    sd = m.state_dict()
    m.num_heads = 4
    if wrap == "safetensors":
        file = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    else:
        obj = (
            {"model": sd} if wrap == "model" else {f"module.{k}": v for k, v in sd.items()} if wrap == "module" else sd
        )
        file = tmp_path / "vit.pth"
        torch.save(obj, file)
    # shapes say D=32 -> one 64-dim head by default; the true head count comes from the variant
    loaded = vitlab.from_pretrained(
        file,
        model_name="vit_tiny_patch16_224",
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=32,
        patch_size=8,
        num_classes=4,
        head_hidden_dim=16,
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)
    inferred = vitlab.from_pretrained(file, num_heads=2)
    assert inferred.patch_embed.patch_size == (8, 8) and inferred.patch_embed.img_size == (32, 32)
    torch.testing.assert_close(inferred(x), m(x), atol=0, rtol=0)
    bigger = vitlab.from_pretrained(file, num_heads=2, img_size=48)
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_new_number_of_classes_keeps_the_backbone(tmp_path) -> None:
    m = tiny_vit()
    vitlab.save_pretrained(m, tmp_path / "a", class_names=list("abcd"))
    ft = vitlab.from_pretrained(tmp_path / "a", num_classes=9)
    x = torch.randn(2, 3, 32, 32)
    assert ft(x).shape == (2, 9)
    torch.testing.assert_close(ft.forward_features(x), m.forward_features(x))
    assert "class_names" not in ft.pretrained_cfg


def test_shape_mismatch_names_the_parameter(tmp_path) -> None:
    m = tiny_vit()
    vitlab.save_pretrained(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["model_args"]["mlp_ratio"] = 2.0
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        vitlab.VitlabError,
        match=r"'blocks.0.mlp.fc1.(weight|bias)' has shape \(128.*\) in the checkpoint but \(64.*\) in the model",
    ):
        vitlab.from_pretrained(tmp_path / "a")


def test_missing_and_corrupt_files_are_named(tmp_path) -> None:
    with pytest.raises(vitlab.VitlabError, match="does not exist"):
        vitlab.from_pretrained(tmp_path / "nope")
    m = tiny_vit()
    d = vitlab.save_pretrained(m, tmp_path / "a")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(vitlab.VitlabError, match=r"model\.safetensors' is corrupt or unreadable") as e:
        vitlab.from_pretrained(d)
    assert "\n" not in str(e.value)
    (d / "config.json").write_text("{not json")
    with pytest.raises(vitlab.VitlabError, match=r"config\.json"):
        vitlab.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(vitlab.VitlabError, match=r"config\.json' is missing"):
        vitlab.from_pretrained(d)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(vitlab.VitlabError, match=r"bad\.pth' is corrupt"):
        vitlab.from_pretrained(bad)


def test_save_is_atomic_and_replaces(tmp_path) -> None:
    m = tiny_vit()
    d = tmp_path / "ckpt"
    vitlab.save_pretrained(m, d, note="first")
    vitlab.save_pretrained(m, d, note="second")
    assert json.loads((d / "config.json").read_text())["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or backup left behind
