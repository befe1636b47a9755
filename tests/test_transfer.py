"""Transfer learning as the ViT paper fine-tunes: a fresh head, resampled position embeddings, adapted input
channels, layer-wise learning-rate decay, and published weights through a local Hugging Face Hub cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from conftest import move_off_init
from vitlab.checkpoint import load_for_finetuning
from vitlab.train.optim import layer_ids, param_groups

transformers = pytest.importorskip("transformers")


def _hf_vit_dir(tmp_path, *, chans=3, img=32, pooler=True):
    cfg = transformers.ViTConfig(
        image_size=img,
        patch_size=8,
        num_channels=chans,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=7,
    )
    cls = transformers.ViTModel if pooler else transformers.ViTForImageClassification
    hf = cls(cfg, add_pooling_layer=True) if pooler else cls(cfg)
    move_off_init(hf)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_finetune_from_hf_rgb_to_grayscale_at_a_new_size(tmp_path) -> None:
    src = _hf_vit_dir(tmp_path)  # RGB, 32 px, pre-training head (pooler: linear + tanh)
    rgb = vitlab.from_pretrained(src)
    assert rgb.num_features == 32 and hasattr(rgb.pre_logits, "fc")
    model = load_for_finetuning(src, num_classes=4, img_size=48, in_chans=1)
    assert model.num_classes == 4 and model.default_cfg["input_size"] == (1, 48, 48)
    assert isinstance(model.pre_logits, torch.nn.Identity)  # the whole pre-training head is gone
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert model.pretrained_cfg["init"] == str(src)
    # a grayscale image through the summed filters equals the same image as equal R, G, B through the original
    same = load_for_finetuning(src, num_classes=4, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            same.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5
        )


def test_finetune_to_more_channels_and_the_mismatch_error(tmp_path) -> None:
    src = _hf_vit_dir(tmp_path, chans=1, pooler=False)
    model = load_for_finetuning(src, num_classes=3, in_chans=3)
    w = model.patch_embed.proj.weight
    torch.testing.assert_close(w.sum(1, keepdim=True), vitlab.from_pretrained(src).patch_embed.proj.weight)
    with pytest.raises(
        vitlab.VitlabError, match=r"parameter 'blocks.0.mlp.fc1.\w+' has shape \(64.*in the checkpoint but \(128"
    ):
        vitlab.from_pretrained(src, mlp_ratio=4.0)


def test_layer_decay_scales_learning_rates_by_depth() -> None:
    model = vitlab.create_model("vit_tiny_patch7_28", depth=3, embed_dim=32, num_heads=2)
    ids = layer_ids(model)
    assert ids["patch_embed.proj.weight"] == ids["cls_token"] == 0
    assert [ids[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["head.weight"] == ids["norm.weight"] == 4
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[2].mlp.fc1.weight)] == 0.5
    assert scale[id(model.patch_embed.proj.weight)] == 0.5**4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim == 1 for p in g["params"]))


def _hub_cache(root, repo_id: str, files: dict[str, bytes]) -> None:
    """A snapshot in huggingface_hub's cache layout, as a download would leave it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def _timm_repo_files(model, tmp_path, architecture: str) -> dict[str, bytes]:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    return {"config.json": json.dumps(config).encode(), "model.safetensors": (tmp_path / "w.safetensors").read_bytes()}


def test_pretrained_weights_through_the_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "vit_tiny_patch16_224"
    published = move_off_init(vitlab.create_model(name)).eval()
    repo_id = vitlab.create_model(name).default_cfg["hf_hub_id"]
    _hub_cache(tmp_path / "cache", repo_id, _timm_repo_files(published, tmp_path, name))
    x = torch.randn(1, 3, 224, 224)
    loaded = vitlab.from_pretrained(f"hf-hub:{repo_id}")
    assert loaded.model_name == name
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), published(x), atol=0, rtol=0)
    tuned = vitlab.create_model(name, pretrained=True, num_classes=10)
    assert tuned.num_classes == 10 and torch.count_nonzero(tuned.head.weight) == 0
    torch.testing.assert_close(tuned.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)


def test_hub_offline_without_a_cache_is_one_clear_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vitlab.VitlabError, match="huggingface-cli download") as e:
        vitlab.from_pretrained("hf-hub:someone/not-here")
    assert "\n" not in str(e.value)
    with pytest.raises(vitlab.VitlabError, match="no published weights"):
        vitlab.create_model("vit_tiny_patch7_28", pretrained=True)


