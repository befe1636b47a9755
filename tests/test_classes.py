"""A model meets data by class names, not by class count: `vitlab eval` and a distillation teacher score the same
classes listed in another order in the model's order, and refuse other classes in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitlab.checkpoint import from_pretrained, save_pretrained
from vitlab.data.subset import class_order
from vitlab.errors import VitlabError
from vitlab.predict import evaluate_checkpoint
from vitlab.train.tasks import load_teacher


def test_class_order_by_name() -> None:
    kw = dict(num_classes=3, model="the model", data="the data")
    assert class_order(["a", "b", "c"], ["a", "b", "c"], **kw) is None
    assert class_order(["a", "c", "b"], ["a", "b", "c"], **kw) == [0, 2, 1]  # data class b is output 2
    assert class_order(None, ["x", "y", "z"], **kw) is None  # no names recorded: the count decides
    with pytest.raises(VitlabError, match="predicts 3 classes but the data has 2"):
        class_order(None, ["x", "y"], **kw)
    with pytest.raises(VitlabError) as e:
        class_order(["a", "b", "c"], ["x", "b", "z"], **kw)
    message = str(e.value)
    assert "\n" not in message and "not in the data: (a, c)" in message and "not in the model: (x, z)" in message


def reordered_copy(checkpoint: Path, out: Path, order: list[int], names: list[str] | None = None) -> Path:
    """The same classifier with its outputs in ``order`` (output i = the original's output order[i]) and its class
    names listed to match, or renamed to ``names``: the same predictions under other labels."""
    model = from_pretrained(checkpoint)
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[order])
        model.head.bias.copy_(model.head.bias[order])
    original = model.pretrained_cfg["class_names"]
    model.pretrained_cfg["class_names"] = names or [original[i] for i in order]
    train_config = json.loads((checkpoint / "config.json").read_text())["train_config"]
    return save_pretrained(model, out, train_config=train_config)


def test_eval_scores_a_reordered_checkpoint_in_its_own_order_and_refuses_other_classes(
    digits_checkpoint: Path, tmp_path: Path
) -> None:
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    kw = dict(data="digits", precision="fp32")
    base = evaluate_checkpoint(digits_checkpoint, out=tmp_path / "base", **kw)
    moved = evaluate_checkpoint(reordered_copy(digits_checkpoint, tmp_path / "moved", order), out=tmp_path / "m", **kw)
    assert moved["class_names"] == [str(i) for i in order]
    assert moved["accuracy"] == base["accuracy"] > 0.1 and moved["count"] == base["count"]
    # the confusion matrix in the model's order is the original one, rows and columns reordered
    assert torch.equal(moved["confusion"], base["confusion"][order][:, order])

    renamed = reordered_copy(digits_checkpoint, tmp_path / "renamed", list(range(10)), [f"c{i}" for i in range(10)])
    with pytest.raises(VitlabError) as e:
        evaluate_checkpoint(renamed, out=tmp_path / "r", **kw)
    assert "\n" not in str(e.value) and "not in the data: (c0, c1" in str(e.value)


def test_a_teacher_is_matched_by_class_name(digits_checkpoint: Path, tmp_path: Path) -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    names = [str(i) for i in range(10)]
    kw = dict(num_classes=10, in_chans=1, img_size=(28, 28), class_names=names)
    x = torch.randn(4, 1, 28, 28)
    same = load_teacher(digits_checkpoint, **kw)
    moved = load_teacher(reordered_copy(digits_checkpoint, tmp_path / "moved", order), **kw)
    with torch.no_grad():
        assert torch.allclose(moved(x), same(x), atol=1e-6)  # logits in the student's class order
    renamed = reordered_copy(digits_checkpoint, tmp_path / "renamed", order, [f"c{i}" for i in range(10)])
    with pytest.raises(VitlabError, match=r"teacher .* predicts the classes \(c0, c1"):
        load_teacher(renamed, **kw)
