"""Export to HF transformers and timm layouts: a tiny model of each family with an HF twin, its weights moved off
their initialisation, loads in transformers under the class its config names with every weight found, and gives
vitlab's outputs; the timm layout of each timm family has timm's names and reads back through vitlab's timm
converter to the same outputs, class names and normalisation; a family or option the other library cannot express
is a one-line error naming what it can do; a failed check keeps the previous export; `vitlab export --format hf`
on a trained digits checkpoint writes its class names as id2label."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import vitlab
from conftest import move_off_init, tiny_model
from vitlab._registry import Exported, exporter
from vitlab.cli import cli
from vitlab.errors import VitlabError
from vitlab.export import export_hf, export_timm
from vitlab.export.layouts import default_export_dir
from vitlab.models.clip import create_clip

transformers = pytest.importorskip("transformers")

NAMES = ["cat", "dog", "ship", "tree", "car"]  # the tiny models' 5 classes
MEAN, STD = (0.25,), (0.125,)  # a run's own normalisation, not any variant's default

# case -> (variant, overrides on its tiny configuration, the transformers class the export names)
HF_CASES = {
    "vit": ("vit_tiny_patch4_28", {}, "ViTForImageClassification"),
    # a fixed sin-cos table covering the patches only (DeiT III's layout): HF's learned table with zero class row
    "vit_sincos_no_embed_class": (
        "vit_tiny_patch4_28",
        {"pos_embed": "sincos", "no_embed_class": True, "act": "gelu_tanh"},
        "ViTForImageClassification",
    ),
    "deit_distilled": ("deit_tiny_distilled_patch4_28", {}, "DeiTForImageClassificationWithTeacher"),
    "deit_one_head": ("deit_tiny_distilled_patch4_28", {"dist_head": False}, "DeiTForImageClassification"),
    "swin": ("swin_tiny_patch2_window7_28", {}, "SwinForImageClassification"),
    # HF's CvT classifies the class token and needs more than i blocks in stage i
    "cvt": ("cvt_7_28", {"global_pool": "token", "depth": (1, 2, 3)}, "CvtForImageClassification"),
    "resnet_basic": ("resnet18", {}, "ResNetForImageClassification"),
    "resnet_bottleneck": ("resnet50", {}, "ResNetForImageClassification"),
    "convnext": ("convnext_atto_28", {}, "ConvNextForImageClassification"),
}


def _trained_like(name: str, **extra) -> torch.nn.Module:
    """A tiny model with random (not initial) weights and BatchNorm statistics, the run's class names and
    normalisation, as `from_pretrained` gives a trained checkpoint."""
    model = move_off_init(tiny_model(name, **extra), std=0.2).eval()
    c = model.default_cfg["input_size"][0]
    model.pretrained_cfg = {"class_names": NAMES, "mean": MEAN * c, "std": STD * c}
    return model


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_export_loads_in_transformers_with_our_logits(case, tmp_path) -> None:
    name, extra, cls_name = HF_CASES[case]
    model = _trained_like(name, **extra)
    result = export_hf(model, tmp_path / "hf")
    assert result["max_abs_diff"] <= 1e-4 and result["checked_with"].startswith("transformers")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls_name]
    auto = transformers.AutoModelForImageClassification  # it builds the class config.json names
    theirs, info = auto.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(3, *model.default_cfg["input_size"])
    with torch.no_grad():
        ours, got = model(x), theirs.eval()(pixel_values=x).logits
    assert ours.std(dim=0).max() > 1e-3  # logits that depend on the image, not a constant on both sides
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=1e-4)
    assert theirs.config.id2label == dict(enumerate(NAMES))
    assert theirs.config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert theirs.config.num_channels == model.default_cfg["input_size"][0]
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    c, h, w = model.default_cfg["input_size"]
    assert processor["image_mean"] == list(MEAN * c) and processor["image_std"] == list(STD * c)
    assert processor["size"] == {"height": h, "width": w}


def test_hf_export_of_clip_loads_as_clipmodel(tmp_path) -> None:
    image_args = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 8, "patch_size": 4, "pre_norm": True}
    text_args = {"width": 32, "depth": 2, "num_heads": 2, "context_length": 16, "vocab_size": 64, "eot_token_id": 63}
    model = create_clip(
        "vit_tiny_patch4_28", "text_transformer_tiny", image_args=image_args, text_args=text_args, embed_dim=16
    )
    move_off_init(model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above log(100): ours clips it, so the export writes the clipped value
    result = export_hf(model, tmp_path / "clip")
    assert result["max_abs_diff"] <= 1e-4

    theirs, info = transformers.CLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    images = torch.randn(3, 1, 8, 8)
    ids = torch.randint(0, 63, (4, 9))
    ids[torch.arange(4), torch.tensor([2, 5, 8, 3])] = 63  # [EOS] at a different place in each text
    with torch.no_grad():
        ours, got = model(images, ids), theirs.eval()(input_ids=ids, pixel_values=images)
    torch.testing.assert_close(got.logits_per_image, ours.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.text_embeds, ours.text_embeds, atol=1e-5, rtol=1e-4)


# case -> (variant, overrides on its tiny configuration, names timm's state dict has, ours it has not)
TIMM_CASES = {
    "vit": ("vit_tiny_patch4_28", {"act": "gelu_tanh"}, ["blocks.0.attn.qkv.weight"], []),
    "vit_avg_pool_no_class_token": (
        "vit_tiny_patch4_28",
        {"class_token": False, "global_pool": "avg", "fc_norm": True},
        ["fc_norm.weight"],
        [],
    ),
    "deit3": ("deit3_small_patch16_224", {}, ["blocks.0.ls1.gamma"], []),
    "deit_distilled": ("deit_tiny_distilled_patch4_28", {}, ["dist_token", "head_dist.weight"], []),
    "cait": (
        "cait_xxs24_patch4_28",
        {},
        ["blocks.0.gamma_1", "blocks_token_only.0.gamma_2", "blocks_token_only.0.attn.k.weight"],
        ["blocks.0.ls1.gamma", "blocks_token_only.0.attn.kv.weight"],
    ),
    "swin": ("swin_tiny_patch2_window7_28", {}, ["head.fc.weight"], ["head.weight"]),
    "resnet": ("resnet50", {}, ["layer1.0.conv3.weight", "fc.weight"], []),
    "convnext": (
        "convnext_atto",
        {"kernel_size": 5},
        ["stages.0.blocks.0.gamma", "head.fc.weight"],
        ["stages.0.blocks.0.ls.gamma"],
    ),
    # timm builds its hybrids' ResNet from the name: the R50 stages at full width, on a tiny ViT
    "hybrid": (
        "vit_base_r50_s16_224",
        {
            "backbone_layers": (3, 4, 9),
            "backbone_widths": (256, 512, 1024),
            "backbone_stem_width": 64,
            "backbone_groups": 32,
            "img_size": 32,
        },
        ["patch_embed.backbone.stages.2.blocks.8.conv3.weight"],
        [],
    ),
}


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_layout_reads_back_through_vitlab_converter(case, tmp_path) -> None:
    name, extra, timm_names, vitlab_names = TIMM_CASES[case]
    model = _trained_like(name, **extra)
    result = export_timm(model, tmp_path / "timm")
    assert result["max_abs_diff"] <= 1e-4 and "timm converter" in result["checked_with"]

    keys = set(load_file(tmp_path / "timm" / "model.safetensors"))
    assert set(timm_names) <= keys and not set(vitlab_names) & keys
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    c = model.default_cfg["input_size"][0]
    assert config["label_names"] == NAMES and config["num_classes"] == 5
    assert config["pretrained_cfg"]["mean"] == list(MEAN * c) and config["pretrained_cfg"]["std"] == list(STD * c)
    assert config["pretrained_cfg"]["input_size"] == list(model.default_cfg["input_size"])
    assert config["model_args"]["num_classes"] == 5

    back = vitlab.from_pretrained(tmp_path / "timm")
    assert back.arch == model.arch and back.pretrained_cfg["class_names"] == NAMES
    assert back.default_cfg["mean"] == MEAN * c and back.default_cfg["std"] == STD * c
    x = torch.randn(3, *model.default_cfg["input_size"])
    with torch.no_grad():
        ours = model(x)
        assert ours.std(dim=0).max() > 1e-3
        torch.testing.assert_close(back(x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "fmt, name, has",
    [
        ("hf", "cait_xxs24_patch4_28", "onnx, timm"),
        ("hf", "cct_2_3x2_28", "onnx"),
        ("timm", "cvt_7_28", "onnx, hf"),
    ],
)
def test_a_family_without_a_twin_is_a_one_line_error_naming_its_formats(fmt, name, has, tmp_path) -> None:
    with pytest.raises(
        VitlabError, match=f"cannot be exported to .*{fmt if fmt == 'timm' else 'HF'}.*exports to {has} "
    ) as e:
        (export_hf if fmt == "hf" else export_timm)(_trained_like(name), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fmt, name, extra, option",
    [
        ("hf", "vit_tiny_patch4_28", {"global_pool": "avg"}, "global_pool='avg'"),
        ("hf", "vit_tiny_patch4_28", {"init_values": 0.1}, "init_values=0.1"),
        ("hf", "resnet18_28", {}, "stem_type='cifar'"),
        ("hf", "cvt_7_28", {"global_pool": "token"}, "depth=[1, 1, 2]"),
        ("timm", "vit_tiny_patch4_28", {"head_hidden_dim": 8}, "head_hidden_dim=8"),
        ("timm", "deit_tiny_distilled_patch4_28", {"dist_head": False}, "dist_head=False"),
        ("timm", "vit_tiny_r11_s4_28", {}, "backbone_layers=[1]"),
    ],
)
def test_an_option_the_other_library_lacks_is_a_one_line_error_naming_it(fmt, name, extra, option, tmp_path) -> None:
    with pytest.raises(VitlabError, match=option.replace("[", r"\[").replace("]", r"\]")) as e:
        (export_hf if fmt == "hf" else export_timm)(_trained_like(name, **extra), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_a_failed_check_keeps_the_previous_export(fmt, tmp_path, monkeypatch) -> None:
    export = export_hf if fmt == "hf" else export_timm
    model = _trained_like("vit_tiny_patch4_28")
    out = tmp_path / "out"
    export(model, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    good = exporter(fmt, "vit")

    def wrong(m: torch.nn.Module) -> Exported:  # a mapping error: one weight written with the wrong values
        e = good(m)
        key = "vit.layernorm.weight" if fmt == "hf" else "norm.weight"
        return e._replace(state={**e.state, key: e.state[key] + 1})

    monkeypatch.setitem(vitlab._registry._exporters[fmt], "vit", wrong)
    with pytest.raises(VitlabError, match="differ from vitlab's by") as e:
        export(model, out)
    assert "\n" not in str(e.value)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert (tmp_path / "out.failed" / "model.safetensors").exists()


def test_without_transformers_the_hf_export_is_written_and_says_it_is_unchecked(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    result = export_hf(_trained_like("vit_tiny_patch4_28"), tmp_path / "hf")
    assert result["max_abs_diff"] is None and "not installed" in result["checked_with"]
    assert {f.name for f in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }


def test_default_directories(tmp_path) -> None:
    assert default_export_dir(tmp_path, "hf") == tmp_path / "hf"  # inside a checkpoint directory
    assert default_export_dir(tmp_path / "vit.pth", "timm") == tmp_path / "vit.timm"  # beside a file
    assert default_export_dir("hf-hub:timm/vit_tiny.augreg", "hf") == Path("vit_tiny.augreg.hf")  # not hf-hub:timm/


def test_cli_exports_a_trained_digits_checkpoint_with_its_class_names(digits_checkpoint, tmp_path) -> None:
    ckpt = tmp_path / "best"
    shutil.copytree(digits_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (ckpt / "config.json").write_text(json.dumps({**config, "class_names": names}))  # as a folder of named classes

    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "hf"])
    assert r.exit_code == 0, r.output
    assert str(ckpt / "hf") in r.output and "transformers" in r.output
    theirs = transformers.AutoModelForImageClassification.from_pretrained(ckpt / "hf").eval()
    assert theirs.config.id2label == dict(enumerate(names))
    ours = vitlab.from_pretrained(ckpt)
    x = torch.randn(4, *ours.default_cfg["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, ours(x), atol=1e-4, rtol=1e-4)
    processor = transformers.AutoImageProcessor.from_pretrained(ckpt / "hf")
    assert list(processor.image_mean) == config["mean"] and list(processor.image_std) == config["std"]

    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t" / "config.json").read_text())["label_names"] == names

    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "hf", "--opset", "18"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--opset" in r.output
