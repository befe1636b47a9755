"""`vitlab data clips`, `vitlab retrieval train / eval` end to end on tiny clips, the clip folder's round trip and
bad feature files as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.data.clips import EXPERTS, generate_clips, write_clip_folder

TINY = "model_args={d_model: 32, depth: 1, num_heads: 2}"
KEYS = [f"{way}_{k}" for way in ("t2v", "v2t") for k in ("r1", "r5", "r10", "medr", "meanr")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    r = CliRunner().invoke(cli, ["data", "clips", "--out", str(root / "clips"), "--count", "60", "--size", "16",
                                 "--items", "digits"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = root / "run"
    r = CliRunner().invoke(cli, ["retrieval", "train", "--data", f"videofeatures:{root / 'clips'}", "--set", TINY,
                                 "--batch-size", "16", "--max-steps", "3", "--set", "threads=1", "--set",
                                 "num_workers=0", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "t2v  r1" in r.output and "v2t  r1" in r.output
    return out


def test_eval_writes_retrieval_metrics(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    r = CliRunner().invoke(cli, ["retrieval", "eval", str(run / "checkpoints" / "best")])
    assert r.exit_code == 0, r.output
    written = json.loads((run / "checkpoints" / "best" / "eval-test" / "retrieval_metrics.json").read_text())
    assert set(KEYS) <= set(written)
    n = written["count"]
    assert all(0 <= written[k] <= 100 for k in KEYS if "_r" in k and not k.endswith("r"))
    assert all(1 <= written[k] <= n for k in KEYS if k.endswith(("medr", "meanr")))
    assert written["t2v_r1"] == pytest.approx(summary["t2v_r1"])  # the run's own test clips, scored again
    assert summary["test_accuracy"] == pytest.approx(summary["t2v_r1"] / 100)  # t2v R@1 selects
    assert f"r1 {written['t2v_r1']:.2f}" in r.output


def test_clip_folder_round_trip(tmp_path: Path) -> None:
    """What `vitlab data clips` writes reads back as the in-memory clips: ids, splits, captions and every stream."""
    memory = build_dataset("clips:digits?count=24&size=16")
    clips, _ = generate_clips(count=24, size=16, source="digits")
    write_clip_folder(clips, tmp_path / "c")
    disk = build_dataset(f"videofeatures:{tmp_path / 'c'}")
    assert disk.data_hash == memory.data_hash
    for split in ("train", "val", "test"):
        a, b = getattr(memory, split), getattr(disk, split)
        assert a.members() == b.members() and a.captions == b.captions
        for x, y in zip(a.clips, b.clips):
            for name in EXPERTS:
                assert np.array_equal(x.experts[name][0], y.experts[name][0])
                assert np.array_equal(x.experts[name][1], y.experts[name][1])


def test_some_clips_lack_audio_and_ocr() -> None:
    """Missing experts are part of the data: some clips have no sound, some no sign; their masks are all False."""
    splits = build_dataset("clips:digits?count=40&size=16")
    ds = splits.train
    _, _, masks = ds.batch(ds.labels)
    for name in ("audio", "ocr"):
        present = masks[name].any(1)
        assert 0 < int(present.sum()) < len(ds), name
    assert masks["appearance"].any(1).all() and masks["motion"].any(1).all()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("truncated", "cannot be read as a clip's features"),
        ("width", "expected [K, 64] and [K]"),
        ("nan", "NaN or infinite"),
        ("empty", "has no feature from any expert"),
        ("index", "cannot be read as a clip index"),
    ],
)
def test_bad_feature_files_are_one_line_errors(tmp_path: Path, fault: str, message: str) -> None:
    clips, _ = generate_clips(count=8, size=16, source="digits")
    root = tmp_path / "c"
    write_clip_folder(clips, root)
    path = root / "features" / "000003.npz"
    arrays = dict(np.load(path))
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif fault == "width":
        arrays["motion"] = arrays["motion"][:, :10]
        np.savez(path, **arrays)
    elif fault == "nan":
        arrays["appearance"][0, 0] = np.nan
        np.savez(path, **arrays)
    elif fault == "empty":
        np.savez(path)
    else:
        (root / "captions.json").write_text("{not json")
    r = CliRunner().invoke(cli, ["retrieval", "train", "--data", f"videofeatures:{root}", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert message in r.output


def test_text_to_video_r1_selects(monkeypatch) -> None:
    """The task's ``accuracy`` (what picks checkpoints/best) is t2v R@1, on a case where v2t R@1 differs."""
    import torch

    import vitlab.train.retrieval as retrieval

    sims = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # t2v: query 0 right, query 1 wrong; v2t: both tied, both missed
    monkeypatch.setattr(retrieval, "similarities", lambda *a, **k: (sims, 1))
    r = retrieval.evaluate_retrieval(torch.nn.Linear(1, 1), [0, 1])
    assert r["report"]["t2v_r1"] == 50 and r["report"]["v2t_r1"] == 0
    assert r["accuracy"] == 0.5


def test_appearance_from_a_frozen_vitlab_encoder(tmp_path: Path) -> None:
    """``encoder=CHECKPOINT``: the appearance expert is the model's pooled features of each frame, at its size,
    channels and normalisation; the clips, captions and other experts are those drawn without it."""
    import torch

    import vitlab
    from vitlab.data.clips import FrameEncoder
    from vitlab.data.transforms import to_model_input

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch4_28", img_size=12, in_chans=1, depth=1, embed_dim=24, num_heads=2,
                                num_classes=3).eval()  # fmt: skip
    vitlab.save_pretrained(model, tmp_path / "enc")
    frames = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
    x = to_model_input(torch.from_numpy(frames).permute(0, 3, 1, 2) / 255, in_chans=1, img_size=(12, 12),
                       mean=(0.5,), std=(0.5,))  # fmt: skip
    with torch.no_grad():
        by_hand = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(FrameEncoder(tmp_path / "enc")(frames), by_hand, atol=1e-5)

    plain = build_dataset("clips:digits?count=12&size=16")
    encoded = build_dataset(f"clips:digits?count=12&size=16&encoder={tmp_path / 'enc'}")
    assert encoded.experts == {**EXPERTS, "appearance": 24} and encoded.data_hash != plain.data_hash
    for a, b in zip(plain.train.clips, encoded.train.clips):
        assert a.captions == b.captions and len(b.experts["appearance"][0]) == len(a.experts["appearance"][0])
        assert all(np.array_equal(a.experts[n][0], b.experts[n][0]) for n in ("motion", "audio", "ocr"))
    clips, _ = generate_clips(count=12, size=16, source="digits", encoder=str(tmp_path / "enc"))
    write_clip_folder(clips, tmp_path / "c")  # the folder records the encoder's width
    assert build_dataset(f"videofeatures:{tmp_path / 'c'}").data_hash == encoded.data_hash
    r = CliRunner().invoke(cli, ["retrieval", "train", "--data", f"clips:digits?encoder={tmp_path / 'nothing'}",
                                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
