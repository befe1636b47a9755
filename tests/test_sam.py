"""Sharpness-aware minimisation: the two-step update against its formula on a hand-made quadratic (SAM and ASAM),
the wrapper's groups and state are the base optimizer's, and a tiny ViT trained with it learns digits."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from conftest import train_on_digits
from vitlab.train.sam import SAM

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.5]])  # symmetric positive definite
C = torch.tensor([1.0, -2.0, 0.5])


def quadratic(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """L(w) = 1/2 (w - c)^T A (w - c) over w = (w1, w2), two tensors, so the norm must span both."""
    d = torch.cat([w1, w2]) - C
    return 0.5 * d @ A @ d


def grad(w: torch.Tensor) -> torch.Tensor:
    return A @ (w - C)


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_step_update_matches_the_formula(adaptive: bool) -> None:
    w0 = torch.tensor([0.3, 0.7, -1.2])
    rho, lr = 0.1, 0.05
    w1 = torch.nn.Parameter(w0[:2].clone())
    w2 = torch.nn.Parameter(w0[2:].clone())
    sam = SAM(torch.optim.SGD([w1, w2], lr=lr), rho=rho, adaptive=adaptive)

    quadratic(w1, w2).backward()
    sam.first_step(zero_grad=True)
    g = grad(w0)
    # SAM: e = rho g / ||g||; ASAM: e = rho T^2 g / ||T g||, T = |w|
    e = rho * w0**2 * g / (w0.abs() * g).norm() if adaptive else rho * g / g.norm()
    torch.testing.assert_close(torch.cat([w1, w2]).detach(), w0 + e)
    assert w1.grad is None  # zero_grad=True

    quadratic(w1, w2).backward()
    sam.second_step()
    # back to w0, then the base step with the gradient taken at w0 + e
    torch.testing.assert_close(torch.cat([w1, w2]).detach(), w0 - lr * grad(w0 + e))


def test_step_with_a_closure_is_the_two_steps() -> None:
    w0 = torch.tensor([0.3, 0.7, -1.2])
    params = [torch.nn.Parameter(w0[:2].clone()), torch.nn.Parameter(w0[2:].clone())]
    sam = SAM(torch.optim.SGD(params, lr=0.05), rho=0.1)

    def closure() -> torch.Tensor:
        loss = quadratic(*params)
        loss.backward()
        return loss

    closure()
    loss = sam.step(closure)
    e = 0.1 * grad(w0) / grad(w0).norm()
    assert loss.item() == pytest.approx(quadratic(w0[:2] + e[:2], w0[2:] + e[2:]).item())  # the loss at w + e
    torch.testing.assert_close(torch.cat(params).detach(), w0 - 0.05 * grad(w0 + e))


def test_groups_and_state_are_the_base_optimizers() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.AdamW([w], lr=1e-3)
    sam = SAM(base, rho=0.05)
    for group in sam.param_groups:  # as the trainer sets its schedule
        group["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5
    w.grad = torch.zeros(3)  # a zero gradient: no perturbation, no NaN
    sam.first_step()
    assert torch.equal(w.detach(), torch.ones(3))
    with pytest.raises(RuntimeError, match="twice"):
        sam.first_step()
    sam.second_step()
    state = sam.state_dict()  # the base optimizer's, after its one step: resume restores it as before
    assert state["param_groups"] == base.state_dict()["param_groups"]
    assert torch.equal(state["state"][0]["exp_avg"], base.state[w]["exp_avg"])
    with pytest.raises(vitlab.VitlabError, match="rho"):
        SAM(base, rho=0.0)


def test_a_vit_trained_with_sam_learns_digits() -> None:
    model = vitlab.create_model("vit_tiny_patch4_28", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
    losses, accuracy = train_on_digits(model, sam_rho=0.05)
    assert sum(losses[-10:]) / 10 < 0.7 * math.log(10), losses[-10:]
    assert accuracy > 0.35, accuracy  # chance is 0.1
