"""The classical tools: non-local means (against a direct implementation, and as attention), bag of visual words +
SVM, and soft / hard attention over CNN locations (Xu et al., 2015)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

import vitlab
from conftest import tiny_model
from vitlab.classic import (
    add_noise,
    nl_means,
    nl_means_attention,
    nl_means_weights,
    patch_kernel,
    plot_attention_locations,
    plot_nl_means_bridge,
    plot_nl_means_weights,
    train_bow,
)
from vitlab.classic.bow import dense_hog
from vitlab.cli import cli
from vitlab.layers import attention_modules, record_attention

SIGMA = 20 / 255


def camera_crop(size: int = 48) -> np.ndarray:
    return data.camera()[200 : 200 + size, 220 : 220 + size].astype(np.float32) / 255


def direct_nl_means(
    z: np.ndarray, h: float, patch: int, search: int | None, center: str = "one", floor: float = 0.0
) -> np.ndarray:
    """NL-means written pixel by pixel from its definition (float64), the reference for the vectorised one."""
    z = z[..., None] if z.ndim == 2 else z
    H, W, C = z.shape
    pr = patch // 2
    g = patch_kernel(patch).numpy()
    k = np.outer(g, g)[..., None]
    zp = np.pad(z.astype(np.float64), ((pr, pr), (pr, pr), (0, 0)), mode="reflect")
    r = max(H, W) if search is None else search // 2
    out = np.zeros((H, W, C))
    for i in range(H):
        for j in range(W):
            ref = zp[i : i + patch, j : j + patch]
            weights, values, is_self = [], [], []
            for a in range(max(0, i - r), min(H, i + r + 1)):
                for b in range(max(0, j - r), min(W, j + r + 1)):
                    f = (k * (ref - zp[a : a + patch, b : b + patch]) ** 2).sum() / C
                    weights.append(np.exp(-max(f - floor, 0) / h**2))
                    values.append(z[a, b])
                    is_self.append((a, b) == (i, j))
            w, s = np.array(weights), np.array(is_self)
            if center == "max":
                w[s] = w[~s].max() if (~s).any() and w[~s].max() > 0 else 1.0
            out[i, j] = (w[:, None] * np.array(values)).sum(0) / w.sum()
    return out[..., 0] if C == 1 else out


# --- NL-means ------------------------------------------------------------------------------------------------
def test_constant_image_is_returned_unchanged() -> None:
    for shape in ((20, 17), (20, 17, 3)):
        img = np.full(shape, 0.37, dtype=np.float32)
        out = nl_means(img, SIGMA)
        assert out.shape == shape and out.dtype == np.float32
        np.testing.assert_allclose(out, img, atol=1e-5)  # float32 sums of a few hundred weights


def test_noise_is_reduced_on_a_sample_image() -> None:
    clean = camera_crop(96)
    noisy = add_noise(clean, SIGMA, seed=1)
    before = peak_signal_noise_ratio(clean, noisy, data_range=1)
    after = peak_signal_noise_ratio(clean, nl_means(noisy, SIGMA), data_range=1)
    assert after > before + 4  # about 22 dB -> 28 dB on this crop


@pytest.mark.parametrize("search", [5, None])
@pytest.mark.parametrize("subtract_noise, center", [(True, "one"), (False, "one"), (False, "max")])
def test_equals_the_direct_definition(subtract_noise: bool, center: str, search: int | None) -> None:
    z = add_noise(camera_crop(11)[:, :9], SIGMA, seed=2)
    expected = direct_nl_means(z, 0.9 * SIGMA, 5, search, center, 2 * SIGMA**2 if subtract_noise else 0.0)
    got = nl_means(
        z, SIGMA, patch_size=5, search_size=search, h=0.9 * SIGMA, subtract_noise=subtract_noise, center_weight=center
    )
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_colour_averages_the_patch_distance_over_channels() -> None:
    rng = np.random.default_rng(0)
    z = rng.random((10, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(
        nl_means(z, 0.2, patch_size=3, search_size=7), direct_nl_means(z, 0.8 * 0.2, 3, 7, floor=2 * 0.2**2), atol=2e-6
    )
    # three equal channels: the same weights as the grayscale image, so the same result on each channel
    gray = z[..., 0]
    out = nl_means(np.repeat(gray[..., None], 3, -1), 0.2)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], nl_means(gray, 0.2), atol=1e-6)
    # a torch tensor in, a torch tensor out
    assert isinstance(nl_means(torch.from_numpy(z), 0.2), torch.Tensor)


def test_chunking_does_not_change_the_result() -> None:
    z = add_noise(camera_crop(24), SIGMA, seed=3)
    whole = nl_means(z, SIGMA)
    for chunk in (24 * 5, 24 * 11 + 3):  # 5 rows at a time, and 11 (the last chunk shorter)
        np.testing.assert_allclose(nl_means(z, SIGMA, chunk_pixels=chunk), whole, atol=1e-6)


def test_weights_of_one_pixel_reproduce_its_output(tmp_path) -> None:
    z = add_noise(camera_crop(30), SIGMA, seed=4)
    zp = np.pad(z, 10, constant_values=np.nan)
    for center in ("one", "max"):
        out = nl_means(z, SIGMA, center_weight=center)
        for i, j in ((15, 12), (0, 29)):  # inside, and a corner whose window is cut by the border
            w = nl_means_weights(z, SIGMA, (i, j), center_weight=center).numpy()
            assert w.shape == (21, 21) and np.isnan(w).any() == ((i, j) == (0, 29))
            window = zp[i : i + 21, j : j + 21]
            np.testing.assert_allclose(np.nansum(w * window), out[i, j], atol=1e-5)
    assert plot_nl_means_weights(z, SIGMA, (15, 12), str(tmp_path / "w.png"))
    assert Image.open(tmp_path / "w.png").size[0] > 100


def test_bad_arguments_are_one_line_errors() -> None:
    z = np.zeros((8, 8), np.float32)
    for kwargs in (
        {"sigma": -1.0},
        {"sigma": SIGMA, "patch_size": 4},
        {"sigma": 0.0},
        {"sigma": SIGMA, "search_size": 0},
    ):
        with pytest.raises(vitlab.VitlabError):
            nl_means(z, **kwargs)
    with pytest.raises(vitlab.VitlabError, match="shape"):
        nl_means(np.zeros((2, 3, 4, 5), np.float32), SIGMA)


# --- the bridge: NL-means is softmax attention over the search window -----------------------------------------
@pytest.mark.parametrize("colour", [False, True])
def test_nl_means_is_attention_over_the_search_window(colour: bool) -> None:
    z = add_noise(camera_crop(16), SIGMA, seed=5)
    if colour:
        z = np.stack([z, z[::-1], z[:, ::-1]], -1).copy()
    H, W = z.shape[:2]
    out, probs = nl_means_attention(z, SIGMA, patch_size=5, search_size=7)
    np.testing.assert_allclose(out.numpy(), nl_means(z, SIGMA, 5, 7, subtract_noise=False), atol=1e-5)
    # each query attends to exactly its 7x7 window (inside the image), with probabilities summing to 1
    rows, cols = torch.arange(H * W) // W, torch.arange(H * W) % W
    window = ((rows[:, None] - rows).abs() <= 3) & ((cols[:, None] - cols).abs() <= 3)
    assert (probs[~window] == 0).all() and (probs[window] > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(H * W, dtype=probs.dtype), atol=1e-6, rtol=0)
    # one query's map is that pixel's NL-means weights
    i, j = 8, 1
    w = nl_means_weights(z, SIGMA, (i, j), 5, 7, subtract_noise=False)
    row = probs[i * W + j].reshape(H, W)[i - 3 : i + 4, 0 : j + 4]
    torch.testing.assert_close(row, w[:, 3 - j :], atol=1e-6, rtol=1e-5)


def test_bridge_figure(tmp_path) -> None:
    z = add_noise(camera_crop(24), SIGMA, seed=6)
    plot_nl_means_bridge(z, SIGMA, (12, 12), str(tmp_path / "bridge.png"), search_size=11)
    assert Image.open(tmp_path / "bridge.png").size[0] > 100


# --- bag of visual words + SVM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, size, cell", [(1, (32, 32), 4), (3, (40, 36), 5), (1, (33, 47), 6)])
def test_batched_hog_equals_scikit_image(channels: int, size: tuple[int, int], cell: int) -> None:
    from skimage.feature import hog

    x = torch.randint(0, 256, (3, channels, *size)).float() / 255
    x[1, :, 10:20] = 0.5  # flat rows: zero gradients, ties between channels
    got = dense_hog(x, cell)
    for b in range(3):
        img = x[b, 0].numpy() if channels == 1 else x[b].permute(1, 2, 0).numpy()
        axis = -1 if channels > 1 else None
        ref = hog(img, 9, (cell, cell), (2, 2), "L2-Hys", feature_vector=False, channel_axis=axis)
        np.testing.assert_allclose(got[b].numpy(), ref.reshape(*ref.shape[:2], -1), atol=1e-6)


def test_spatial_pyramid_histogram() -> None:
    from vitlab.classic.bow import BowConfig, encode

    codebook = np.eye(3, dtype=np.float32)
    descs = codebook[[0, 0, 1, 2]][None]  # one image, words 0, 0, 1, 2, one in each quadrant
    centres = np.array([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]], dtype=np.float32)
    x = encode(descs, centres, codebook, BowConfig(pyramid=(1, 2), norm="l1"))
    whole = 0.5 * np.array([2, 1, 1]) / 4  # the coarse level weighs half the fine one (Lazebnik et al.)
    quadrants = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]) / 4
    np.testing.assert_allclose(x[0], np.concatenate([whole, quadrants]) / 1.5, rtol=1e-6)


def test_daisy_descriptors_on_a_grid() -> None:
    from joblib import Parallel

    from vitlab.classic.bow import BowConfig, descriptors

    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)  # upscaled to 32 x 32 first
    with Parallel(n_jobs=1) as parallel:
        d, centres = descriptors(x, BowConfig(descriptor="daisy"), parallel)
    assert d.shape == (3, 16, 104) and np.isfinite(d).all()  # a 4 x 4 grid of (2 rings x 6 + 1) x 8 histograms
    assert centres.shape == (16, 2) and ((centres > 0) & (centres < 1)).all()


def test_bow_trains_on_digits_and_its_cli_writes_a_summary(tmp_path) -> None:
    s = train_bow("digits", out=tmp_path / "run", codebook_size=32, pyramid=(1, 2))
    assert s["test_accuracy"] > 0.8, s["test_accuracy"]
    assert s["test_count"] == 180 and s["train_time_s"] < 30
    assert (tmp_path / "run" / "model.joblib").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_accuracy"] == s["test_accuracy"]
    r = CliRunner().invoke(cli, ["bow", "eval", str(tmp_path / "run"), "--data", "digits"])
    assert r.exit_code == 0, r.output
    assert f"accuracy {s['test_accuracy']:.4f} on 180 images" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "bow",
            "train",
            "--data",
            "digits",
            "--out",
            str(tmp_path / "cli"),
            "--codebook-size",
            "16",
            "--pyramid",
            "1",
            "--svm",
            "linear",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["model"] == "bow_hog_k16_sp1_linear" and summary["test_accuracy"] > 0.5
    for key in ("train_time_s", "images_per_s", "inference_images_per_s", "best_val_accuracy"):
        assert summary[key] > 0
    r = CliRunner().invoke(cli, ["bow", "train", "--data", "digits", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "already holds a model" in r.output


# --- soft and hard attention (Xu et al., 2015) --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["soft_attention_cnn_28", "hard_attention_cnn_28", "soft_attention_cnn_32"])
def test_parameter_count_is_the_architecture_described(name: str) -> None:
    from vitlab.stats import model_stats

    in_chans, widths, A, K = (1 if name.endswith("28") else 3), (32, 64, 128), 128, 10

    def conv_bn(i: int, o: int, k: int) -> int:
        return i * o * k * k + 2 * o

    n = conv_bn(in_chans, widths[0], 3)  # stem
    for i, o in itertools.pairwise(widths):  # residual blocks: two 3x3 convolutions and a 1x1 shortcut
        n += conv_bn(i, o, 3) + conv_bn(o, o, 3) + conv_bn(i, o, 1)
    D = widths[-1]
    n += (D * A + A) + D * A + A  # f_init, W_a, w (no bias: it would cancel in the softmax)
    n += D * K + K  # classifier
    assert model_stats(name)["params"] == n  # 322,538 for the 28 x 28 grayscale variants


def test_hard_attention_uses_the_expected_location_half_the_time() -> None:
    """Xu et al. section 4.1: with probability 0.5 an image's context is the expected one (soft attention's)."""
    model = tiny_model("hard_attention_cnn_28").train()
    assert model.sample_prob == 0.5
    torch.manual_seed(0)
    feats = torch.randn(400, 8, 7, 7)  # the tiny model's 8 channels
    a = feats.flatten(2).transpose(1, 2)  # (B, L, D)
    alpha, _ = model.attn(a)
    expected = torch.einsum("bl,bld->bd", alpha, a)
    z = model.pool(feats)
    is_expected = torch.isclose(z, expected, atol=1e-5).all(-1)
    is_location = (z[:, None] == a).all(-1).any(-1)  # (B,): z is one of the image's locations
    assert (is_expected ^ is_location).all()  # each image one or the other
    assert 0.4 < is_expected.float().mean() < 0.6
    torch.testing.assert_close(is_location, model._saved["sampled"])
    # an image given the expected context carries no REINFORCE term, and the baseline follows the sampled ones
    never = tiny_model("hard_attention_cnn_28", sample_prob=0.0).train()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 5, (6,))
    never(x)
    entropy = never._saved["entropy"].detach()
    torch.testing.assert_close(never.auxiliary_loss(y).detach(), -never.entropy_weight * entropy.mean())
    assert never.reward_baseline == 0
    with pytest.raises(vitlab.VitlabError, match="sample_prob"):
        vitlab.create_model("hard_attention_cnn_28", sample_prob=1.5)


def test_hard_attention_auxiliary_loss() -> None:
    model = tiny_model("hard_attention_cnn_28", sample_prob=1.0).train()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 5, (6,))
    logits = model(x)
    saved = {k: v.detach() for k, v in model._saved.items()}
    loss = model.auxiliary_loss(y)
    # the value: -lambda_r mean((r - b) log p(s)) - lambda_e mean(H), r = log p(y | s), b = 0 before the first update
    reward = -F.cross_entropy(logits.detach(), y, reduction="none")
    expected = -(reward * saved["log_p_s"]).mean() - model.entropy_weight * saved["entropy"].mean()
    torch.testing.assert_close(loss.detach(), expected)
    # the baseline moved from 0 towards the mean reward
    torch.testing.assert_close(model.reward_baseline, 0.1 * reward.mean())
    # the gradient reaches the attention logits (the score layer), which the classification loss alone cannot
    loss.backward()
    assert model.attn.score.weight.grad.abs().sum() > 0 and model.head.weight.grad is None
    with pytest.raises(vitlab.VitlabError, match="training forward"):
        model.auxiliary_loss(y)  # consumed: the next call needs a new forward
    model(x)
    assert torch.isfinite(model.auxiliary_loss(F.one_hot(y, 5).float() * 0.8 + 0.04))  # mixed (mixup) targets
    # evaluation picks the most attended location, deterministically
    model.eval()
    feats = model.forward_features(x)
    a = feats.flatten(2).transpose(1, 2)
    alpha, _ = model.attn(a)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), a[torch.arange(6), alpha.argmax(-1)])
    soft = tiny_model("soft_attention_cnn_28").train()
    soft(x)
    assert soft.auxiliary_loss(y).item() == 0.0


@pytest.mark.parametrize("name", ["soft_attention_cnn_28", "hard_attention_cnn_28"])
def test_attention_map_is_recorded_over_locations(name: str) -> None:
    model = tiny_model(name).eval()
    assert [n for n, _ in attention_modules(model)] == ["attn"]
    with record_attention(model) as maps:
        model(torch.randn(3, 1, 28, 28))
    (m,) = maps["attn"]
    assert m.shape == (3, 1, 1, 49)  # 28 -> 14 -> 7: 49 locations
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 1, 1))


@pytest.mark.parametrize("name", ["soft_attention_cnn_28", "hard_attention_cnn_28"])
def test_attention_locations_are_drawn(name: str, tmp_path) -> None:
    model = tiny_model(name, num_classes=10).eval()
    vitlab.save_pretrained(model, tmp_path / "ckpt", class_names=[str(i) for i in range(10)])
    plot_attention_locations(tmp_path / "ckpt", "digits", tmp_path / "where.png", count=4)
    assert Image.open(tmp_path / "where.png").size[0] > 100


def _blob_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise with one 4x4 pattern at a random place; the class is the pattern (4 classes)."""
    patterns = torch.tensor(
        [[[1, 1, 1, 1]] * 4, [[1, 0, 0, 1]] * 4, [[1, 1, 1, 1], [0] * 4, [0] * 4, [1, 1, 1, 1]], [[0, 1, 1, 0]] * 4],
        dtype=torch.float32,
    )
    y = torch.randint(0, 4, (n,), generator=generator)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=generator)
    pos = torch.randint(0, 12, (n, 2), generator=generator)
    for b in range(n):
        i, j = pos[b].tolist()
        x[b, 0, i : i + 4, j : j + 4] += 2 * patterns[y[b]]
    return x, y


