from __future__ import annotations

import pytest
import torch

from vitlab.data import build_augment, mixup_cutmix
from vitlab.data.augment import sample_beta
from vitlab.errors import VitlabError

ALL_ON = dict(random_resized_crop=True, hflip=True, randaugment=(2, 9), random_erasing=0.5)


def test_nothing_enabled_means_no_module() -> None:
    assert build_augment(img_size=(8, 8), in_chans=3) is None
    assert build_augment(img_size=(8, 8), in_chans=3, hflip=True) is not None


@pytest.mark.parametrize("in_chans", [1, 3])
def test_augment_keeps_shape_and_range(in_chans: int) -> None:
    augment = build_augment(img_size=(12, 10), in_chans=in_chans, **ALL_ON)
    out = augment(torch.rand(4, in_chans, 16, 16))  # the crop resizes to img_size
    assert out.shape == (4, in_chans, 12, 10) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


def test_randaugment_on_one_channel_never_fails() -> None:
    # kornia's colour ops reject 1-channel input; which ops run depends on the seed, so try many
    augment = build_augment(img_size=(16, 16), in_chans=1, randaugment=(3, 15))
    x = torch.rand(4, 1, 16, 16)
    for seed in range(30):
        torch.manual_seed(seed)
        out = augment(x)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_hflip_flips_some_images() -> None:
    augment = build_augment(img_size=(4, 4), in_chans=1, hflip=True)
    x = torch.rand(32, 1, 4, 4)
    out = augment(x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 32


def test_augmentation_is_reproducible_from_the_global_seed() -> None:
    augment = build_augment(img_size=(16, 16), in_chans=3, **ALL_ON)
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(3)
    first = augment(x)
    state = torch.get_rng_state()
    second_batch = augment(x)
    torch.manual_seed(3)
    assert torch.equal(augment(x), first)
    torch.set_rng_state(state)  # what a resumed run does
    assert torch.equal(augment(x), second_batch)
    assert not torch.equal(first, second_batch)


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(VitlabError, match="randaugment"):
        build_augment(img_size=(8, 8), in_chans=3, randaugment=(2, 30))
    with pytest.raises(VitlabError, match="random_resized_crop"):
        build_augment(img_size=(8, 8), in_chans=3, random_resized_crop=1.5)


def test_no_mixing_gives_smoothed_one_hot_targets() -> None:
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 1])
    out, targets = mixup_cutmix(x, y, num_classes=4, label_smoothing=0.2)
    assert out is x
    expected = torch.full((3, 4), 0.05)
    expected[torch.arange(3), y] = 0.85
    assert torch.allclose(targets, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_targets_are_the_lambda_mixture(smoothing: float) -> None:
    x, y = torch.rand(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        out, targets = mixup_cutmix(
            x,
            y,
            num_classes=5,
            mixup_alpha=0.8,
            label_smoothing=smoothing,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.allclose(targets.sum(1), torch.ones(4))
        # sample 0 is mixed with sample 3: its target on class 0 is lam (plus the smoothing floor)
        lam = (targets[0, 0].item() - smoothing / 5) / (1 - smoothing)
        assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
        _, plain = mixup_cutmix(x, y, num_classes=5, label_smoothing=smoothing)
        assert torch.allclose(targets, lam * plain + (1 - lam) * plain.flip(0), atol=1e-6)


def test_cutmix_lambda_is_the_pasted_area() -> None:
    # image i is the constant i, so every pixel tells where it came from
    x = torch.arange(2, dtype=torch.float32).reshape(2, 1, 1, 1).expand(2, 1, 10, 12).contiguous()
    y = torch.tensor([0, 1])
    clipped = 0
    for seed in range(40):
        out, targets = mixup_cutmix(
            x, y, num_classes=2, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(seed)
        )
        pasted = (out[0] == 1).float().mean().item()
        assert targets[0, 1].item() == pytest.approx(pasted) and targets[1, 0].item() == pytest.approx(pasted)
        assert torch.equal(out[1] == 0, out[0] == 1)  # the same box in both images
        assert torch.allclose(targets.sum(1), torch.ones(2))
        box = out[0, 0] == 1
        clipped += 0 < pasted < 1 and bool(box[0].any() or box[-1].any() or box[:, 0].any() or box[:, -1].any())
    assert clipped > 5  # boxes cut by the image border were among them


def test_both_alphas_pick_mixup_or_cutmix() -> None:
    x, y = torch.rand(4, 1, 6, 6), torch.arange(4)
    kinds = set()
    for seed in range(20):
        out, _ = mixup_cutmix(
            x, y, num_classes=4, mixup_alpha=1.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(seed)
        )
        is_cut = bool(((out == x) | (out == x.flip(0))).all())
        kinds.add("cutmix" if is_cut else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_mixing_follows_the_global_rng_without_a_generator() -> None:
    x, y = torch.rand(4, 3, 6, 6), torch.arange(4)
    torch.manual_seed(11)
    a = mixup_cutmix(x, y, num_classes=4, mixup_alpha=0.5, cutmix_alpha=1.0)
    torch.manual_seed(11)
    b = mixup_cutmix(x, y, num_classes=4, mixup_alpha=0.5, cutmix_alpha=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_has_the_right_moments(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    samples = torch.tensor([sample_beta(alpha, g) for _ in range(4000)])
    assert 0 <= samples.min() and samples.max() <= 1
    assert samples.mean().item() == pytest.approx(0.5, abs=0.02)
    assert samples.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
