"""Reading training options: every value as its field's type, from a flag (--set) and from a YAML recipe alike;
model_args given twice or clashing with what the trainer sets; a wrong value is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vitlab.cli import cli
from vitlab.errors import VitlabError
from vitlab.train.config import TrainConfig, load_yaml, parse_set

# (option, text as written in a flag or a recipe, the value it must become)
VALUES = [
    ("lr", "1e-3", 0.001),
    ("min_lr", "1E-5", 1e-5),
    ("lr", ".5", 0.5),
    ("lr", "1_000", 1000.0),
    ("epochs", "1_000", 1000),
    ("epochs", "1e3", 1000),
    ("weight_decay", "0", 0.0),
    ("hflip", "true", True),
    ("hflip", "false", False),
    ("betas", "[0.9, 0.95]", (0.9, 0.95)),
    ("betas", "(0.9, 0.95)", (0.9, 0.95)),
    ("randaugment", "2,9", (2, 9)),
    ("clip_grad", "None", None),
    ("clip_grad", "null", None),
    ("ema_decay", "9.99e-1", 0.999),
    ("classes", "3", 3),
    ("classes", "0-5", "0-5"),
    ("budget_s", "10m", 600.0),
]


@pytest.mark.parametrize(("key", "text", "value"), VALUES)
def test_a_value_is_read_as_its_field_type_from_a_flag_and_from_yaml(key, text, value, tmp_path: Path) -> None:
    from_flag = TrainConfig.from_dict(parse_set([f"{key}={text}"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: {text}\n")
    from_yaml = TrainConfig.from_sources(recipe)
    for cfg in (from_flag, from_yaml):
        got = getattr(cfg, key)
        assert got == value and type(got) is type(value), (key, text, got)


def test_yaml_1e_3_is_a_float_everywhere_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nmin_lr: 1E-5\nmodel_args:\n  attn_drop_rate: 1e-1\n")
    values = load_yaml(recipe)
    assert values == {"lr": 0.001, "min_lr": 1e-5, "model_args": {"attn_drop_rate": 0.1}}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("lr=abc", "lr must be a number, got 'abc'"),
        ("epochs=2.5", "epochs must be a whole number, got 2.5"),
        ("hflip=2", "hflip must be true or false, got 2"),
        ("betas=[0.9]", "betas must be a list of 2 numbers, got [0.9]"),
        ("clip_grad=high", "clip_grad must be a number or null, got 'high'"),
        ("model_args=3", "model_args must be a mapping, got 3"),
        ("lr=.nan", "lr must be a number"),
    ],
)
def test_a_wrong_type_is_one_line_naming_the_key_and_the_type(item: str, message: str) -> None:
    with pytest.raises(VitlabError) as e:
        TrainConfig.from_dict(parse_set([item]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_reads_set_values_by_type_and_refuses_a_wrong_one_in_one_line() -> None:
    r = CliRunner().invoke(cli, ["train", "--data", "digits", "--set", "lr=fast"])
    assert r.exit_code == 2 and r.output.strip() == "error: lr must be a number, got 'fast'"
    from vitlab.cli import _train_config

    cfg = _train_config(None, False, {"model": "vit_tiny_patch7_28", **parse_set(["lr=1e-3", "min_lr=1E-5"])})
    assert (cfg.lr, cfg.min_lr) == (0.001, 1e-5)


# --- model_args --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "items",
    [
        ["model_args.depth=2", "model_args.depth=3"],
        ["model_args={depth: 2, embed_dim: 8}", "model_args.depth=3"],
        ["model_args.depth=3", "model_args={depth: 2}"],
        ["lr=0.1", "lr=0.2"],
    ],
)
def test_a_set_key_given_twice_is_an_error(items: list[str]) -> None:
    with pytest.raises(VitlabError, match=r"--set gives \S+ twice"):
        parse_set(items)


def test_a_flag_and_a_set_of_the_same_option_is_an_error() -> None:
    r = CliRunner().invoke(cli, ["train", "--lr", "0.1", "--set", "lr=0.2"])
    assert r.exit_code == 2 and "lr is given both by a flag and by --set" in r.output


def test_a_key_twice_in_a_yaml_mapping_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_args:\n  depth: 2\n  embed_dim: 8\n  depth: 3\n")
    with pytest.raises(VitlabError, match=r"'depth' is given twice \(lines 2 and 4\)"):
        load_yaml(recipe)


def test_set_changes_one_model_arg_of_the_recipe_and_keeps_the_others(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_tiny_patch7_28\nmodel_args: {depth: 6, embed_dim: 32}\n")
    for item in ("model_args.depth=2", "model_args={depth: 2}"):
        cfg = TrainConfig.from_sources(recipe, **parse_set([item]))
        assert cfg.model_args == {"depth": 2, "embed_dim": 32}, item


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("{num_classes: 3}", "model_args.num_classes comes from the data"),
        ("{drop_path_rate: 0.1}", "model_args.drop_path_rate is the training option drop_path_rate"),
        ("{pretrained: true}", "model_args.pretrained is --init"),
        ("{drop_rate: 1.0}", "model_args.drop_rate must be a probability in [0, 1), got 1.0"),
    ],
)
def test_model_args_that_clash_with_the_trainer_are_one_line(model_args: str, message: str) -> None:
    """These reached create_model(num_classes=..., drop_path_rate=..., **model_args): a raw TypeError 'got multiple
    values for keyword argument'."""
    args = ["train", "--data", "digits", "--model", "vit_tiny_patch7_28", "--epochs", "1", "--max-steps", "1"]
    r = CliRunner().invoke(cli, [*args, "--set", f"model_args={model_args}"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output


def test_drop_path_rate_of_one_is_refused() -> None:
    with pytest.raises(VitlabError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        TrainConfig.from_dict(parse_set(["drop_path_rate=1"]))
    assert TrainConfig.from_dict(parse_set(["drop_path_rate=0.99"])).drop_path_rate == 0.99
