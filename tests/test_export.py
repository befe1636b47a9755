"""ONNX export: a tiny model of every family exports with a dynamic batch axis and matches eager PyTorch in
onnxruntime; the metadata carries class names and normalisation (and no local path); a mismatch fails the export
and keeps the previous file; a new export replaces the old one only once checked; `vitlab export`,
`vitlab predict --runtime onnx` and `vitlab serve --runtime onnx` on a trained checkpoint."""

from __future__ import annotations

import io
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import move_off_init, tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import vitlab
from vitlab._registry import get_variant
from vitlab.cli import cli
from vitlab.errors import VitlabError
from vitlab.export import OnnxClassifier, export_onnx

# one variant per family, with what makes the family hard to trace: class attention (CaiT), a distillation token
# (DeiT), a conditional position encoding (CPVT), shifted windows with masks (Swin), convolutional projections
# (CvT), a convolutional tokenizer and sequence pooling (CCT), a ResNet stem (hybrid), BatchNorm (ResNet), SPT and LSA
FAMILIES = [
    "vit_tiny_patch4_28",
    "deit_tiny_distilled_patch4_28",
    "cait_xxs24_patch4_28",
    "cpvt_tiny_gap_patch4_28",
    "swin_tiny_patch2_window7_28",
    "cvt_7_28",
    "cct_2_3x2_28",
    "vit_tiny_r11_s4_28",
    "resnet18_28",
    "vit_tiny_spt_lsa_patch4_28",  # shifted copies of the image, a masked diagonal and a learned temperature
    "vit_tiny_convstem_28",  # BatchNorm in the tokenizer
    "convnext_atto_28",
    "nonlocal_cnn_tiny_28",
    "axial_vit_tiny_patch2_28",
    "sasa_vit_tiny_patch2_28",
    "soft_attention_cnn_28",
    "hard_attention_cnn_28",
]


