"""Model-agnostic tests: every registered model, shrunk with tiny overrides, honours the model contract."""

from __future__ import annotations

import pytest
import torch

import vitlab
from conftest import input_for, tiny_model
from vitlab.layers import attention_modules, set_fused_attn

ALL = vitlab.list_models()


def test_registry_has_the_paper_variants() -> None:
    for size in ("tiny", "small", "base", "large", "huge"):
        for patch in (14, 16, 32):
            assert f"vit_{size}_patch{patch}_224" in ALL
    for name in ("vit_base_patch16_384", "vit_large_patch16_384", "vit_tiny_patch4_28", "vit_tiny_patch4_32"):
        assert name in ALL
    assert vitlab.list_models("vit_*_28") == [n for n in ALL if n.endswith("_28")]


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_finite(name: str) -> None:
    model = tiny_model(name).eval()
    x = input_for(model)
    feats = model.forward_features(x)
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[-1] == model.embed_dim
    logits = model.forward_head(feats)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    assert torch.equal(model(x), logits)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = tiny_model(name, drop_path_rate=0.1).train()
    with torch.no_grad():  # the classifier starts at zero, which would stop every gradient behind it
        model.head.weight.normal_(0, 0.1)
    model(input_for(model, 4)).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier(name: str) -> None:
    model = tiny_model(name).eval()
    x = input_for(model)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL)
def test_fused_equals_explicit_attention(name: str) -> None:
    model = tiny_model(name).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
    x = input_for(model)
    assert attention_modules(model), "the model has no attention modules to switch"
    fused = model(x)
    set_fused_attn(model, False)
    explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = tiny_model(name).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
    vitlab.save_pretrained(model, tmp_path / "ckpt", class_names=list("abcde"))
    loaded = vitlab.from_pretrained(tmp_path / "ckpt")
    assert loaded.model_name == name
    assert loaded.pretrained_cfg["class_names"] == list("abcde")
    x = input_for(model)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
