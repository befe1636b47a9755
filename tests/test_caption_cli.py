"""`vitlab caption train / eval / predict` end to end on tiny scenes, and the caption metrics
(`vitlab.metrics.captioning`) on hand-made captions: BLEU, ROUGE-L and CIDEr-D against values computed by hand,
scored against the raw references (never `<unk>`-mapped ones), attention correctness on hand-made maps and boxes.
The pycocoevalcap metrics need Java: without it those tests skip, saying so, and eval reports them unavailable."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import vitlab.captioning as captioning
from vitlab.cli import cli
from vitlab.errors import VitlabError
from vitlab.metrics.captioning import attention_correctness, attention_in_box, caption_scores, metrics_unavailable
from vitlab.models.caption import create_captioner
from vitlab.models.text import train_word_tokenizer
from vitlab.train import TrainConfig, train

DECODERS = ("soft", "hard", "transformer")
DATA = "scenes:digits?count=40&size=32"
IMAGE_ARGS = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
DECODER_ARGS = {
    "soft": {"embed_dim": 32, "hidden_dim": 32, "attn_dim": 32},
    "hard": {"embed_dim": 32, "hidden_dim": 32, "attn_dim": 32},
    "transformer": {"dim": 32, "depth": 1, "num_heads": 2},
}
NO_JAVA = metrics_unavailable()
needs_java = pytest.mark.skipif(NO_JAVA is not None, reason=f"caption metrics unavailable: {NO_JAVA}")


def train_args(out, decoder: str, *extra: str) -> list[str]:
    caption_args = {"decoder_args": DECODER_ARGS[decoder]}  # min_count 5: some test words are <unk>
    return [
        "caption", "train", "--image-model", "vit_tiny_patch4_32", "--decoder", decoder, "--data", DATA,
        "--batch-size", "8", "--precision", "fp32", "--out", str(out), "--set", f"model_args={json.dumps(IMAGE_ARGS)}",
        "--set", f"caption_args={json.dumps(caption_args)}", "--set", "threads=1", *extra,
    ]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of each decoder, 3 steps."""
    out = {}
    for decoder in DECODERS:
        run = tmp_path_factory.mktemp("caption") / decoder
        r = CliRunner().invoke(cli, train_args(run, decoder, "--max-steps", "3"))
        assert r.exit_code == 0, r.output
        assert f"captioning ({decoder} decoder" in r.output and "token accuracy" in r.output
        out[decoder] = run
    return out


