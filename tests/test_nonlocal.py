"""The non-local block as Wang et al. (CVPR 2018) define it, and the small network that uses it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import vitlab
from conftest import fit_one_batch, move_off_init, tiny_model
from vitlab.layers import AttentionBase, NonLocalBlock, record_attention
from vitlab.layers.non_local import MODES
from vitlab.stats import model_stats

SHAPES = {1: (2, 8, 10), 2: (2, 8, 6, 5), 3: (2, 8, 3, 4, 4)}  # [B, C, L], [B, C, H, W], [B, C, T, H, W]
POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}  # the paper's sub-sampling: space only for space-time inputs


def perturbed(block: NonLocalBlock) -> NonLocalBlock:
    """Off the identity initialisation, BatchNorm in eval mode so it is a fixed affine map."""
    return move_off_init(block, std=0.3).eval()


def tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, N, C)


def project(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied as the matrix it is: W x_i + b at every position, on tokens (B, N, C)."""
    return tokens(x) @ conv.weight.flatten(1).T + conv.bias


def pooled(x: torch.Tensor, dim: int) -> torch.Tensor:
    return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dim](x, POOL[dim])


def expected_map(block: NonLocalBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x_i, x_j) / C(x) from the definitions in section 3.2, and g(x_j), written independently of the block."""
    sub = not isinstance(block.pool, torch.nn.Identity)
    # g(x_j) = W_g x_j; sub-sampling pools after g and phi (section 3.3), or x itself for the gaussian
    g = tokens(pooled(block.g(x), block.dim)) if sub else project(block.g, x)
    if block.mode == "gaussian":
        f = torch.exp(tokens(x) @ tokens(pooled(x, block.dim) if sub else x).transpose(1, 2))
        return f / f.sum(-1, keepdim=True), g  # C(x) = sum_j f
    theta = project(block.theta, x)
    phi = tokens(pooled(block.phi(x), block.dim)) if sub else project(block.phi, x)
    n = phi.shape[1]  # N: the number of positions j
    if block.mode == "embedded_gaussian":
        f = torch.exp(theta @ phi.transpose(1, 2))
        return f / f.sum(-1, keepdim=True), g
    if block.mode == "dot_product":
        return theta @ phi.transpose(1, 2) / n, g
    w = block.w_f.weight[0]  # concatenation: f = ReLU(w_f^T [theta_i, phi_j]) for every pair (i, j)
    pairs = torch.cat(
        [theta[:, :, None].expand(-1, -1, n, -1), phi[:, None].expand(-1, theta.shape[1], -1, -1)], dim=-1
    )  # (B, N, N', 2d)
    return F.relu(pairs @ w) / n, g


def expected_output(block: NonLocalBlock, x: torch.Tensor, fmap: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """z = BN(W_z y) + x with y_i = sum_j fmap_ij g_j (eq. 1 and 6), BatchNorm written out with its statistics."""
    y = fmap @ g  # (B, N, C/2)
    wz = y @ block.w_z.weight.flatten(1).T + block.w_z.bias  # (B, N, C)
    bn = block.norm
    wz = (wz - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return x + wz.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize(("dim", "mode", "sub_sample"), list(itertools.product((1, 2, 3), MODES, (False, True))))
def test_block_is_the_identity_at_insertion(dim: int, mode: str, sub_sample: bool) -> None:
    block = NonLocalBlock(8, dim=dim, mode=mode, sub_sample=sub_sample)
    x = torch.randn(SHAPES[dim]) * 3
    for train in (True, False):
        block.train(train)
        assert torch.equal(block(x), x)
    no_bn = NonLocalBlock(8, dim=dim, mode=mode, sub_sample=sub_sample, use_bn=False)
    assert torch.equal(no_bn(x), x)


@pytest.mark.parametrize("use_bn", [True, False])
def test_block_leaves_the_identity_when_trained(use_bn: bool) -> None:
    """Identity at insertion must not mean stuck there: one step on a loss moves the block off it."""
    block = NonLocalBlock(8, dim=2, use_bn=use_bn)
    x = torch.randn(SHAPES[2])
    target = torch.randn(SHAPES[2])
    F.mse_loss(block(x), target).backward()
    grown = block.norm.weight if use_bn else block.w_z.weight  # the parameter that zeroes the branch
    assert grown.grad.abs().sum() > 0
    torch.optim.SGD(block.parameters(), lr=0.5).step()
    assert not torch.allclose(block(x), x)


@pytest.mark.parametrize(("dim", "mode", "sub_sample"), list(itertools.product((1, 2, 3), MODES, (False, True))))
def test_pairwise_functions_and_normalisers_follow_the_paper(dim: int, mode: str, sub_sample: bool) -> None:
    """The recorded map is f / C(x) of section 3.2 (softmax for the gaussians; 1/N for dot product and
    concatenation, N counting the sub-sampled positions), and both paths give the output of eqs. 1 and 6."""
    block = perturbed(NonLocalBlock(8, dim=dim, mode=mode, sub_sample=sub_sample))
    x = torch.randn(SHAPES[dim])
    fmap, g = expected_map(block, x)
    with record_attention(block) as maps:
        explicit = block(x)
    (recorded,) = maps[""]
    n_keys = g.shape[1]
    assert recorded.shape == (2, 1, x[0, 0].numel(), n_keys)
    torch.testing.assert_close(recorded[:, 0], fmap, atol=1e-5, rtol=1e-4)
    if mode in ("gaussian", "embedded_gaussian"):
        torch.testing.assert_close(recorded.sum(-1), torch.ones(2, 1, x[0, 0].numel()))
    expected = expected_output(block, x, fmap, g)
    torch.testing.assert_close(explicit, expected, atol=1e-4, rtol=1e-4)
    block.fused_attn = True
    torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)


def test_dot_product_keeps_the_scale_that_softmax_removes() -> None:
    """Normalising by N, not by sum_j f: doubling theta doubles the dot-product response y."""
    block = perturbed(NonLocalBlock(8, dim=2, mode="dot_product"))
    x = torch.randn(SHAPES[2])
    q, k = tokens(block.theta(x)).unsqueeze(1), tokens(block.phi(x)).unsqueeze(1)
    v = tokens(block.g(x)).unsqueeze(1)
    for fused in (True, False):
        block.fused_attn = fused
        torch.testing.assert_close(block.aggregate(2 * q, k, v), 2 * block.aggregate(q, k, v))
        torch.testing.assert_close(block.aggregate(q, k, v), q @ k.transpose(-2, -1) @ v / 30)  # N = 6 * 5


def test_embedded_gaussian_is_single_head_self_attention() -> None:
    """Section 3.2: the embedded-gaussian y is softmax(Q K^T) V with W_theta, W_phi and W_g as the query, key and
    value projections (no 1/sqrt(d)); checked against a direct softmax and against vitlab's attention core."""
    block = perturbed(NonLocalBlock(16, dim=2, mode="embedded_gaussian"))
    x = torch.randn(2, 16, 5, 7)
    q, k, v = project(block.theta, x), project(block.phi, x), project(block.g, x)  # (B, N, 8)
    y = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    core = AttentionBase(8, num_heads=1)  # one head of width C/2 = 8
    core.proj, core.scale, core.fused_attn = torch.nn.Identity(), 1.0, False
    torch.testing.assert_close(core.attend(q[:, None], k[:, None], v[:, None], None), y)
    for fused in (True, False):
        block.fused_attn = fused
        y_block = block.aggregate(q[:, None], k[:, None], v[:, None])[:, 0]
        torch.testing.assert_close(y_block, y, atol=1e-5, rtol=1e-5)
        z = block(x)
        z_ref = expected_output(block, x, torch.softmax(q @ k.transpose(1, 2), dim=-1), v)
        torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    block.use_scale = True  # the authors' released code: logits / sqrt(C/2)
    y_scaled = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(block.aggregate(q[:, None], k[:, None], v[:, None])[:, 0], y_scaled)


