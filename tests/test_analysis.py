"""Inspection tools: attention maps and rollout, attention distance, position-embedding similarity, effective
receptive fields, open-set scores and probes."""

from __future__ import annotations

import pytest
import torch

import vitlab
from conftest import input_for, move_off_init, tiny_model
from vitlab.analysis import (
    attention_maps,
    attention_rollout,
    auroc,
    conv_stack,
    effective_receptive_field,
    extract_features,
    few_shot_probe,
    fpr_at_tpr,
    mean_attention_distance,
    neighbour_contrast,
    openset_scores,
    patch_distances,
    pos_embed_similarity,
    random_known_splits,
    reference_similarities,
)
from vitlab.layers import attention_modules

ATTENTION = [n for n in vitlab.list_models() if attention_modules(tiny_model(n))]


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_maps_of_every_attention_model(name: str) -> None:
    model = move_off_init(tiny_model(name)).eval()
    x = input_for(model)
    fused = [m.fused_attn for _, m in attention_modules(model)]
    with torch.no_grad():
        default = model(x)
    maps, out = attention_maps(model, x, return_output=True)
    assert len(maps) >= len(attention_modules(model))
    for m in maps:
        assert m.ndim == 4 and m.shape[0] % 2 == 0
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, default, atol=1e-5, rtol=1e-5)
    assert [m.fused_attn for _, m in attention_modules(model)] == fused  # left as it was
    assert not model.training


def test_recorded_map_is_the_explicit_softmax() -> None:
    model = move_off_init(tiny_model("vit_tiny_patch4_28")).eval()
    x = input_for(model)
    seen = {}
    model.blocks[0].attn.register_forward_pre_hook(lambda _m, args: seen.setdefault("in", args[0]))
    maps = attention_maps(model, x)
    attn = model.blocks[0].attn
    B, N, C = seen["in"].shape
    q, k, _ = attn.qkv(seen["in"]).view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
    expected = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(-1)
    torch.testing.assert_close(maps[0], expected, atol=1e-6, rtol=1e-5)


def test_rollout_of_uniform_and_identity_attention_is_uniform() -> None:
    B, h, n = 2, 3, 1 + 16
    uniform = [torch.full((B, h, n, n), 1 / n) for _ in range(4)]
    r = attention_rollout(uniform, num_prefix_tokens=1)
    torch.testing.assert_close(r, torch.full((B, 16), 1 / 16))
    identity = [torch.eye(n).expand(B, h, n, n) for _ in range(4)]
    torch.testing.assert_close(attention_rollout(identity, pool="avg"), torch.full((B, 16), 1 / 16))
    # identity everywhere but one layer where the class token reads only patch 5: all relevance on patch 5
    focus = torch.eye(n).expand(B, h, n, n).clone()
    focus[:, :, 0] = 0
    focus[:, :, 0, 1 + 5] = 1
    r = attention_rollout([*identity[:2], focus], head_fusion="max")
    assert r.argmax(-1).tolist() == [5, 5]


def test_rollout_discard_and_class_attention() -> None:
    torch.manual_seed(0)
    maps = [torch.rand(1, 2, 10, 10).softmax(-1) for _ in range(3)]
    for ratio in (0.0, 0.5, 0.9):
        r = attention_rollout(maps, discard_ratio=ratio)
        assert r.shape == (1, 9) and torch.isclose(r.sum(), torch.tensor(1.0))
    # CaiT: self-attention over patches only, then class attention reading them
    patches = [torch.eye(4).expand(1, 2, 4, 4)]
    ca = torch.zeros(1, 2, 1, 5)
    ca[..., 0, 3] = 1.0  # the class token reads patch 2 (key 0 is the class token itself)
    r = attention_rollout([*patches, ca])
    assert r.argmax().item() == 2


