"""DeiT: parameter counts, the distillation token and its head, HF transformers / timm parity, preprocessor configs."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
from conftest import hf_parity, move_off_init
from vitlab.models.deit import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, VisionTransformerDistilled
from vitlab.stats import model_stats

PAPER_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,  # = ViT-Ti/16
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}


@pytest.mark.parametrize(("name", "count"), PAPER_COUNTS.items())
def test_parameter_counts(name: str, count: int) -> None:
    assert model_stats(name)["params"] == count


def small(**kw) -> VisionTransformerDistilled:
    args = {"embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 6, "img_size": 16, "patch_size": 4}
    return move_off_init(vitlab.create_model("deit_tiny_distilled_patch16_224", **{**args, **kw})).eval()


def test_variants_and_default_cfg() -> None:
    for name in ("deit_tiny_patch4_28", "deit_tiny_distilled_patch4_28", "deit_tiny_distilled_patch4_32"):
        m = vitlab.create_model(name)
        assert m.num_classes == 10 and m.default_cfg["input_size"][1:] == (int(name[-2:]),) * 2
    cfg = vitlab.create_model("deit_tiny_patch4_32").default_cfg
    assert (cfg["mean"], cfg["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert "2012.12877" in cfg["paper"]
    assert type(vitlab.create_model("deit_tiny_patch4_32")) is vitlab.models.VisionTransformer  # a plain ViT


def test_distillation_token_sequence_and_heads() -> None:
    m = small()
    x = torch.randn(3, 3, 16, 16)
    z0 = m._pos_embed(m.patch_embed(x))
    assert z0.shape == (3, 2 + 16, 32) and m.pos_embed.shape == (1, 18, 32)
    torch.testing.assert_close(z0[:, 1], (m.dist_token + m.pos_embed[:, 1:2])[0].expand(3, -1))
    tokens = m.forward_features(x)
    cls_logits, dist_logits = m.head(tokens[:, 0]), m.head_dist(tokens[:, 1])
    assert not torch.allclose(cls_logits, dist_logits)
    # inference fuses the heads by averaging their logits
    torch.testing.assert_close(m(x), (cls_logits + dist_logits) / 2)
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens[:, :2].mean(1))
    # distilled training: each head on its own; off, or in eval mode, the average
    m.set_distilled_training(True)
    assert torch.allclose(m(x), (cls_logits + dist_logits) / 2)  # still eval mode
    m.train()
    out = m(x)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], cls_logits)
    torch.testing.assert_close(out[1], dist_logits)
    m.set_distilled_training(False)
    torch.testing.assert_close(m(x), (cls_logits + dist_logits) / 2)


def test_reset_classifier_resets_both_heads_and_checkpoints_do_too(tmp_path) -> None:
    m = small()
    m.reset_classifier(3)
    assert m.head_dist.weight.shape == (3, 32) and not m.head_dist.weight.any() and not m.head.weight.any()
    m = small()
    vitlab.save_pretrained(m, tmp_path / "a")
    ft = vitlab.from_pretrained(tmp_path / "a", num_classes=9)
    assert ft.head.weight.shape[0] == ft.head_dist.weight.shape[0] == 9
    torch.testing.assert_close(ft.dist_token, m.dist_token)
    with pytest.raises(vitlab.VitlabError, match="global_pool"):
        m.reset_classifier(3, global_pool="avg")
    with pytest.raises(vitlab.VitlabError, match="class_token=True"):
        small(global_pool="avg", class_token=False)
    with pytest.raises(vitlab.VitlabError, match="no distillation head"):
        small(dist_head=False).set_distilled_training(True)


def test_dynamic_size_and_resampling_keep_both_prefix_tokens(tmp_path) -> None:
    m = small()
    vitlab.save_pretrained(m, tmp_path / "a")
    big = vitlab.from_pretrained(tmp_path / "a", img_size=24)
    assert big.pos_embed.shape == (1, 2 + 36, 32)
    torch.testing.assert_close(big.pos_embed[:, :2], m.pos_embed[:, :2])
    dyn = small(dynamic_img_size=True)
    dyn.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dyn(x), m(x))
    assert dyn(torch.randn(1, 3, 8, 24)).shape == (1, 6)


# --- HF transformers parity -----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
)

HF_CASES = [
    # (image size, patch, channels, hidden, heads, layers)
    (28, 4, 1, 64, 4, 2),
    (32, 16, 3, 48, 3, 2),
    ((24, 40), 4, 3, 32, 2, 3),
    ((64, 32), 16, 4, 64, 8, 1),
]


def hf_deit(cls, img, patch, chans, hidden, heads, layers, num_labels=7, **kw):
    cfg = DeiTConfig(
        image_size=img,
        patch_size=patch,
        num_channels=chans,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=3 * hidden,
        num_labels=num_labels,
        **kw,
    )
    model = cls(cfg).eval()
    with torch.no_grad():  # HF zero-initialises the tokens and position embeddings: random everywhere
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("case", HF_CASES)
@pytest.mark.parametrize("cls", [DeiTForImageClassificationWithTeacher, DeiTForImageClassification])
def test_hf_classification_parity(cls, case, tmp_path) -> None:
    hf = hf_deit(cls, *case)
    ours, x, got, out = hf_parity(hf, case, tmp_path)
    assert isinstance(ours, VisionTransformerDistilled) and ours.dist_head == (cls is not DeiTForImageClassification)
    with torch.no_grad():
        tokens = ours.forward_features(x)
    assert out.logits.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=1e-4)
    if cls is DeiTForImageClassificationWithTeacher:
        torch.testing.assert_close(ours.head(tokens[:, 0]), out.cls_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.head_dist(tokens[:, 1]), out.distillation_logits, atol=1e-4, rtol=1e-4)


def test_hf_model_parity_with_pooler_and_teacher_without_classes(tmp_path) -> None:
    hf = hf_deit(DeiTModel, 32, 8, 3, 64, 4, 2, layer_norm_eps=1e-6, hidden_act="gelu_new")
    hf.save_pretrained(tmp_path / "model")
    ours = vitlab.from_pretrained(tmp_path / "model")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=x)
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x), out.pooler_output, atol=1e-4, rtol=1e-4)
    # WithTeacher and no classes: both heads are identities and HF's logits are the two tokens' average
    hf = hf_deit(DeiTForImageClassificationWithTeacher, 16, 4, 3, 32, 2, 1, num_labels=0)
    hf.save_pretrained(tmp_path / "teacher")
    ours = vitlab.from_pretrained(tmp_path / "teacher")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)


def test_hf_in_memory_names(tmp_path) -> None:
    """transformers 5's in-memory module names (layers.i.attention.q_proj, ...) in a pytorch_model.bin."""
    hf = hf_deit(DeiTForImageClassificationWithTeacher, 16, 4, 3, 32, 2, 1)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.from_pretrained(tmp_path)(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)


