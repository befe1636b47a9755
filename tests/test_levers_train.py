"""The small-data levers as options of `vitlab train`: SAM's second pass and mimetic attention initialisation go
through the one training loop (their definitions are tested in test_sam.py and test_mimetic.py)."""

from __future__ import annotations

import pytest
import torch

from test_train import metrics, tiny_cfg, weights
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, train, trainer
from vitlab.train.tasks import ClassificationTask


def count_passes(monkeypatch) -> list[int]:
    calls = [0]
    loss = ClassificationTask.loss

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(ClassificationTask, "loss", counted)
    return calls


def test_sam_takes_two_passes_per_step_and_another_path(tmp_path, monkeypatch) -> None:
    calls = count_passes(monkeypatch)
    plain = train(tiny_cfg(tmp_path / "plain", max_steps=4, eval_every=4))
    plain_calls, calls[0] = calls[0], 0
    sam = train(tiny_cfg(tmp_path / "sam", max_steps=4, eval_every=4, sam_rho=0.05))
    assert (plain["steps"], sam["steps"]) == (4, 4)
    assert (plain_calls, calls[0]) == (4, 8)  # the second pass at w + e(w)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "sam")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the step is taken from the perturbed point's gradient


class Killed(Exception):
    pass


def test_sam_resumes_exactly(tmp_path, monkeypatch) -> None:
    """Drop path draws in both of SAM's passes; a run stopped one step past its checkpoint resumes to the weights
    and metrics of a run that never stopped."""
    kw = dict(max_steps=6, eval_every=3, checkpoint_every=2, sam_rho=0.05, drop_path_rate=0.2)
    train(tiny_cfg(tmp_path / "full", **kw))
    after_step = trainer.after_step

    def die_after_step_3(loop, state, **kwargs):
        done = after_step(loop, state, **kwargs)
        if state.step == 3:
            raise Killed
        return done

    monkeypatch.setattr(trainer, "after_step", die_after_step_3)
    with pytest.raises(Killed):
        train(tiny_cfg(tmp_path / "cut", **kw))
    monkeypatch.setattr(trainer, "after_step", after_step)
    resumed = train(tiny_cfg(tmp_path / "cut", **kw), resume=True)  # from the checkpoint of step 2
    assert resumed["steps"] == 6
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mimetic_init_starts_attention_near_the_identity(tmp_path) -> None:
    def qk_diagonal_share(run) -> float:
        w = weights(run)["blocks.0.attn.qkv.weight"].double()  # [3D, D]
        D = w.shape[1]
        wq, wk = w[:D], w[D : 2 * D]
        prod = wq.T @ wk  # D x D, summed over heads
        return (prod.diagonal().mean() / prod.abs().mean()).item()

    # lr ~ 0: the checkpoint after one step holds the initial weights
    default = tiny_cfg(tmp_path / "default", max_steps=1, eval_every=1, lr=1e-12, min_lr=1e-12)
    mimetic = tiny_cfg(tmp_path / "mimetic", max_steps=1, eval_every=1, lr=1e-12, min_lr=1e-12, attn_init="mimetic")
    train(default)
    train(mimetic)
    assert qk_diagonal_share(tmp_path / "mimetic") > 5 * max(qk_diagonal_share(tmp_path / "default"), 0.1)
    a, b = weights(tmp_path / "default"), weights(tmp_path / "mimetic")
    assert torch.equal(a["patch_embed.proj.weight"], b["patch_embed.proj.weight"])  # its own generator


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sam_rho": -1.0}, "sam_rho must be"),
        ({"sam_rho": 0.05, "accum_steps": 2}, "accum_steps=1"),
        ({"attn_init": "identity"}, "attn_init must be one of default, mimetic"),
        ({"attn_init": "mimetic", "init": "some/checkpoint"}, "overwrite the --init"),
    ],
)
def test_lever_options_are_checked(values, message) -> None:
    with pytest.raises(VitlabError, match=message):
        TrainConfig(**values)