def test_attention_distance_of_a_uniform_map_is_the_mean_pairwise_distance() -> None:
    grid, patch = (4, 5), 7
    n = 20
    maps = [torch.full((2, 3, 1 + n, 1 + n), 1 / (1 + n))]
    d = mean_attention_distance(maps, grid, patch, num_prefix_tokens=1)
    assert d.shape == (1, 3)
    torch.testing.assert_close(d, torch.full((1, 3), patch_distances(grid, patch).mean().item()))
    local = [torch.eye(1 + n).expand(2, 3, 1 + n, 1 + n)]  # every patch attends to itself: distance 0
    assert mean_attention_distance(local, grid, patch).abs().max() == 0


def test_pos_embed_similarity() -> None:
    model = tiny_model("vit_tiny_patch4_28")
    sim, grid = pos_embed_similarity(model)
    n = grid[0] * grid[1]
    assert sim.shape == (n, n)
    torch.testing.assert_close(sim.diagonal(), torch.ones(n))


def test_reference_tables_read_a_learned_one() -> None:
    grid = (7, 7)
    ref = reference_similarities(grid, 64, seed=0)
    assert set(ref) == {"random", "sincos 2-D"}
    for sim in ref.values():
        assert sim.shape == (49, 49)
        torch.testing.assert_close(sim.diagonal(), torch.ones(49))
    random, sincos = neighbour_contrast(ref["random"], grid), neighbour_contrast(ref["sincos 2-D"], grid)
    assert abs(random["near"] - random["far"]) < 0.05  # a random table has no locality beyond chance
    assert sincos["near"] > sincos["far"] + 0.1  # the sine-cosine table's neighbours are alike by construction
    # by hand: patch 0's only similar patch is its right neighbour
    sim = torch.eye(4)
    sim[0, 1] = sim[1, 0] = 1.0
    c = neighbour_contrast(sim, (1, 4))  # a 1 x 4 row: 3 neighbour pairs each way, 3 pairs two or more apart
    assert c == {"near": pytest.approx(2 / 6), "far": pytest.approx(0.0)}


def test_random_known_splits() -> None:
    splits = random_known_splits(10, 6, 5, seed=0)
    assert len(splits) == 5 and len({tuple(s) for s in splits}) == 5
    assert all(len(s) == 6 and s == sorted(s) and set(s) <= set(range(10)) for s in splits)
    assert random_known_splits(10, 6, 5, seed=0) == splits and random_known_splits(10, 6, 5, seed=1) != splits
    with pytest.raises(vitlab.VitlabError, match="different splits"):
        random_known_splits(4, 2, 7)
    with pytest.raises(vitlab.VitlabError, match="known classes"):
        random_known_splits(10, 10, 1)


def _saved(model: torch.nn.Module, directory, **train) -> str:
    """``model`` saved as a training run saves its checkpoint, with the run's data and step."""
    from vitlab.checkpoint import save_pretrained

    save_pretrained(model, directory, **train)
    return str(directory)


def test_erf_figures_name_each_model_by_its_run(tmp_path, monkeypatch) -> None:
    """Two checkpoints both called ``best``: each panel names its model, data and step, not the directory."""
    import vitlab.analysis.run as run

    vit = _saved(tiny_model("vit_tiny_patch4_28"), tmp_path / "vit" / "best", dataset="digits", step=12,
                 train_config={"model_args": {"depth": 1}})  # fmt: skip
    cnn = _saved(tiny_model("resnet18_28"), tmp_path / "cnn" / "best", dataset="fashion-mnist", step=34)
    drawn = {}
    monkeypatch.setattr(run, "erf_figure", lambda panels, out, title: drawn.__setitem__(out.name, (panels, title)))
    res = run.erf_study(tmp_path / "erf", checkpoint=vit, compare=(cnn, vit), inits=1, size=16)
    (cnn_label, _), (vit_label, _) = drawn["erf_compare.png"][0]
    assert "resnet18_28" in cnn_label and "fashion-mnist" in cnn_label and "step 34" in cnn_label
    assert "vit_tiny_patch4_28 (depth 1)" in vit_label and "digits" in vit_label and "step 12" in vit_label
    assert "best" not in cnn_label + vit_label
    title = drawn["erf_training.png"][1]
    assert "vit_tiny_patch4_28" in title and "digits" in title and "step 12" in title
    assert res["compare"][cnn]["label"].startswith("resnet18_28")


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_erf_of_stacked_3x3_convs_is_confined_to_their_theoretical_field(depth: int) -> None:
    res = effective_receptive_field(lambda: conv_stack(depth, 4), (1, 15, 15), inits=2, batch=2)
    rows, cols = torch.nonzero(res.support, as_tuple=True)
    side = 2 * depth + 1
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (side, side)
    assert res.support.sum() == side * side
    assert 0 < res.radius95 <= res.theoretical_radius and torch.isclose(res.grad.sum(), torch.tensor(1.0))


