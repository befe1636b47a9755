"""Checkpoints: vitlab round trips, parity with HF transformers ViT, timm state dicts, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
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


# --- timm checkpoints written by hand in timm's layout, against a forward written here ------------------------------
def timm_vit_state(
    *, dim: int = 96, depth: int = 2, patch: int = 8, img: int = 32, classes: int = 7, **kw
) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of timm's ``VisionTransformer`` (class token, MLP ratio 4).
    ``no_embed_class``: the position table has rows for the patches only (DeiT III); ``layer_scale``: ``ls1`` /
    ``ls2`` gammas; ``meta``: shapes without storage."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta") if kw.get("meta") else torch.randn(*shape, generator=g) * 0.1

    n = (img // patch) ** 2
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, n + (0 if kw.get("no_embed_class") else 1), dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
    }
    if classes:
        sd |= {"head.weight": r(classes, dim), "head.bias": r(classes)}
    for i in range(depth):
        for name, shape in [
            ("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)), ("norm2", (dim,)),
            ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim)),
        ]:  # fmt: skip
            sd[f"blocks.{i}.{name}.weight"] = r(*shape) + (1 if name.startswith("norm") else 0)
            sd[f"blocks.{i}.{name}.bias"] = r(shape[0])
        if kw.get("layer_scale"):
            sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = r(dim), r(dim)
    return sd


def timm_vit_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, no_embed_class: bool = False
) -> torch.Tensor:
    """timm's ViT forward on such a state dict, written from the paper's equations (1)-(4), sharing no code with
    vitlab: patch convolution, class token, positions (added before the class token joins with no_embed_class),
    pre-norm blocks of multi-head attention and a GELU MLP (each scaled by its LayerScale gamma when there is
    one), final LayerNorm, linear head on the class token."""
    w = sd["patch_embed.proj.weight"]  # (D, C, P, P)
    D, P = w.shape[0], w.shape[-1]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)  # (B, N, D)
    cls = sd["cls_token"].expand(len(x), -1, -1)
    t = torch.cat([cls, t + sd["pos_embed"]], 1) if no_embed_class else torch.cat([cls, t], 1) + sd["pos_embed"]
    B, N, _ = t.shape
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        b = f"blocks.{i}."
        qkv = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv  # each (B, h, N, D / h)
        a = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1)  # (B, h, N, N)
        t = t + sd.get(b + "ls1.gamma", 1) * lin((a @ v).transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        t = t + sd.get(b + "ls2.gamma", 1) * lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return lin(ln(t, "norm")[:, 0], "head")


def timm_hub_dir(directory, sd: dict[str, torch.Tensor], architecture: str, **model_args) -> None:
    """What timm's ``push_to_hf_hub`` / ``save_for_hf`` writes: model.safetensors and config.json with the
    architecture, num_classes, num_features, pretrained_cfg (input size, normalisation, labels) and model_args."""
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    classes, dim = sd["head.weight"].shape
    side = model_args.get("img_size", 32)
    config = {
        "architecture": architecture,
        "num_classes": classes,
        "num_features": dim,
        "global_pool": "token",
        "pretrained_cfg": {
            "input_size": [3, side, side],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": classes,
            "label_names": [f"c{i}" for i in range(classes)],
        },
        "model_args": model_args,
    }
    (directory / "config.json").write_text(json.dumps(config))


SMALL_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 2}  # with 6 heads of 16: D // 64 = 1


def test_timm_vit_head_count_is_read_never_guessed(tmp_path) -> None:
    """96 channels in 6 heads of 16: the weights cannot tell it from 1 head of 96 (the old ``D // 64`` guess)."""
    sd = timm_vit_state()
    torch.save(sd, tmp_path / "vit.pth")
    x = torch.randn(2, 3, 32, 32)
    ref = timm_vit_forward(sd, x, heads=6)
    assert (timm_vit_forward(sd, x, heads=1) - ref).abs().max() > 1e-2  # the head count changes the outputs
    with pytest.raises(vitlab.VitlabError, match=r"do not say num_heads.*model_name=.*num_heads=") as e:
        vitlab.from_pretrained(tmp_path / "vit.pth")
    assert "\n" not in str(e.value)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.from_pretrained(tmp_path / "vit.pth", num_heads=6)(x), ref)
        # the named variant says it (vit_small: 6 heads); the overrides shrink it to these weights
        named = vitlab.from_pretrained(tmp_path / "vit.pth", model_name="vit_small_patch16_224", **SMALL_ARGS,
                                       num_classes=7)  # fmt: skip
        torch.testing.assert_close(named(x), ref)


def test_timm_hub_directory_honours_its_config_and_model_name(tmp_path) -> None:
    sd = timm_vit_state()
    x = torch.randn(2, 3, 32, 32)
    ref = timm_vit_forward(sd, x, heads=6)
    # a registered architecture whose sizes model_args change, head count included
    timm_hub_dir(tmp_path / "a", sd, "vit_base_patch16_224", **SMALL_ARGS, num_heads=6)
    a = vitlab.from_pretrained(tmp_path / "a")
    assert a.model_name == "vit_base_patch16_224" and a.default_cfg["input_size"] == (3, 32, 32)
    assert a.pretrained_cfg["class_names"] == [f"c{i}" for i in range(7)] and a.default_cfg["std"][0] == 0.229
    # an architecture vitlab does not register, whose model_args leave the head count to model_name
    timm_hub_dir(tmp_path / "b", sd, "vit_custom_patch8_32", **SMALL_ARGS)
    with pytest.raises(vitlab.VitlabError, match=r"do not say num_heads"):
        vitlab.from_pretrained(tmp_path / "b")
    b = vitlab.from_pretrained(tmp_path / "b", model_name="vit_small_patch16_224")  # 6 heads
    assert b.default_cfg["input_size"] == (3, 32, 32)  # config.json's, over the variant's 224
    with torch.no_grad():
        torch.testing.assert_close(a(x), ref)
        torch.testing.assert_close(b(x), ref)


