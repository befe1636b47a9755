"""CLIP's objective comparison, the pieces (`vitlab.train.captioning`, `vitlab.data.scenes`, `vitlab.zeroshot`): the
bag-of-words loss and its word recall against their formulas on hand-made captions; zero-shot class scores of a
sentence decoder (prompt likelihoods, ensembled in probability space) against one caption scored at a time, and of
a bag of words (the class name's words); the scene items the zero-shot measure reads; `vitlab caption train
--decoder bow` end to end with the zero-shot curve in metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from vitlab.cli import cli
from vitlab.data.scenes import BACKGROUNDS, build_scene_dataset, item_zero_shot, scenes_of
from vitlab.models.caption import create_captioner
from vitlab.models.text import train_word_tokenizer
from vitlab.train.captioning import (
    bag_of_words,
    bag_of_words_loss,
    teacher_forcing,
    word_mask,
    words_recalled,
    zero_shot_scores,
)
from vitlab.zeroshot import item_zero_shot_set

CAPTIONS = ["a red bag on the grass", "an ankle boot on the brick", "a bag on the gravel", "a red ankle boot"]
TINY_VIT = ("vit_tiny_patch4_32", {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def tokenizer():
    return train_word_tokenizer(CAPTIONS, min_count=1, context_length=10)


def tiny(decoder: str, tokenizer, **decoder_args):
    torch.manual_seed(0)
    return create_captioner(TINY_VIT[0], tokenizer, decoder=decoder, image_args=TINY_VIT[1],
                            decoder_args=decoder_args).eval()  # fmt: skip


# --- the bag of words ----------------------------------------------------------------------------------------------
def test_bag_of_words_loss_by_hand():
    """Joulin et al.: each of a caption's K distinct words weighs 1/K (a repeated word once; end and padding are
    none), loss -sum_w bag_w log softmax(logits)_w; recall: distinct words among the K best-scored."""
    targets = torch.tensor([[5, 3, 5, 2, 0], [4, 2, 0, 0, 0]])  # 2 = <eos>, 0 = <pad>
    words = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    bag = bag_of_words(targets, words, 6)
    want = torch.zeros(2, 6)
    want[0, 5] = want[0, 3] = 0.5
    want[1, 4] = 1.0
    torch.testing.assert_close(bag, want)
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    logp = logits.log_softmax(-1)
    loss = bag_of_words_loss(logits, bag)
    torch.testing.assert_close(loss, torch.stack([-(logp[0, 5] + logp[0, 3]) / 2, -logp[1, 4]]))
    recalled, counted = words_recalled(logits, bag)
    # caption 0: words 3 and 5 are its 2 best-scored; caption 1: word 4 is second after word 0
    assert (recalled.item(), counted.item()) == (2, 3)


def test_word_mask_leaves_out_end_padding_and_unknown(tokenizer):
    model = tiny("bow", tokenizer)
    tokens = model.tokenize(["a red zebra"])  # "zebra" is <unk>
    _, targets, mask = teacher_forcing(tokens, model.pad_id)
    kept = targets[word_mask(model, targets, mask)].tolist()
    assert kept == [tokenizer.tokenizer.token_to_id(w) for w in ("a", "red")]


# --- zero-shot scores ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["transformer", "soft"])
def test_sentence_decoder_scores_are_prompt_likelihoods(decoder, tokenizer):
    """log (1/P) sum_p P(prompt_p | image), each prompt scored alone here, all at once (in chunks) there."""
    args = {"dim": 16, "depth": 1, "num_heads": 2} if decoder == "transformer" else {"embed_dim": 8, "hidden_dim": 8}
    model = tiny(decoder, tokenizer, **args)
    images = torch.randn(3, 3, 32, 32)
    names = ["bag", "ankle boot"]
    prompts = [[f"a bag on the {bg}" for bg in ("grass", "brick")], [f"an ankle boot on the {bg}" for bg in
                                                                     ("grass", "brick")]]  # fmt: skip
    with torch.no_grad():
        a = model.encode(images)[0]
        scores = zero_shot_scores(model, a, names, prompts, chunk=5)  # 5: chunks cut across images and prompts
        want = torch.zeros(3, 2)
        for i in range(3):
            for k, group in enumerate(prompts):
                log_p = []
                for text in group:
                    inputs, targets, mask = teacher_forcing(model.tokenize([text]), model.pad_id)
                    logp = model(images[i : i + 1], inputs).logits.log_softmax(-1)
                    log_p.append(logp.gather(-1, targets[..., None])[mask[..., None]].sum())
                want[i, k] = torch.stack(log_p).logsumexp(0) - math.log(len(group))
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-4)


def test_bag_of_words_scores_are_the_name_words(tokenizer):
    model = tiny("bow", tokenizer)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.encode(images)[0]
        scores = zero_shot_scores(model, a, ["bag", "ankle boot"], [["unused"], ["unused"]])
        logp = model.decoder(a, None).logits[:, 0].log_softmax(-1)
    word = tokenizer.tokenizer.token_to_id
    want = torch.stack([logp[:, word("bag")], (logp[:, word("ankle")] + logp[:, word("boot")]) / 2], 1)
    torch.testing.assert_close(scores, want)


def test_scene_items_for_zero_shot():
    """The single-item scenes of a split, their item's class, one prompt per class and background."""
    splits = build_scene_dataset("scenes:digits?count=60&size=32", data_dir=None, val_fraction=0.2)
    scenes = scenes_of(splits, splits.val)
    assert scenes is splits.scenes["val"] and scenes_of(splits, splits.val.subset(torch.arange(2), None)) is None
    index, labels, prompts = item_zero_shot(scenes)
    alone = (scenes.item_classes >= 0).sum(1) == 1
    assert index.tolist() == alone.nonzero()[0].tolist() and len(index) > 0
    assert labels.tolist() == scenes.item_classes[index, 0].tolist()
    assert len(prompts) == len(scenes.item_names) and all(len(p) == len(BACKGROUNDS) for p in prompts)
    assert prompts[1] == [f"a {scenes.item_names[1]} on the {bg}" for bg in BACKGROUNDS]
    subset, subset_labels, names, _ = item_zero_shot_set(splits, splits.val)
    assert len(subset) == len(index) and subset.captions == [scenes.captions[i] for i in index]
    assert subset_labels.tolist() == labels.tolist() and names == list(scenes.item_names)


# --- the command ---------------------------------------------------------------------------------------------------
def test_caption_train_bow_records_zero_shot(tmp_path):
    run = tmp_path / "bow"
    args = ["caption", "train", "--image-model", TINY_VIT[0], "--decoder", "bow", "--data",
            "scenes:digits?count=40&size=32", "--batch-size", "8", "--precision", "fp32", "--out", str(run),
            "--set", f"model_args={json.dumps(TINY_VIT[1])}", "--set", "threads=1", "--max-steps", "4",
            "--set", "eval_every=2"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "words recalled" in r.output and "zero-shot accuracy on the test split" in r.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [2, 4]
    assert all(0 <= rec["val_zero_shot"] <= 1 and 0 <= rec["val_acc"] <= 1 for rec in records)
    r = CliRunner().invoke(cli, ["caption", "eval", str(run / "checkpoints" / "best")])
    assert r.exit_code == 2 and "bag-of-words" in r.output and r.output.count("\n") == 1