@pytest.mark.parametrize(("dim", "size", "keys"), [(1, (10,), 5), (2, (6, 5), 3 * 2), (3, (3, 4, 4), 3 * 2 * 2)])
def test_sub_sampling_shapes(dim: int, size: tuple[int, ...], keys: int) -> None:
    block = NonLocalBlock(8, dim=dim, sub_sample=True)
    assert block.inter_channels == 4  # C / 2
    x = torch.randn(2, 8, *size)
    with record_attention(block) as maps:
        assert block(x).shape == x.shape
    assert maps[""][0].shape == (2, 1, x[0, 0].numel(), keys)


@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_gets_a_gradient(mode: str) -> None:
    block = perturbed(NonLocalBlock(8, dim=2, mode=mode, sub_sample=True)).train()
    block(torch.randn(SHAPES[2])).square().sum().backward()
    for n, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bad_input_is_a_one_line_error() -> None:
    with pytest.raises(vitlab.VitlabError, match="expects \\[B, C, H, W\\]"):
        NonLocalBlock(8, dim=2)(torch.randn(2, 8, 6))
    with pytest.raises(vitlab.VitlabError, match="pairwise function"):
        NonLocalBlock(8, mode="cosine")
    with pytest.raises(vitlab.VitlabError, match="dim must be 1, 2 or 3"):
        NonLocalBlock(8, dim=4)