def test_timm_vit_h14_heads_from_the_name_and_the_hub_config(tmp_path, monkeypatch) -> None:
    """ViT-H/14 itself (1280 channels in 16 heads of 80; the old guess made 20 of 64), as tensor shapes only: the
    bare file is refused with the variant to name, the name and timm's config.json each give 16 heads."""
    from vitlab.checkpoint import read_checkpoint

    sd = timm_vit_state(dim=1280, depth=32, patch=14, img=224, classes=0, meta=True)
    monkeypatch.setattr("vitlab.checkpoint.read_state_dict", lambda *a, **k: sd)
    (tmp_path / "vit_h.pth").touch()
    with pytest.raises(vitlab.VitlabError, match=r"vit_huge_patch14_224: num_heads=16"):
        vitlab.from_pretrained(tmp_path / "vit_h.pth")
    conv, _, _ = read_checkpoint(tmp_path / "vit_h.pth", model_name="vit_huge_patch14_224")
    assert conv.kwargs["num_heads"] == 16 and not conv.unknown
    hub = tmp_path / "hub"  # as timm/vit_huge_patch14_224.orig_in21k, which pretrained=True reads
    hub.mkdir()
    (hub / "model.safetensors").touch()
    pre = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 0}
    config = {"architecture": "vit_huge_patch14_224", "num_classes": 0, "num_features": 1280, "pretrained_cfg": pre}
    (hub / "config.json").write_text(json.dumps(config))
    conv, name, _ = read_checkpoint(hub)
    assert name == "vit_huge_patch14_224" and not conv.unknown
    assert (conv.kwargs["num_heads"], conv.kwargs["embed_dim"], conv.kwargs["num_classes"]) == (16, 1280, 0)


def test_no_embed_class_checkpoints_load_when_named_or_configured(tmp_path) -> None:
    """DeiT III's layout: the position table has rows for the 16 patches only, and the class token joins after the
    positions are added."""
    from vitlab.analysis import pos_embed_similarity
    from vitlab.layers import resample_pos_embed

    sd = timm_vit_state(no_embed_class=True, layer_scale=True)
    torch.save(sd, tmp_path / "deit3.pth")
    x = torch.randn(2, 3, 32, 32)
    ref = timm_vit_forward(sd, x, heads=6, no_embed_class=True)
    with pytest.raises(vitlab.VitlabError, match=r"no_embed_class.*model_name="):  # 16 = 4 x 4, or 15 + 1?
        vitlab.from_pretrained(tmp_path / "deit3.pth", num_heads=6)
    named = vitlab.from_pretrained(tmp_path / "deit3.pth", model_name="deit3_small_patch16_224", **SMALL_ARGS,
                                   num_classes=7)  # fmt: skip
    timm_hub_dir(tmp_path / "a", sd, "deit3_small_patch16_224", **SMALL_ARGS)
    configured = vitlab.from_pretrained(tmp_path / "a")
    timm_hub_dir(tmp_path / "b", sd, "vit_custom", **SMALL_ARGS, num_heads=6, no_embed_class=True, init_values=1e-6)
    with torch.no_grad():
        for model in (named, configured, vitlab.from_pretrained(tmp_path / "b")):
            assert model.no_embed_class and model.pos_embed.shape == (1, 16, 96)
            torch.testing.assert_close(model(x), ref)
        # another size resamples the 16 patch rows alone: there is no class row to keep apart
        bigger = vitlab.from_pretrained(tmp_path / "a", img_size=48)
        torch.testing.assert_close(bigger.pos_embed, resample_pos_embed(sd["pos_embed"], (6, 6), (4, 4), 0))
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 7)
    assert pos_embed_similarity(configured)[0].shape == (16, 16)  # the table's rows are the patches


def test_new_classes_from_a_hf_model_drop_its_pooler(tmp_path) -> None:
    """HF's ViTForImageClassification classifies the final class token; ViTModel's tanh pooler is no part of it.
    A new head from a ViTModel checkpoint is that classifier, not a linear layer on the pooler's output."""
    hf = hf_vit(ViTModel, 32, 8, 3, 64, 4, 2)
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path, num_classes=5)
    assert not any(k.startswith("pre_logits.") for k in ours.state_dict())
    config = hf.config
    config.num_labels = 5
    ref = ViTForImageClassification(config).eval()
    _, unexpected = ref.vit.load_state_dict(hf.state_dict(), strict=False)
    assert all(k.startswith("pooler.") for k in unexpected)
    with torch.no_grad():
        ref.classifier.weight.normal_(0, 0.2)
        ours.head.weight.copy_(ref.classifier.weight)
        ours.head.bias.copy_(ref.classifier.bias)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, atol=1e-4, rtol=1e-4)