# --- the commands -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", DECODERS)
def test_train_eval_predict(decoder, runs, tmp_path) -> None:
    run = runs[decoder]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["test_accuracy"] <= 1 and (run / "curves.png").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["caption_args"]["decoder"] == decoder
    best = run / "checkpoints" / "best"
    r = CliRunner().invoke(cli, ["caption", "eval", str(best), "--beam", "2"])
    assert r.exit_code == 0, r.output
    written = json.loads((best / "eval-test" / "caption_metrics.json").read_text())
    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "attention_correctness")
    assert set(keys) <= set(written) and "the run's" in written["checked"]  # the run's own held-out split
    for key in keys[:-1]:
        assert (written[key] is None) if NO_JAVA else (0 <= written[key] <= (10 if key == "cider" else 1)), key
        assert key in r.output
    ac = written["attention_correctness"]  # None only when no generated word names an item of its scene
    assert ac is None or 0 <= ac <= 1
    image = tmp_path / "scene.png"
    from PIL import Image

    from vitlab.data.scenes import generate_scenes

    Image.fromarray(generate_scenes(count=1, size=32, source="digits").images[0]).save(image)
    r = CliRunner().invoke(cli, ["caption", "predict", str(best), str(image), "--attention-out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{image}: ") and (tmp_path / "a" / "scene.png").exists()


def test_predict_on_a_corrupt_image_is_one_line(runs, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = CliRunner().invoke(cli, ["caption", "predict", str(runs["soft"] / "checkpoints" / "best"), str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and str(bad) in r.output and "Traceback" not in r.output


def test_caption_train_resumes_exactly(tmp_path) -> None:
    """The hard decoder draws locations and every epoch draws captions: straight through vs. stopped at step 4 (last
    checkpoint: step 2) and resumed with --resume."""
    extra = ("--max-steps", "6", "--set", "checkpoint_every=2", "--set", "eval_every=4")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    runner = CliRunner()
    assert runner.invoke(cli, train_args(full, "hard", *extra)).exit_code == 0

    class Stop(Exception):
        pass

    def fail_at_4(model, splits, record):
        if record["step"] == 4:
            raise Stop

    saved = yaml.safe_load((full / "config.yaml").read_text())
    with pytest.raises(Stop):
        train(TrainConfig.from_dict({**saved, "out": str(stopped)}), on_eval=fail_at_4)
    r = runner.invoke(cli, ["caption", "train", "--resume", "--out", str(stopped)])
    assert r.exit_code == 0, r.output
    assert f"resumed {stopped} at step 2" in r.output
    a = load_file(full / "checkpoints" / "last" / "model.safetensors")
    b = load_file(stopped / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = runner.invoke(cli, ["caption", "train", "--resume", "--out", str(stopped), "--decoder", "soft"])
    assert r.exit_code == 2 and "caption_args" in r.output  # another decoder is another run


# --- the metrics ------------------------------------------------------------------------------------------------
@needs_java
def test_scores_against_hand_computed_values() -> None:
    refs = [["a cat sat on the mat"], ["a cat sat on the mat"], ["two dogs run in snow"], ["red kite flies high"]]
    cands = ["a cat sat on the mat", "a cat on the mat", "two dogs run in snow", "two dogs run in snow"]
    exact = caption_scores(refs[:1], cands[:1])  # each image alone: BLEU is a corpus score
    short = caption_scores(refs[1:2], cands[1:2], meteor=False)
    assert all(math.isclose(exact[k], 1.0, abs_tol=1e-6) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"))
    assert math.isclose(exact["meteor"], 1.0, abs_tol=1e-6)
    # "a cat on the mat" against "a cat sat on the mat": every unigram matches, 3 of 4 bigrams ("cat on" does not),
    # the brevity penalty exp(1 - 6/5); ROUGE-L: LCS 5, P = 5/5, R = 5/6, F_beta with beta = 1.2
    bp = math.exp(1 - 6 / 5)
    assert math.isclose(short["bleu1"], bp, rel_tol=1e-6)
    assert math.isclose(short["bleu2"], bp * math.sqrt(3 / 4), rel_tol=1e-6)
    p, r, b2 = 1.0, 5 / 6, 1.2**2
    assert math.isclose(short["rouge_l"], (1 + b2) * p * r / (r + b2 * p), rel_tol=1e-6)
    # CIDEr-D over images 3 and 4 (no n-gram shared between their references, so every idf is log 2): the exact
    # caption's tf-idf vectors are its references', cosine 1 for n = 1..4, times 10; the other shares nothing: 0
    corpus = caption_scores(refs[2:], cands[2:], meteor=False)
    assert math.isclose(corpus["cider"], (10.0 + 0.0) / 2, rel_tol=1e-6)


@needs_java
def test_scores_use_the_raw_references_not_unk_mapped_ones(runs, monkeypatch) -> None:
    """`vitlab caption eval` scores against the raw captions: a captioner whose output is a reference mapped through
    its vocabulary (its rare words <unk>) scores 1 against the mapped references, less against the raw ones."""
    best = runs["soft"] / "checkpoints" / "best"
    model = captioning.load_captioner(best)
    seen = {}

    def mapped_first_reference(model, dataset, **kwargs):
        seen["texts"] = model.texts(model.tokenize([caps[0] for caps in dataset.captions]))
        seen["refs"] = dataset.captions
        return {"texts": seen["texts"], "tokens": [[] for _ in seen["texts"]], "maps": None, "grid": None}

    monkeypatch.setattr(captioning, "generate_captions", mapped_first_reference)
    monkeypatch.setattr(captioning, "caption_scores", functools.partial(caption_scores, meteor=False))  # faster
    r = captioning.evaluate_captioner(best)
    assert any("<unk>" in t for t in seen["texts"])  # test words the vocabulary (min_count 5) maps to <unk>
    assert r["bleu1"] < 0.99 and r["attention_correctness"] is None
    mapped = [[model.texts(model.tokenize([c]))[0] for c in caps] for caps in seen["refs"]]
    assert (
        caption_scores(mapped, seen["texts"], meteor=False)["bleu1"] > 0.999
    )  # what scoring against mapped references says


def test_scores_without_java_or_a_reference_are_one_line(monkeypatch) -> None:
    with (
        pytest.raises(Exception, match="one candidate and at least one reference")
        if NO_JAVA is None
        else (pytest.raises(Exception, match="unavailable"))
    ):
        caption_scores([[]], ["a cat"])
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "Java is not installed" in metrics_unavailable()
    with pytest.raises(Exception, match=r"caption metrics unavailable: .*Java"):
        caption_scores([["a cat"]], ["a cat"])


def test_attention_in_box_by_hand() -> None:
    # a 2 x 2 grid over 10 x 10 pixels; the left half holds locations 0 and 2
    alpha = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert math.isclose(attention_in_box(alpha, (2, 2), (0, 0, 5, 10), (10, 10)), 0.625, rel_tol=1e-6)
    # a 3 x 3 grid over 10 x 10: nearest upsampling gives location 0 rows and columns 0-3 (16 pixels); a 2 x 2 box in
    # its corner holds a quarter of its mass
    one_hot = torch.zeros(9)
    one_hot[0] = 1
    assert math.isclose(attention_in_box(one_hot, (3, 3), (0, 0, 2, 2), (10, 10)), 0.25, rel_tol=1e-6)
    uniform = torch.full((9,), 1 / 9)
    assert math.isclose(attention_in_box(uniform, (3, 3), (0, 0, 10, 10), (10, 10)), 1.0)
    # the top 4 pixel rows are location row 0 (rows 1 and 2 cover 3 pixel rows each): a third of the mass, not 40%
    assert math.isclose(attention_in_box(uniform, (3, 3), (0, 0, 10, 4), (10, 10)), 1 / 3, rel_tol=1e-6)
    maps = [torch.stack([alpha, alpha.flip(0)])]  # two words of one image
    named = [[(0, (0, 0, 5, 10)), (1, (0, 0, 5, 10))]]  # flipped, the left half (locations 0, 2) holds 0.125 + 0.25
    score = attention_correctness(maps, named, grid=(2, 2), image_size=(10, 10))
    assert math.isclose(score, (0.625 + 0.375) / 2, rel_tol=1e-6)
    assert attention_correctness(maps, [[]], grid=(2, 2), image_size=(10, 10)) is None


def test_named_positions_find_an_items_last_word() -> None:
    tok = train_word_tokenizer(["an ankle boot left of a bag", "a bag on grass"], min_count=1, context_length=12)
    model = create_captioner("vit_tiny_patch4_32", tok, decoder="soft", image_args=IMAGE_ARGS)
    tokens = model.tokenize("a bag right of an ankle boot")[0].tolist()
    tokens = tokens[1 : tokens.index(model.eos_id)]  # the words: a bag right of an ankle boot
    items = [("ankle boot", [0, 0, 4, 4]), ("bag", [4, 4, 8, 8]), ("sneaker", [1, 1, 2, 2])]
    assert sorted(captioning.named_positions(model, tokens, items)) == [(1, [4, 4, 8, 8]), (6, [0, 0, 4, 4])]


def test_default_image_model_for_scenes_keeps_left_and_right() -> None:
    """No --image-model: the data's row chooses the encoder (one that takes the scenes' 64 px RGB), and none of its
    classification schedule, whose hflip would swap the captions' left and right."""
    from vitlab._registry import get_variant
    from vitlab.train.defaults import apply_data_defaults

    values = {"data": "scenes:digits", "caption_args": {"decoder": "soft"}}
    chosen, why = apply_data_defaults(values, set(values))
    _, kwargs, cfg = get_variant(chosen["model"])
    assert chosen["model_args"].get("img_size", kwargs.get("img_size", cfg["input_size"][1])) == 64
    assert chosen["model_args"].get("in_chans", kwargs.get("in_chans", cfg["input_size"][0])) == 3
    assert "hflip" not in chosen and "budget_s" not in chosen and "image tower" in why


# --- the nearest-neighbour baseline (Devlin et al. 2015) --------------------------------------------------------------
def test_nearest_neighbour_captions_by_cosine_with_consensus() -> None:
    """Query 0 is nearest to training image 1 by cosine (to image 0 by distance), and takes the caption of image 1's
    that agrees most with its others, not the odd one out listed first; k=2 pools both images' captions."""
    pytest.importorskip("pycocoevalcap")
    train = torch.tensor([[1.0, 0.1], [10.0, 10.0]])
    query = torch.tensor([[3.0, 2.9], [0.5, 0.0]])
    bag = ["a picture of a boot", "a red bag lying on the grass", "a red bag on grass", "grass with a red bag"]
    captions = [["a shoe on grass"], bag]
    first, second = captioning.nearest_neighbour_captions(train, query, captions)
    assert first in captions[1][1:] and second == "a shoe on grass"
    pooled = captioning.nearest_neighbour_captions(train, query[1:], captions, k=2)
    assert pooled[0] in captions[1][1:]  # four captions about a red bag outvote the shoe
    with pytest.raises(VitlabError, match="k=3"):
        captioning.nearest_neighbour_captions(train, query, captions, k=3)


@needs_java
def test_eval_nearest_neighbour_baseline(runs) -> None:
    best = runs["soft"] / "checkpoints" / "best"
    r = CliRunner().invoke(cli, ["caption", "eval", str(best), "--baseline", "nearest-pixels"])
    assert r.exit_code == 0, r.output
    where = best / "eval-test-nearest-pixels"
    written = json.loads((where / "caption_metrics.json").read_text())
    assert written["baseline"] == "nearest-pixels" and written["attention_correctness"] is None
    assert 0 <= written["bleu4"] <= 1 and 0 <= written["cider"] <= 10
    from vitlab.data.scenes import build_scene_dataset

    splits = build_scene_dataset(DATA, data_dir=None, val_fraction=0.1)
    train_captions = {c for caps in splits.train.captions for c in caps}
    captions = json.loads((where / "captions.json").read_text())
    assert len(captions) == len(splits.test) and all(c["caption"] in train_captions for c in captions)
