"""Model-agnostic tests: every registered model, shrunk with tiny overrides, honours the model contract."""

from __future__ import annotations

import pytest
import torch

import vitlab
from conftest import input_for, move_off_init, tiny_model
from vitlab.layers import attention_modules, set_fused_attn

ALL = vitlab.list_models()


def _has_attention(name: str) -> bool:
    return bool(attention_modules(tiny_model(name)))


ATTENTION = [n for n in ALL if _has_attention(n)]


def test_registry_has_the_paper_variants() -> None:
    for size in ("tiny", "small", "base", "large", "huge"):
        for patch in (14, 16, 32):
            assert f"vit_{size}_patch{patch}_224" in ALL
    for name in ("vit_base_patch16_384", "vit_large_patch16_384", "vit_tiny_patch4_28", "vit_tiny_patch4_32"):
        assert name in ALL
    assert vitlab.list_models("vit_*_28") == [n for n in ALL if n.startswith("vit_") and n.endswith("_28")]


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_finite(name: str) -> None:
    model = move_off_init(tiny_model(name)).eval()
    x = input_for(model)
    feats = model.forward_features(x)
    # tokens [B, N, D] or maps [B, C, H, W]; D or C is the feature width before pooling
    assert feats.ndim in (3, 4) and feats.shape[0] == 2
    logits = model.forward_head(feats)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(model(x), logits, atol=0, rtol=0)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    for key in ("input_size", "mean", "std", "num_classes", "paper"):
        assert key in model.default_cfg, key


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name: str) -> None:
    model = move_off_init(tiny_model(name)).eval()
    x = input_for(model)
    final, every = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-6, rtol=1e-6)
    assert len(every) >= 2 and all(t.shape[0] == 2 and t.ndim in (3, 4) for t in every)
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(last) == 1
    torch.testing.assert_close(last[0], every[-1], atol=1e-6, rtol=1e-6)
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(picked[0], every[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(picked[1], every[-1], atol=1e-6, rtol=1e-6)
    with pytest.raises(vitlab.VitlabError, match="out of range"):
        model.forward_intermediates(x, indices=[len(every)])


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = move_off_init(tiny_model(name, drop_path_rate=0.1)).train()
    loss = model(input_for(model, 4)).logsumexp(-1).sum()
    # the term a training loop adds for models that define it: hard attention's REINFORCE trains its attention
    if hasattr(model, "auxiliary_loss"):
        loss = loss + model.auxiliary_loss(torch.randint(0, model.num_classes, (4,)))
    loss.backward()
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


@pytest.mark.parametrize("name", ATTENTION)
def test_fused_equals_explicit_attention(name: str) -> None:
    model = move_off_init(tiny_model(name)).eval()
    x = input_for(model)
    fused = model(x)
    set_fused_attn(model, False)
    explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = move_off_init(tiny_model(name)).eval()
    vitlab.save_pretrained(model, tmp_path / "ckpt", class_names=list("abcde"))
    loaded = vitlab.from_pretrained(tmp_path / "ckpt")
    assert loaded.model_name == name
    assert loaded.pretrained_cfg["class_names"] == list("abcde")
    x = input_for(model)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