def test_every_family_is_covered() -> None:
    archs = {get_variant(n)[0].arch for n in vitlab.list_models()}
    assert archs == {get_variant(n)[0].arch for n in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_export_matches_eager_pytorch_at_any_batch(name, tmp_path) -> None:
    model = move_off_init(tiny_model(name)).eval()
    classes = [f"class {i}" for i in range(model.num_classes)]
    ckpt = vitlab.save_pretrained(model, tmp_path / "ckpt", class_names=classes, mean=[0.25], std=[0.5])
    r = export_onnx(ckpt)
    assert r["path"] == str(ckpt / "model.onnx") and r["max_abs_diff"] <= 1e-4
    onnx = OnnxClassifier(r["path"])
    assert isinstance(onnx.session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch axis
    for batch in (1, 5):
        x = torch.randn(batch, *model.default_cfg["input_size"])
        with torch.no_grad():
            expected = model(x)  # the model's default (fused attention) path
        torch.testing.assert_close(onnx.logits(x), expected, atol=1e-4, rtol=0)
    assert onnx.class_names == classes and onnx.model_name == name
    assert onnx.input_size == tuple(model.default_cfg["input_size"])
    assert onnx.mean == (0.25,) and onnx.std == (0.5,)


def _drifting(model):
    """``model`` whose eager forward drifts by 1e-3 from the graph that is traced."""
    head = model.forward_head

    def drifting_head(x, pre_logits=False):
        out = head(x, pre_logits=pre_logits)
        return out if torch.compiler.is_exporting() else out + 1e-3

    model.forward_head = drifting_head
    return model


def test_a_failed_export_keeps_the_previous_file_and_sets_the_failed_one_aside(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    export_onnx(tiny_model("vit_tiny_patch4_28").eval(), out)
    good = out.read_bytes()
    with pytest.raises(VitlabError, match=r"differ from PyTorch's by 0.001 .*was not written .*m.failed.onnx"):
        export_onnx(_drifting(tiny_model("vit_tiny_patch4_28").eval()), out)
    assert out.read_bytes() == good  # the previous good export, untouched
    assert OnnxClassifier(out).class_names == [str(i) for i in range(5)]
    failed = OnnxClassifier(tmp_path / "m.failed.onnx")  # the failed graph, for inspection
    assert failed.model_name == "vit_tiny_patch4_28"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed.onnx", "m.onnx"]  # no temporary left


def test_a_new_export_is_checked_before_it_replaces_the_old_one(tmp_path, monkeypatch) -> None:
    import vitlab.export.onnx as onnx_export

    out = tmp_path / "m.onnx"
    export_onnx(tiny_model("vit_tiny_patch4_28").eval(), out)
    old = out.read_bytes()
    checked = []

    def parity(model, path, shape):  # while the new graph is checked, readers of m.onnx still get the old one
        checked.append((path, out.read_bytes() == old))
        return real_parity(model, path, shape)

    real_parity = onnx_export._parity
    monkeypatch.setattr(onnx_export, "_parity", parity)
    export_onnx(move_off_init(tiny_model("vit_tiny_patch4_28")).eval(), out)
    [(path, unchanged)] = checked
    assert path != out and path.parent.parent == tmp_path and unchanged
    assert out.read_bytes() != old  # then replaced by the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _digit(tmp_path) -> str:
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[7] * 16).clip(0, 255).astype("uint8")  # an 8 x 8 digit, 0..16 -> 0..255
    path = tmp_path / "digit.png"
    Image.fromarray(pixels, mode="L").save(path)
    return str(path)


@pytest.fixture(scope="module")
def exported(digits_checkpoint):
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--format", "onnx"])
    assert r.exit_code == 0, r.output
    assert "model.onnx: opset" in r.output
    return digits_checkpoint


def test_metadata_of_a_trained_checkpoint(exported) -> None:
    import onnx

    proto = onnx.load(str(exported / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    config = json.loads((exported / "config.json").read_text())
    assert json.loads(meta["class_names"]) == config["class_names"] == [str(i) for i in range(10)]
    assert json.loads(meta["mean"]) == config["mean"] and json.loads(meta["std"]) == config["std"]
    assert json.loads(meta["input_size"]) == [1, 28, 28] and meta["model_name"] == "vit_tiny_patch7_28"
    assert proto.graph.input[0].name == "pixel_values" and proto.graph.output[0].name == "logits"
    # the source is the checkpoint's name, not where it lies on this machine
    assert meta["source"] == "best"
    for value in meta.values():
        assert str(exported.resolve().parent) not in value and str(exported.parent) not in value


def test_predict_with_onnxruntime_matches_torch(exported, tmp_path) -> None:
    image = _digit(tmp_path)
    runs = {}
    for runtime in ("torch", "onnx"):
        r = CliRunner().invoke(cli, ["predict", str(exported), image, "--top-k", "10", "--json", "--runtime", runtime])
        assert r.exit_code == 0, r.output
        runs[runtime] = {t["class"]: t["probability"] for t in json.loads(r.output)[0]["top"]}
    assert runs["onnx"].keys() == runs["torch"].keys()
    for k, p in runs["torch"].items():
        assert runs["onnx"][k] == pytest.approx(p, abs=1e-5)
    # the .onnx file alone is enough: its metadata holds the preprocessing and the class names
    r = CliRunner().invoke(cli, ["predict", str(exported / "model.onnx"), image, "--runtime", "onnx", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["top"][0]["class"] == max(runs["torch"], key=runs["torch"].get)


def test_export_options_and_errors(digits_checkpoint, tmp_path) -> None:
    import onnx

    out = tmp_path / "digits-opset18.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--out", str(out), "--opset", "18"])
    assert r.exit_code == 0, r.output
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 18
    # onnx runtime without an export: a one-line error naming the command that makes one
    r = CliRunner().invoke(cli, ["predict", str(tmp_path), "x.png", "--runtime", "onnx"])
    assert r.exit_code == 2 and "vitlab export" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_serve_with_onnxruntime(exported) -> None:
    from fastapi.testclient import TestClient

    from vitlab.serve import load_app

    buf = io.BytesIO()
    Image.new("L", (28, 28), 200).save(buf, format="PNG")
    files = {"file": ("x.png", buf.getvalue(), "image/png")}
    answers = {}
    for runtime in ("torch", "onnx"):
        with TestClient(load_app(str(exported), runtime=runtime), base_url="http://127.0.0.1:8000") as c:
            assert c.get("/v1/model").json()["runtime"] == runtime
            answers[runtime] = c.post("/v1/predict?top_k=10", files=files).json()["top"]
            assert c.post("/v1/explain", files=files).status_code == 200  # explained with the checkpoint's model
    for a, b in zip(answers["onnx"], answers["torch"]):
        assert a["class"] == b["class"] and a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    # the .onnx file alone: predictions, and a 422 for explanations (no attention maps without the checkpoint)
    with TestClient(load_app(str(exported / "model.onnx"), runtime="onnx"), base_url="http://127.0.0.1:8000") as c:
        assert c.post("/v1/predict", files=files).status_code == 200
        r = c.post("/v1/explain", files=files)
        assert r.status_code == 422 and "without its checkpoint" in r.json()["detail"]