def test_timm_state_dict(tmp_path) -> None:
    """timm's names are ours: a distilled state dict (dist_token) is recognised over a plain ViT one."""
    m = small(num_heads=2, embed_dim=128)
    file = tmp_path / "deit.pth"
    torch.save({"model": m.state_dict()}, file)
    loaded = vitlab.from_pretrained(file, num_heads=2)  # the weights do not say it
    assert isinstance(loaded, VisionTransformerDistilled) and loaded.num_prefix_tokens == 2
    assert loaded.default_cfg["mean"] == IMAGENET_DEFAULT_MEAN
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)
    named = vitlab.from_pretrained(file, model_name="deit_tiny_distilled_patch16_224", **loaded.init_kwargs)
    torch.testing.assert_close(named(x), m(x), atol=0, rtol=0)


# --- preprocessor_config.json sets normalisation ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_hf_preprocessor_config_sets_normalisation(family, tmp_path) -> None:
    from transformers import DeiTImageProcessorPil, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    if family == "vit":
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        hf, processor = ViTForImageClassification(cfg), ViTImageProcessorPil
        default_mean = (0.5, 0.5, 0.5)
    else:
        hf, processor = hf_deit(DeiTForImageClassificationWithTeacher, 32, 8, 3, 32, 2, 1), DeiTImageProcessorPil
        default_mean = IMAGENET_DEFAULT_MEAN
    hf.save_pretrained(tmp_path)
    assert vitlab.from_pretrained(tmp_path).default_cfg["mean"] == default_mean  # the family's, without one
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    side = 36 if family == "deit" else 32  # DeiT resizes to 36 and centre-crops 32; ViT resizes to 32
    processor(image_mean=mean, image_std=std, size={"height": side, "width": side}, crop_size=32).save_pretrained(
        tmp_path
    )
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_mean"] == mean
    ours = vitlab.from_pretrained(tmp_path)
    assert ours.default_cfg["mean"] == tuple(mean) and ours.default_cfg["std"] == tuple(std)
    assert ours.default_cfg["input_size"] == (3, 32, 32)  # the crop the model takes
    vitlab.save_pretrained(ours, tmp_path / "vitlab")  # and a vitlab copy keeps it
    again = vitlab.from_pretrained(tmp_path / "vitlab")
    assert again.default_cfg["mean"] == tuple(mean) and again.default_cfg["std"] == tuple(std)