# --- the command line: vitlab train --init / --freeze / --layer-decay --------------------------------------------
def _train_cli(*args: str):
    from click.testing import CliRunner

    from vitlab.cli import cli

    base = ["train", "--data", "digits", "--precision", "fp32", "--batch-size", "64", "--set", "threads=1"]
    r = CliRunner().invoke(cli, [*base, *map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def _best(run):
    return json.loads((run / "checkpoints" / "best" / "config.json").read_text())


@pytest.mark.parametrize("chans", [3, 1])
def test_cli_finetunes_a_hf_checkpoint_on_digits(tmp_path, chans) -> None:
    """A HF ViT (32 px, RGB or grayscale) fine-tuned on 8x8 grayscale digits: upsampled to 32 px, the stem adapted
    to 1 channel; the checkpoint's normalisation is kept only when the channels match."""
    src = _hf_vit_dir(tmp_path, chans=chans, pooler=False)
    run = tmp_path / "run"
    r = _train_cli("--init", src, "--max-steps", 6, "--set", "warmup_epochs=0", "--out", run)
    assert "a new zero-initialised head for 10 classes, input 1x32x32" in r.output
    config = _best(run)
    assert config["class_names"] == [str(i) for i in range(10)]
    assert config["init"]["source"] == str(src) and config["init"]["architecture"] == "vit"
    assert config["input_size"] == [1, 32, 32] and config["model_args"]["in_chans"] == 1
    from vitlab.data import build_dataset

    if chans == 1:
        pretrained = vitlab.from_pretrained(src).default_cfg
        assert config["mean"] == list(pretrained["mean"]) and config["std"] == list(pretrained["std"])
        assert config["init"]["normalisation"].startswith("the checkpoint's")
    else:
        data = build_dataset("digits")
        assert config["mean"] == pytest.approx(list(data.mean)) and config["std"] == pytest.approx(list(data.std))
        assert config["init"]["normalisation"].startswith("the data's")
    tuned = vitlab.from_pretrained(run / "checkpoints" / "last")
    start = load_for_finetuning(src, num_classes=10, in_chans=1)
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)  # the backbone trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "vit_foreign" and summary["steps"] == 6


def _vitlab_resnet_dir(tmp_path):
    """A small ResNet checkpoint (BatchNorm statistics moved off their initialisation) as vitlab saves it."""
    model = move_off_init(
        vitlab.create_model("resnet18_28", layers=(1, 1), channels=(8, 16), stem_width=8, num_classes=5)
    )
    vitlab.save_pretrained(model, tmp_path / "resnet")
    return tmp_path / "resnet"


@pytest.mark.parametrize("kind", ["hf-vit", "vitlab-resnet"])
def test_freeze_backbone_trains_only_the_classifier(tmp_path, kind) -> None:
    src = _hf_vit_dir(tmp_path, pooler=False) if kind == "hf-vit" else _vitlab_resnet_dir(tmp_path)
    run = tmp_path / "run"
    r = _train_cli("--init", src, "--freeze", "backbone", "--max-steps", 5, "--lr", "0.01", "--out", run)
    start = load_for_finetuning(src, num_classes=10, in_chans=1).state_dict()
    trained = vitlab.from_pretrained(run / "checkpoints" / "last").state_dict()
    heads = set(vitlab.from_pretrained(run / "checkpoints" / "last").head_names)
    is_head = {k: any(k.startswith(f"{h}.") for h in heads) for k in start}
    assert trained.keys() == start.keys() and any(is_head.values())
    for k in start:  # BatchNorm statistics included: the frozen backbone runs in inference mode
        if is_head[k]:
            assert not torch.equal(trained[k], start[k]), k
        else:
            assert torch.equal(trained[k], start[k]), k
    trainable = sum(v.numel() for k, v in start.items() if is_head[k])
    assert f"training only the classifier ({trainable:,} parameters)" in r.output


def test_layer_decay_from_the_cli_sets_each_group_lr(tmp_path) -> None:
    src = _hf_vit_dir(tmp_path, pooler=False)
    run = tmp_path / "run"
    _train_cli("--init", src, "--layer-decay", "0.5", "--max-steps", 3, "--lr", "0.004", "--out", run)
    state = torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    last_lr = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["lr"]
    groups = state["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.5**3, 0.5**2, 0.5, 1.0]  # embedding, 2 blocks, head
    for g in groups:
        assert g["lr"] == pytest.approx(last_lr * g["lr_scale"], rel=1e-12)
    # the parameters' depths: the same grouping as param_groups on the fine-tuned model
    model = load_for_finetuning(src, num_classes=10, in_chans=1)
    expected = param_groups(model, 0.05, layer_decay=0.5)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in expected]


def test_resume_of_a_finetuning_run_is_exact_and_does_not_reread_the_init(tmp_path) -> None:
    from vitlab.train import TrainConfig, train

    class Interrupted(Exception):
        pass

    def stop_at_step_12(model, splits, record):
        if record["step"] == 12:
            raise Interrupted  # after the step-10 checkpoint, before the one of step 12
        return None

    src = _hf_vit_dir(tmp_path, pooler=False)
    args = dict(
        data="digits", init=str(src), epochs=2, batch_size=64, precision="fp32", threads=1, layer_decay=0.7,
        eval_every=4, checkpoint_every=5, lr=2e-3,
    )  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(TrainConfig(**args, out=str(full)))
    with pytest.raises(Interrupted):
        train(TrainConfig(**args, out=str(cut)), on_eval=stop_at_step_12)
    src.rename(tmp_path / "gone")  # resume reads the run's own checkpoint, never the init again
    r = _train_cli("--resume", "--out", cut)
    assert f"resumed {cut} at step 10" in r.output
    lines = [
        [{k: v for k, v in json.loads(x).items() if k not in ("images_per_s", "time_s")} for x in f.splitlines()]
        for f in ((full / "metrics.jsonl").read_text(), (cut / "metrics.jsonl").read_text())
    ]
    assert lines[0] == lines[1]
    a = load_file(full / "checkpoints" / "last" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _best(cut)["init"] == _best(full)["init"]