def non_local_params(c: int) -> int:
    return 3 * (c * c // 2 + c // 2) + (c // 2 * c + c) + 2 * c  # theta, phi, g to C/2; W_z back to C; BatchNorm


def test_variant_parameter_counts() -> None:
    """nonlocal_cnn: a stem and six conv-BN layers, two non-local blocks (64 and 128 channels), the head, counted
    by layer; resnet50_nonlocal: ResNet-50 (25,557,032) and five blocks, two at 512 and three at 1024 channels."""
    conv = lambda cin, cout: 9 * cin * cout + 2 * cout  # 3x3 conv without bias, BatchNorm
    non_local = non_local_params
    layers = conv(1, 32) + 2 * conv(32, 32) + conv(32, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
    expected = layers + non_local(64) + non_local(128) + 128 * 10 + 10
    assert model_stats("nonlocal_cnn_tiny_28")["params"] == expected
    resnet50 = model_stats("resnet50")["params"]
    assert model_stats("resnet50_nonlocal")["params"] == resnet50 + 2 * non_local(512) + 3 * non_local(1024)
    with torch.device("meta"):
        model = vitlab.create_model("resnet50_nonlocal")
    placed = [n for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]
    assert placed == ["layer2.extra0", "layer2.extra2", "layer3.extra0", "layer3.extra2", "layer3.extra4"]


def test_blocks_inserted_into_a_trained_resnet_start_as_the_identity() -> None:
    """Section 3.3's point: a trained network (here ResNet-18 off its initialisation, BN statistics included)
    loads into the one with non-local blocks, which then computes exactly what it did."""
    plain = move_off_init(tiny_model("resnet18_28")).eval()
    with_blocks = tiny_model("resnet18_nonlocal_28").eval()
    missing, unexpected = with_blocks.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".extra0." in k for k in missing)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(with_blocks(x), plain(x))


@pytest.mark.parametrize("mode", MODES)
def test_network_trains(mode: str) -> None:
    model = tiny_model("nonlocal_cnn_tiny_28", nl_mode=mode)
    assert sum(isinstance(m, NonLocalBlock) for m in model.modules()) == 2
    losses = fit_one_batch(model)
    assert losses[-1] < 0.5 * losses[0], losses


def test_resnet_with_blocks_trains() -> None:
    model = tiny_model("resnet18_nonlocal_28")
    assert sum(isinstance(m, NonLocalBlock) for m in model.modules()) == 1
    losses = fit_one_batch(model, lr=3e-2)  # 4 and 8 channels with zero-initialised residual branches start slowly
    assert losses[-1] < 0.5 * losses[0], losses