# REINFORCE learns where to look more slowly than backprop through the soft average: hard attention gets more steps
@pytest.mark.parametrize("name, steps", [("soft_attention_cnn_28", 60), ("hard_attention_cnn_28", 120)])
def test_training_with_the_auxiliary_loss_lowers_the_loss(name: str, steps: int) -> None:
    model = vitlab.create_model(name, img_size=16, num_classes=4, widths=(8, 16, 16), attn_dim=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = _blob_batch(32, g)
        ce = F.cross_entropy(model(x), y)
        loss = ce + model.auxiliary_loss(y)  # what the training loop's task does for models with the hook
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, losses
    model.eval()
    x, y = _blob_batch(256, g)
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean() > 0.6  # chance is 0.25


# --- the denoise command ---------------------------------------------------------------------------------------------
def _png(path, array: np.ndarray) -> str:
    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path)
    return str(path)


def test_denoise_cli(tmp_path) -> None:
    clean = _png(tmp_path / "clean.png", camera_crop(64))
    r = CliRunner().invoke(
        cli,
        [
            "denoise",
            clean,
            "--sigma",
            "20",
            "--add-noise",
            "--out",
            str(tmp_path / "d.png"),
            "--weights-at",
            "30",
            "30",
        ],
    )
    assert r.exit_code == 0, r.output
    noisy_psnr, denoised_psnr = (float(line.split()[2]) for line in r.output.splitlines() if "PSNR" in line)
    assert denoised_psnr > noisy_psnr + 3
    for name in ("d.png", "d-noisy.png", "d-weights.png"):
        assert (tmp_path / name).exists()
    # the noisy image it wrote, denoised against the clean reference, gives the same numbers
    r2 = CliRunner().invoke(
        cli,
        [
            "denoise",
            str(tmp_path / "d-noisy.png"),
            "--sigma",
            "20",
            "--out",
            str(tmp_path / "e.png"),
            "--reference",
            clean,
        ],
    )
    assert r2.exit_code == 0, r2.output
    assert f"{denoised_psnr:.2f} dB" in r2.output


def test_denoise_cli_bad_input_is_one_line(tmp_path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = _png(tmp_path / "g.png", camera_crop(16))
    cases = [
        ([str(tmp_path / "missing.png"), "--sigma", "20"], "does not exist"),
        ([str(text), "--sigma", "20"], "cannot read image"),
        ([good, "--sigma", "-5"], "sigma must be"),
        ([good, "--sigma", "20", "--reference", str(text)], "cannot read image"),
        ([good, "--sigma", "20", "--patch-size", "4"], "patch_size must be an odd"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(cli, ["denoise", *args, "--out", str(tmp_path / "o.png")])
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