def test_erf_of_a_vit_covers_the_image_and_picks_a_layer() -> None:
    model = move_off_init(tiny_model("vit_tiny_patch4_28"))
    res = effective_receptive_field(model, (1, 8, 8), layer=0, inits=1, batch=2)
    assert res.support.all()  # one attention layer already reaches every pixel


def test_openset_metrics() -> None:
    known, unknown = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.1, 0.2])
    assert auroc(known, unknown) == 1.0 and auroc(unknown, known) == 0.0
    assert fpr_at_tpr(known, unknown) == 0.0
    torch.manual_seed(0)
    a, b = torch.randn(200) + 1, torch.randn(300)
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score([1] * 200 + [0] * 300, torch.cat([a, b]).numpy())
    assert abs(auroc(a, b) - expected) < 1e-9
    ties = auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0]))
    assert ties == 0.5
    s = openset_scores(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(s["max_logit"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(
        s["max_softmax"], torch.tensor([torch.tensor(2.0).exp() / (1 + torch.tensor(2.0).exp()), 0.5])
    )


def test_few_shot_probe_on_digits_features() -> None:
    from vitlab.data import build_dataset

    splits = build_dataset("digits", img_size=(8, 8), in_chans=1)
    model = vitlab.create_model("vit_tiny_patch4_28", img_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10)
    model.default_cfg.update(mean=splits.mean, std=splits.std)
    train = extract_features(model, splits.train)
    test = extract_features(model, splits.test)
    assert train[0].shape[1] == model.num_features
    res = few_shot_probe(train, test, shots=(1, 4, "all"), draws=3)
    assert res["1"]["draws"] == 3 and res["all"]["draws"] == 1
    # random features of a random network still separate digits better with more labels
    assert res["all"]["accuracy"] > res["1"]["accuracy"] and res["all"]["accuracy"] > 0.5
    inter = extract_features(model, splits.test, layer=0, limit=50)
    assert inter[0].shape == (50, 32)


def test_cli_commands_write_their_pictures(digits_checkpoint, tmp_path) -> None:
    trained = digits_checkpoint
    import json

    from click.testing import CliRunner
    from PIL import Image

    from vitlab.cli import cli

    runner = CliRunner()
    img = tmp_path / "seven.png"
    Image.new("L", (28, 28), 0).save(img)
    r = runner.invoke(cli, ["explain", str(trained), str(img), "--out", str(tmp_path / "ex")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ex" / "seven_rollout.png").stat().st_size > 1000
    assert (tmp_path / "ex" / "seven_heads.png").stat().st_size > 1000

    r = runner.invoke(
        cli, ["inspect", str(trained), "--data", "digits", "--images", "16", "--out", str(tmp_path / "in")]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "in" / "inspect.json").read_text())
    assert len(res["mean_attention_distance"]) == 2 and len(res["mean_attention_distance"][0]) == 2
    # the freshly initialised model's distances beside the trained one's, and the reference tables beside its own
    init = torch.tensor(res["mean_attention_distance_init"])
    assert init.shape == (2, 2) and not torch.equal(init, torch.tensor(res["mean_attention_distance"]))
    uniform = res["uniform_attention_distance"]
    assert ((init - uniform).abs() < 0.2 * uniform).all()  # a fresh model attends nearly uniformly
    assert set(res["pos_embed_near_far"]) == {"trained", "random", "sincos 2-D"}
    assert (tmp_path / "in" / "distance.png").exists() and (tmp_path / "in" / "pos_embed.png").exists()

    r = runner.invoke(
        cli,
        [
            "erf",
            "--checkpoint",
            str(trained),
            "--compare",
            str(trained),
            "--inits",
            "1",
            "--out",
            str(tmp_path / "erf"),
        ],
    )
    assert r.exit_code == 0, r.output
    for name in ("erf_depth.png", "erf_training.png", "erf_compare.png", "erf.json"):
        assert (tmp_path / "erf" / name).exists(), name
    depth = json.loads((tmp_path / "erf" / "erf.json").read_text())["depth"]
    assert depth["1"]["theoretical_radius"] < depth["16"]["theoretical_radius"]

    r = runner.invoke(cli, ["probe", str(trained), "--data", "digits", "--draws", "2", "--out", str(tmp_path / "pr")])
    assert r.exit_code == 0, r.output
    shots = json.loads((tmp_path / "pr" / "probe.json").read_text())["shots"]
    assert set(shots) == {"1", "2", "4", "8", "16", "all"}
    assert (tmp_path / "pr" / "probe.png").exists()


def test_openset_end_to_end(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from vitlab.cli import cli

    tiny = json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2})
    args = [
        "openset",
        "--model",
        "vit_tiny_patch7_28",
        "--data",
        "digits",
        "--known",
        "0-4",
        "--out",
        str(tmp_path),
        "--set",
        "epochs=2",
        "--set",
        "precision=fp32",
        "--set",
        f"model_args={tiny}",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "openset.json").read_text())
    assert res["known_classes"] == ["0", "1", "2", "3", "4"] and res["unknown_classes"] == ["5", "6", "7", "8", "9"]
    assert res["known_test_images"] + res["unknown_test_images"] == 180
    for name in ("max_logit", "max_softmax"):
        assert 0.0 <= res[name]["auroc"] <= 1.0 and 0.0 <= res[name]["fpr95"] <= 1.0
        assert (tmp_path / f"openset_{name}.png").stat().st_size > 1000
        # Mann-Whitney U adds over the unknown classes: the overall AUROC is their image-weighted mean
        per_class = [v[name] for v in res["per_unknown_class"].values()]
        assert res["per_unknown_class"].keys() == set(res["unknown_classes"])
        assert res[name]["auroc"] == pytest.approx(sum(per_class) / len(per_class), abs=0.02)  # ~18 images each
    assert "vit_tiny_patch7_28" in res["model_label"] and "digits" in res["model_label"]


def test_openset_over_random_splits(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from vitlab.cli import cli

    tiny = json.dumps({"depth": 1, "embed_dim": 16, "num_heads": 2})
    args = ["openset", "--model", "vit_tiny_patch7_28", "--data", "digits", "--out", str(tmp_path)]
    sets = ["--set", "epochs=1", "--set", "precision=fp32", "--set", f"model_args={tiny}"]
    r = CliRunner().invoke(cli, [*args, "--splits", "2", "--num-known", "7", "--seed", "3", *sets])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "openset.json").read_text())
    drawn = random_known_splits(10, 7, 2, seed=3)
    assert [s["known_classes"] for s in res["splits"]] == [[str(c) for c in known] for known in drawn]
    for name in ("max_logit", "max_softmax", "closed_set_test_accuracy"):
        values = [s[name] for s in res["splits"]]
        assert res[name]["mean"] == pytest.approx(sum(values) / 2)
    unknown = [c for s in res["splits"] for c in s["unknown_classes"]]
    assert {c: v["splits"] for c, v in res["per_unknown_class"].items()} == {c: unknown.count(c) for c in unknown}
    assert (tmp_path / "openset_splits.png").stat().st_size > 1000 and (tmp_path / "split-1" / "openset.json").exists()
    assert "0, 1" in r.output or "known classes" in r.output
    both = CliRunner().invoke(cli, [*args, "--known", "0-5", "--splits", "2"])
    assert both.exit_code != 0 and "either --known" in both.output
