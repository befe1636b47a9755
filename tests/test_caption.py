"""Captioning, the model side (`vitlab.models.caption`, `vitlab.train.captioning`): any image model's features become
a grid of annotations; each decoder (soft and hard attention, transformer) gives logits and attention maps of the
right shapes and overfits 32 scenes; the doubly stochastic regulariser and the REINFORCE term match their formulas
on hand-made cases; beam search ends, keeps the best hypothesis with its attention, and with one beam is greedy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import move_off_init
from vitlab.checkpoint import from_pretrained, save_pretrained
from vitlab.data import to_model_input
from vitlab.data.scenes import generate_scenes, load_item_pool, scene_splits
from vitlab.errors import VitlabError
from vitlab.models.caption import (
    DecoderOutput,
    Step,
    annotation_grid,
    beam_search,
    create_captioner,
    greedy_search,
    length_penalty,
)
from vitlab.models.text import train_word_tokenizer
from vitlab.train.captioning import (
    CaptioningTask,
    CaptionLoss,
    doubly_stochastic_penalty,
    reinforce_loss,
    teacher_forcing,
)
from vitlab.train.config import TrainConfig

DECODERS = ("soft", "hard", "transformer")
TINY_VIT = ("vit_tiny_patch4_32", {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32})
TINY_CNN = ("resnet18_32", {"layers": (1, 1), "channels": (8, 16), "stem_width": 8})
TINY_DECODER = {
    "soft": {"embed_dim": 64, "hidden_dim": 128, "attn_dim": 64},
    "hard": {"embed_dim": 64, "hidden_dim": 128, "attn_dim": 64},
    "transformer": {"dim": 64, "depth": 1, "num_heads": 2},
}
CAPTIONS = ["A square at the top left.", "a square at the bottom right", "a circle, at the top"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def tokenizer():
    return train_word_tokenizer(CAPTIONS, min_count=1, context_length=12)


def captioner(decoder: str, tokenizer, image=TINY_VIT):
    return create_captioner(
        image[0], tokenizer, decoder=decoder, image_args=image[1], decoder_args=TINY_DECODER[decoder]
    )


# --- the encoder's grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, args, prefix",
    [
        ("vit_tiny_patch4_32", {"embed_dim": 16, "depth": 1, "num_heads": 2}, 1),
        ("deit_tiny_distilled_patch4_32", {"embed_dim": 16, "depth": 1, "num_heads": 2}, 2),
        # num_prefix_tokens = 0 (its self-attention stage has none), but its features carry the class token
        ("cait_xxs24_patch4_32", {"embed_dim": 16, "depth": 1, "num_heads": 2, "depth_token_only": 1}, 1),
        ("resnet18_32", {"layers": (1, 1), "channels": (4, 8), "stem_width": 8}, None),
    ],
)
def test_annotation_grid_drops_prefix_tokens(name, args, prefix):
    from vitlab.factory import create_model

    model = create_model(name, num_classes=0, **args).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        a, (h, w) = annotation_grid(model, features, (32, 32))
    assert a.shape[:2] == (2, h * w)
    if prefix is None:  # a map [B, C, H, W]: its locations row by row
        assert (h, w) == features.shape[-2:]
        torch.testing.assert_close(a[:, 1], features[:, :, 0, 1])
    else:
        assert h == w and torch.equal(a, features[:, prefix:])


# --- decoders -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", [TINY_VIT, TINY_CNN], ids=["vit", "cnn"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_decoder_shapes_maps_and_gradients(decoder, image, tokenizer):
    model = captioner(decoder, tokenizer, image).train()
    move_off_init(model.encoder)  # a ResNet's residual branches start at zero, and get no gradient there
    x = torch.randn(3, 3, 32, 32)
    inputs, targets, mask = teacher_forcing(model.tokenize(CAPTIONS), model.pad_id)
    B, T = inputs.shape
    a, (h, w) = model.encode(x)
    L = a.shape[1]
    assert L == h * w
    out = model(x, inputs, need_attention=True)
    assert out.logits.shape == (B, T, tokenizer.vocab_size)
    assert out.attention.shape == (B, T, L)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(B, T))  # alpha: a distribution over locations
    assert (model(x, inputs).attention is None) == (decoder == "transformer")  # its maps cost the explicit path
    for beam_size in (1, 2):  # generation: each token's map over the same grid
        generated = model.generate(x, beam_size=beam_size, max_length=4)
        assert generated.grid == (h, w) and generated.attention.shape == (B, generated.tokens.shape[1], L)
    if decoder == "hard":  # the REINFORCE inputs, per step, and which sequences sampled
        assert out.log_p_s.shape == out.entropy.shape == (B, T) and out.sampled.shape == (B,)
    loss, _ = CaptionLoss(kind=decoder)(out, targets, mask, model.decoder)
    loss.backward()
    # every parameter is trained (DDP refuses unused ones): the encoder through the annotations, the attention
    # of the hard decoder through REINFORCE or the expected context
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_hard_attention_samples_per_image(tokenizer):
    """In training each sequence samples its locations with probability 0.5 ("for a given image"), else takes the
    expected context, which is what evaluation always takes; log p(s_t) is 0 where nothing was sampled."""
    model = captioner("hard", tokenizer)
    x = torch.randn(64, 3, 32, 32)
    inputs = model.tokenize(CAPTIONS * 22)[:64, :4]
    with torch.no_grad():
        mixed = model.train()(x, inputs)
        expected = model.eval()(x, inputs)
    s = mixed.sampled
    assert 0.3 < s.float().mean() < 0.7  # per image, not one coin for the batch
    assert (mixed.log_p_s[~s] == 0).all() and (mixed.log_p_s[s] < 0).all()
    torch.testing.assert_close(mixed.logits[~s], expected.logits[~s])
    assert not torch.allclose(mixed.logits[s], expected.logits[s])
    assert expected.sampled is None and expected.log_p_s is None


@pytest.mark.parametrize("decoder", DECODERS)
def test_steps_are_teacher_forcing(decoder, tokenizer):
    """Generation's one-word steps compute what teacher forcing computes (the transformer's causal mask)."""
    model = captioner(decoder, tokenizer).eval()
    x = torch.randn(3, 3, 32, 32)
    inputs = teacher_forcing(model.tokenize(CAPTIONS), model.pad_id)[0]
    with torch.no_grad():
        a = model.encode(x)[0]
        out = model.decoder(a, inputs, need_attention=True)
        state, logits, maps = model.decoder.start(a), [], []
        for t in range(inputs.shape[1]):
            step = model.decoder.step(state, inputs[:, t])
            state = step.state
            logits.append(step.logits)
            maps.append(step.attention)
    torch.testing.assert_close(torch.stack(logits, 1), out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(maps, 1), out.attention, atol=1e-6, rtol=1e-5)


# --- the losses on hand-made cases ----------------------------------------------------------------------------------
def test_doubly_stochastic_penalty_formula():
    alpha = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]],
                          [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]])  # fmt: skip
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the second caption has two steps
    want = []
    for b in range(2):
        steps = [t for t in range(3) if mask[b, t]]
        want.append(sum((1 - sum(alpha[b, t, i].item() for t in steps)) ** 2 for i in range(3)))
    torch.testing.assert_close(doubly_stochastic_penalty(alpha, mask), torch.tensor(want))
    # by hand: column sums (0.9, 0.75, 1.35) -> 0.01 + 0.0625 + 0.1225; (1, 1, 0) over the two steps -> 1
    assert want == pytest.approx([0.195, 1.0])


def test_reinforce_term_against_its_formula():
    """Eq. 12's attention terms for one caption of two steps over three locations: the value and, by hand, the
    gradient in the attention logits: d/d e_tj = -lambda_r (R - b) (1[j = s_t] - alpha_tj) + lambda_e alpha_tj
    (log alpha_tj + H_t)."""
    e = torch.tensor([[0.2, -1.0, 0.5], [1.5, 0.0, -0.3]], requires_grad=True)
    s = [2, 0]
    reward = torch.tensor(-3.0, requires_grad=True)  # log p(y | s, a): a constant for this term
    b, lam_r, lam_e = -4.5, 0.7, 0.05
    log_alpha = e.log_softmax(-1)
    alpha = log_alpha.exp()
    log_p_s = log_alpha[0, s[0]] + log_alpha[1, s[1]]
    entropy = -(alpha * log_alpha).sum()
    value = reinforce_loss(reward[None], log_p_s[None], entropy[None], b, reinforce_weight=lam_r, entropy_weight=lam_e)
    a, la = alpha.detach(), log_alpha.detach()
    H = -(a * la).sum(-1)
    assert value.item() == pytest.approx(-(lam_r * (-3.0 + 4.5) * la[[0, 1], s].sum() + lam_e * H.sum()).item())
    value.sum().backward()
    onehot = torch.zeros(2, 3)
    onehot[[0, 1], s] = 1
    want = -lam_r * (-3.0 - b) * (onehot - a) + lam_e * a * (la + H[:, None])
    torch.testing.assert_close(e.grad, want)
    assert reward.grad is None  # the reward is not pushed up through this term


def test_soft_loss_adds_the_regulariser():
    """Eq. 14 per caption, -log p(y | a) + lambda sum_i (1 - sum_t alpha_ti)^2, summed over the batch, per token."""
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 0], [3, 4, 2]])
    mask = targets != 0
    attention = torch.rand(2, 3, 4).softmax(-1)
    out = DecoderOutput(logits, attention)
    loss, _ = CaptionLoss(kind="soft", penalty_weight=0.3)(out, targets, mask, None)
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)[mask].sum()
    want = (nll + 0.3 * doubly_stochastic_penalty(attention, mask).sum()) / 5
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_hard_loss_baseline_and_shown_value():
    """The loss shown is the captions' negative log-likelihood per token; the REINFORCE gradient uses the baseline
    from before the batch, which then moves 0.1 of the way to the mean reward of the sequences that sampled."""
    logits = torch.randn(3, 2, 5)
    targets = torch.tensor([[1, 2], [3, 0], [4, 2]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    log_p_s = torch.tensor([[-1.0, -2.0], [0.0, 0.0], [-0.5, -0.5]], requires_grad=True)
    sampled = torch.tensor([True, False, True])
    out = DecoderOutput(logits, None, log_p_s, torch.zeros(3, 2), sampled)
    decoder = SimpleNamespace(reward_baseline=torch.tensor(-2.0))
    loss, correct = CaptionLoss(kind="hard", reinforce_weight=1.0, entropy_weight=0.0)(out, targets, mask, decoder)
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * mask  # (3, 2)
    reward = -nll.sum(1)
    assert loss.item() == pytest.approx(nll.sum().item() / 5, rel=1e-6)
    loss.backward()
    want = -(reward - (-2.0))[:, None] * mask / 5  # d loss / d log p(s_t), per token of the batch
    torch.testing.assert_close(log_p_s.grad, want)
    expected_b = 0.9 * -2.0 + 0.1 * reward[sampled].mean()
    assert decoder.reward_baseline.item() == pytest.approx(expected_b.item(), rel=1e-6)
    assert correct.item() == ((logits.argmax(-1) == targets) & mask).sum().item()


# --- search ---------------------------------------------------------------------------------------------------------
class TableDecoder:
    """A decoder whose next-word probabilities depend on the previous word only (a table), and whose "attention"
    is the one-hot of the previous word, so that a hypothesis's maps spell its words. Ids: 0 <pad>, 1 <bos>,
    2 <eos>, 3 A, 4 B."""

    def __init__(self, table: dict[int, list[float]]) -> None:
        self.table = {k: torch.tensor(v).log() for k, v in table.items()}
        self.steps = 0

    def start(self, a: torch.Tensor) -> torch.Tensor:
        return torch.zeros(a.shape[0], dtype=torch.long)

    def step(self, state: torch.Tensor, token: torch.Tensor) -> Step:
        self.steps += 1
        # finished and dead hypotheses go on stepping (their outputs are ignored): any row for them
        logits = torch.stack([self.table.get(int(t), torch.zeros(5)) for t in token])
        return Step(logits, torch.nn.functional.one_hot(token, 5).float(), token)

    def reorder(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]


IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def test_beam_search_keeps_the_best_hypothesis_and_its_maps():
    # greedy takes A (0.55) and wanders; the best caption is B <eos> (0.45 x 0.99)
    table = {1: [0, 0, 0.0001, 0.55, 0.4499], 3: [0, 0, 0.3, 0.36, 0.34], 4: [0, 0, 0.99, 0.005, 0.005]}
    a = torch.zeros(2, 1, 1)
    greedy = greedy_search(TableDecoder(table), a, max_length=6, **IDS)
    assert greedy.tokens[0, 0].item() == 3
    beam = beam_search(TableDecoder(table), a, beam_size=2, max_length=6, length_alpha=0.0, **IDS)
    assert beam.tokens.tolist() == [[4, 2], [4, 2]]
    assert beam.log_prob[0].item() == pytest.approx(math.log(0.4499 * 0.99), rel=1e-5)
    # the maps of the chosen hypothesis: step 1 read <bos>, step 2 read B
    assert beam.attention[0].argmax(-1).tolist() == [1, 4]


def test_beam_search_reorders_words_and_maps_together():
    """The two hypotheses trade places at every step (A B A .. against B A B ..), and the chosen one comes back with
    its own maps, each the one-hot of the word before."""
    table = {1: [0, 0, 0, 0.6, 0.4], 3: [0, 0, 0.4, 0, 0.6], 4: [0, 0, 0.01, 0.99, 0]}
    out = beam_search(TableDecoder(table), torch.zeros(1, 1, 1), beam_size=2, max_length=4, length_alpha=0.0, **IDS)
    assert out.tokens.tolist() == [[4, 3, 4, 3]]  # 0.4 x 0.99 x 0.6 x 0.99 beats 0.6 x 0.6 x 0.99 x 0.6
    assert out.attention[0].argmax(-1).tolist() == [1, 4, 3, 4]


def test_beam_search_stops_when_every_hypothesis_has_ended():
    """An image that has kept beam_size finished hypotheses searches no further: the beam shrinks as they end (here
    <eos> ends one at once, A <eos> the other at step 2, while A A .. could go on to the length limit)."""
    table = {1: [0, 0, 0.35, 0.4, 0.25], 3: [0, 0, 0.9, 0.1, 0], 4: [0, 0, 0.9, 0, 0.1]}
    decoder = TableDecoder(table)
    out = beam_search(decoder, torch.zeros(1, 1, 1), beam_size=2, max_length=10, length_alpha=0.0, **IDS)
    assert decoder.steps == 2 and out.tokens.tolist() == [[3, 2]]


def test_length_penalty_prefers_longer_captions_with_alpha():
    # <eos> now (0.5) against A then <eos> (0.5 x 0.99): log-probability prefers the first, GNMT's lp the second
    table = {1: [0, 0, 0.5, 0.5, 0], 3: [0, 0, 0.99, 0.01, 0]}
    a = torch.zeros(1, 1, 1)
    assert length_penalty(2, 1.0) == pytest.approx(7 / 6)
    short = beam_search(TableDecoder(table), a, beam_size=2, max_length=5, length_alpha=0.0, **IDS)
    long = beam_search(TableDecoder(table), a, beam_size=2, max_length=5, length_alpha=1.0, **IDS)
    assert short.tokens.tolist() == [[2]] and long.tokens.tolist() == [[3, 2]]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_search_ends_without_eos(beam_size):
    """A model that never emits <eos> is cut at the length limit: at most max_length steps, max_length tokens."""
    table = {t: [0, 0, 0, 0.5, 0.5] for t in (1, 3, 4)}
    decoder = TableDecoder(table)
    out = beam_search(decoder, torch.zeros(2, 1, 1), beam_size=beam_size, max_length=7, **IDS)
    assert decoder.steps == 7 and out.tokens.shape == (2, 7) and not (out.tokens == 2).any()


# --- the tokenizer and checkpoints ----------------------------------------------------------------------------------
def test_word_tokenizer_vocabulary_and_round_trip(tmp_path, tokenizer):
    rare = train_word_tokenizer(["a bag on grass.", "A bag, on brick", "a zebra"], min_count=2)
    vocab = rare.tokenizer.get_vocab()
    assert {"<pad>", "<bos>", "<eos>", "<unk>", "a", "bag", "on"} <= set(vocab) and vocab["<pad>"] == 0
    assert not {"zebra", "grass", "brick", "A", ","} & set(vocab)  # seen once; lower-cased
    ids = rare(["A zebra on grass!"])[0].tolist()
    unk = vocab["<unk>"]
    assert ids == [vocab["<bos>"], vocab["a"], unk, vocab["on"], unk, unk, vocab["<eos>"]]
    model = captioner("soft", tokenizer)
    assert model.texts(model.tokenize(CAPTIONS)) == ["a square at the top left.", CAPTIONS[1], CAPTIONS[2]]
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.tokenize(CAPTIONS), model.tokenize(CAPTIONS))


@pytest.mark.parametrize("decoder", DECODERS)
def test_save_load_round_trip(tmp_path, decoder, tokenizer):
    model = captioner(decoder, tokenizer).eval()
    if decoder == "hard":
        model.decoder.reward_baseline.fill_(-7.5)  # REINFORCE's baseline is part of the state resume needs
    save_pretrained(model, tmp_path / decoder)
    loaded = from_pretrained(tmp_path / decoder)
    x = torch.randn(2, 3, 32, 32)
    inputs = model.tokenize(CAPTIONS[:2])[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, inputs).logits, model(x, inputs).logits)
    assert loaded.decoder.state_dict().keys() == model.decoder.state_dict().keys()
    if decoder == "hard":
        assert loaded.decoder.reward_baseline.item() == -7.5


# --- training: the task, and each decoder overfits 32 scenes --------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    """32 training scenes of 32 px (digits: always on the machine), their images normalised, one caption each."""
    s = generate_scenes(count=32, size=32, seed=0, pool=load_item_pool("digits"), val_fraction=0.0)
    splits = scene_splits(s, name="scenes:digits?count=32&size=32")
    images = splits.train.images.images
    x = to_model_input(images, in_chans=3, img_size=(32, 32), mean=splits.mean, std=splits.std)
    return SimpleNamespace(splits=splits, x=x, captions=[c[0] for c in s.captions])


def overfit(decoder: str, x: torch.Tensor, captions: list[str], *, max_steps: int = 400) -> tuple[object, float]:
    """AdamW on the whole batch until greedy decoding reproduces more than 90% of the captions word for word (a
    stricter test than BLEU-4 > 0.9, which needs pycocoevalcap), checked every 25 steps."""
    tok = train_word_tokenizer(captions, min_count=1, context_length=24)
    model = captioner(decoder, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    criterion = CaptionLoss(kind=decoder)
    inputs, targets, mask = teacher_forcing(model.tokenize(captions), model.pad_id)
    exact = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        loss, _ = criterion(model(x, inputs), targets, mask, model.decoder)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            texts = model.texts(model.generate(x).tokens)
            exact = sum(t == c for t, c in zip(texts, captions)) / len(captions)
            if exact > 0.9:
                break
    return model, exact


@pytest.fixture(scope="module")
def trained(scenes):
    return {}


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_decoder_overfits_32_scenes(decoder, scenes, trained):
    model, exact = overfit(decoder, scenes.x, scenes.captions)
    trained[decoder] = model
    assert exact > 0.9


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_one_is_greedy(decoder, scenes, trained):
    """On a trained model (which ends its captions at different lengths): tokens, maps and log-probabilities."""
    model = trained.get(decoder) or overfit(decoder, scenes.x, scenes.captions, max_steps=50)[0]
    model.eval()
    with torch.no_grad():
        a = model.encode(scenes.x)[0]
        ids = {"bos_id": model.bos_id, "eos_id": model.eos_id, "pad_id": model.pad_id}
        greedy = greedy_search(model.decoder, a, max_length=20, **ids)
        beam = beam_search(model.decoder, a, beam_size=1, max_length=20, **ids)
    lengths = (greedy.tokens != model.pad_id).sum(1)
    assert lengths.min() < lengths.max()  # captions of several lengths: <eos> comes at different steps
    assert torch.equal(beam.tokens, greedy.tokens)
    assert torch.equal(beam.attention, greedy.attention)
    assert torch.equal(beam.log_prob, greedy.log_prob)
    wider = beam_search(model.decoder, a, beam_size=3, max_length=20, length_alpha=0.0, **ids)
    assert (wider.log_prob >= greedy.log_prob - 1e-4).float().mean() > 0.9  # a wider beam rarely scores lower


@pytest.mark.parametrize("decoder", DECODERS)
def test_task_trains_and_evaluates(decoder, scenes):
    splits = scenes.splits
    cfg = TrainConfig(model=TINY_VIT[0], model_args=TINY_VIT[1], data=splits.name)
    task = CaptioningTask(cfg, splits, {"decoder": decoder, "decoder_args": TINY_DECODER[decoder], "min_count": 1})
    model = task.build_model(cfg, splits)
    task.setup(model)
    labels = torch.arange(8)
    out = task.loss(model, scenes.x[:8], labels, labels)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and 0 <= out.correct.item() <= 8
    task.start_epoch(1)
    again = task.batch_texts(labels)
    task.start_epoch(1)
    assert task.batch_texts(labels) == again  # an epoch's caption draws are a function of (seed, epoch)
    result = task.evaluate(model, splits.train, splits=splits, batch_size=16)
    assert result["count"] == 32 and 0 <= result["accuracy"] <= 1 and math.isfinite(result["loss"])
    # every caption of every image, each token after <bos> (<eos> included)
    captions = [c for caps in splits.train.captions for c in caps]
    assert result["report"]["caption_tokens"] == model.tokenize(captions).ne(model.pad_id).sum() - len(captions)


def test_task_refuses_what_it_cannot_train(scenes):
    cfg = TrainConfig(model=TINY_VIT[0], data="digits")
    with pytest.raises(VitlabError, match="caption set"):
        CaptioningTask(cfg, SimpleNamespace(), {})
    with pytest.raises(VitlabError, match="unknown decoder 'lstm'"):
        CaptioningTask(cfg, scenes.splits, {"decoder": "lstm"})
    with pytest.raises(VitlabError, match="unknown caption_args"):
        CaptioningTask(cfg, scenes.splits, {"beam": 3})
