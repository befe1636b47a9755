"""Image captioning through the training loop's task seam (`vitlab.train.tasks`).

The loop is the classification loop (`vitlab.train.trainer`): data order, augmentation, precision, accumulation,
optimizer, checkpoints, exact resume and DDP are its own. This task supplies what differs:

* the model: `vitlab.models.caption.create_captioner` with the run's image model (``cfg.model``) and a decoder
  (``soft``, ``hard``, ``transformer``), its vocabulary built from the training captions, deterministically: a
  word-level one (``<unk>`` for words seen fewer than ``min_count`` times) or a byte-level BPE;
* the loss: each batch's labels are sample indices of a caption set (`vitlab.data.captions`); each image gets one of
  its captions, drawn from a generator of (seed, epoch) that every process shares (as CLIP's task draws), and the
  decoder is trained by teacher forcing on the papers' per-caption objective, summed over the batch and divided by
  its number of tokens (so that the terms keep the papers' balance): -log p(y | a), summed over the caption's
  tokens (<eos> included), plus

  - ``soft``: the doubly stochastic regulariser of Xu et al. (2015, arXiv:1502.03044) eq. 14,
    ``penalty_weight`` * sum_i (1 - sum_t alpha_ti)^2 (`doubly_stochastic_penalty`). With fewer words than
    locations (T < L) it cannot reach 0 (sum_i sum_t alpha_ti = T): it is least, (L - T)^2 / L, when every location
    gets T / L of the caption's attention;
  - ``hard``: REINFORCE (section 4.1, eq. 12) for the attention, whose sampled locations the cross-entropy cannot
    reach: the surrogate -(lambda_r (log p(y | s, a) - b) log p(s | a) + lambda_e H[s]) (`reinforce_loss`), with b
    the moving average b_k = 0.9 b_{k-1} + 0.1 log p(y | s, a) of the batch's mean reward (kept in the decoder's
    ``reward_baseline`` buffer, so checkpoints and resume carry it; under DDP the loop broadcasts rank 0's);
  - ``bow`` (a bag of words, no sentence): the cross-entropy of the image's word scores against the caption's
    normalised bag of words, each of its K distinct words (``<eos>`` and ``<unk>`` are none) weighing 1/K, as
    Joulin et al. (ECCV 2016, section 3) trained on Flickr captions (`bag_of_words_loss`), averaged over the batch;
    its "token accuracy" is the share of a caption's distinct words among the K best-scored (`words_recalled`);
* evaluation: the teacher-forced loss and token accuracy of every caption of every image of a held-out split;
  ``accuracy`` (which selects the best checkpoint) is the token accuracy. BLEU, METEOR, ROUGE-L and CIDEr of
  generated captions are `vitlab caption eval`'s. On scenes, every evaluation also measures zero-shot
  classification of the single-item scenes' items (`vitlab.data.scenes.item_zero_shot`, the measure CLIP's
  objective comparison reads, `vitlab.train.contrastive` computes it too): a sentence decoder scores each class
  by the likelihood of its prompts, log (1/P) sum_p P(prompt_p | image), a bag of words by the mean log-probability
  of the class name's words (`zero_shot_scores`); it is ``val_zero_shot`` in metrics.jsonl.

Options (``caption_args``): `CAPTION_ARGS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import to_model_input
from vitlab.data.base import derive_seed
from vitlab.data.captions import CaptionSplits
from vitlab.errors import VitlabError
from vitlab.models.caption import DECODERS, BagOfWordsHead, CaptionModel, DecoderOutput, create_captioner
from vitlab.models.text import WORD_UNK, TextTokenizer, train_bpe_tokenizer, train_word_tokenizer
from vitlab.train.config import TrainConfig
from vitlab.train.distributed import DistInfo, all_reduce_sum
from vitlab.train.evaluate import autocast
from vitlab.train.tasks import TaskOutput, unwrap
from vitlab.zeroshot import item_zero_shot_set

# option -> default
CAPTION_ARGS: dict[str, Any] = {
    "decoder": "soft",  # a key of vitlab.models.caption.DECODERS (soft, hard, transformer, bow)
    "decoder_args": {},  # the decoder's sizes (embed_dim, hidden_dim, ...; dim, depth, ... for the transformer)
    "tokenizer": "word",  # "word" or "bpe"
    "min_count": 5,  # word-level: rarer words become <unk>
    "bpe_vocab_size": 8192,
    "max_length": 32,  # tokens after <bos>: words and <eos>
    "penalty_weight": 1.0,  # soft: lambda of the doubly stochastic regulariser
    "reinforce_weight": 1.0,  # hard: lambda_r
    "entropy_weight": 0.01,  # hard: lambda_e
    "baseline_decay": 0.9,  # hard: b_k = decay b_{k-1} + (1 - decay) reward
}


# --- the losses ---------------------------------------------------------------------------------------------------
def teacher_forcing(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions [B, T + 1] (<bos> w_1 .. w_n <eos> <pad> ..) -> (inputs [B, T], targets [B, T], mask [B, T]): the
    decoder reads word t and predicts word t + 1; the mask marks the targets that are not padding."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return inputs, targets, targets != pad_id


def doubly_stochastic_penalty(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 per caption [B] (Xu et al. eq. 14), over the steps of ``mask`` [B, T] only:
    attention maps [B, T, L]. It pushes every location to receive a whole unit of attention over the caption."""
    total = (attention.float() * mask[..., None]).sum(1)  # (B, L): sum_t alpha_ti
    return ((1 - total) ** 2).sum(-1)


def reinforce_loss(
    log_p_y: torch.Tensor,
    log_p_s: torch.Tensor,
    entropy: torch.Tensor,
    baseline: torch.Tensor | float,
    *,
    reinforce_weight: float,
    entropy_weight: float,
) -> torch.Tensor:
    """The surrogate whose gradient is eq. 12's attention terms, per caption [B]:

        -(lambda_r (log p(y | s, a) - b) log p(s | a) + lambda_e H[s])

    ``log_p_y`` [B]: the caption's log-likelihood given the sampled locations (the reward, held constant);
    ``log_p_s`` [B]: sum_t log alpha_t(s_t) (0 for a sequence that took the expected context); ``entropy`` [B]:
    sum_t H[alpha_t]. The cross-entropy of the words is the first term of eq. 12 and is added by the caller."""
    advantage = (log_p_y - baseline).detach()
    return -(reinforce_weight * advantage * log_p_s + entropy_weight * entropy)


def caption_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log p(y_t | y_<t, a) per token [B, T], 0 at padding."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    return nll * mask


def bag_of_words(targets: torch.Tensor, words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Captions' token ids [B, T] -> their normalised bags [B, V]: 1/K on each of the K distinct ids where ``words``
    [B, T] is True (a caption without a word: all zeros)."""
    bag = torch.zeros(targets.shape[0], vocab_size, device=targets.device)
    bag.scatter_reduce_(1, targets, words.float(), reduce="amax")  # (B, V): 1 where a word is, however often
    return bag / bag.sum(1, keepdim=True).clamp(min=1)


def bag_of_words_loss(logits: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """-sum_w bag_w log softmax(logits)_w per image [B]: logits [B, V], normalised bags [B, V] (Joulin et al.)."""
    return -(bag * logits.float().log_softmax(-1)).sum(-1)


def words_recalled(logits: torch.Tensor, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(how many of each caption's K distinct words are among its image's K best-scored words, summed; the sum of
    the K): logits [B, V], bags [B, V]."""
    present = bag > 0
    k = present.sum(1, keepdim=True)  # (B, 1)
    rank = logits.float().argsort(-1, descending=True).argsort(-1)  # (B, V): 0 for the best-scored word
    return (present & (rank < k)).sum(), k.sum()


class CaptionLoss:
    """The training loss of one batch for the decoder's kind, and the number of correctly predicted tokens."""

    def __init__(
        self,
        *,
        kind: str,
        penalty_weight: float = 1.0,
        reinforce_weight: float = 1.0,
        entropy_weight: float = 0.01,
        baseline_decay: float = 0.9,
    ) -> None:
        self.kind = kind
        self.penalty_weight = penalty_weight
        self.reinforce_weight, self.entropy_weight = reinforce_weight, entropy_weight
        self.baseline_decay = baseline_decay

    def __call__(
        self, out: DecoderOutput, targets: torch.Tensor, mask: torch.Tensor, decoder: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nll = caption_nll(out.logits, targets, mask)  # (B, T)
        total = nll.sum()
        if self.kind == "soft" and self.penalty_weight:
            total = total + self.penalty_weight * doubly_stochastic_penalty(out.attention, mask).sum()
        if self.kind == "hard" and out.sampled is not None:
            # the surrogate's value means nothing, its gradient is eq. 12's: it enters at value 0, so that the loss
            # shown stays the captions' negative log-likelihood
            surrogate = self.reinforce(out, nll, mask, decoder.reward_baseline).sum()
            total = total + (surrogate - surrogate.detach())
        correct = ((out.logits.argmax(-1) == targets) & mask).sum()
        # the papers' per-caption objectives summed over the batch, per token: the terms keep eq. 12's and 14's
        # balance, and the scale is the cross-entropy's of any caption length
        return total / mask.sum().clamp(min=1), correct

    def reinforce(
        self, out: DecoderOutput, nll: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor
    ) -> torch.Tensor:
        """The REINFORCE and entropy terms per caption [B], advantages against the baseline from before this batch,
        which then moves towards the batch's mean reward over the sequences that sampled."""
        log_p_y = -nll.sum(1).detach()  # (B,): log p(y | s, a)
        terms = reinforce_loss(
            log_p_y,
            (out.log_p_s * mask).sum(1),
            (out.entropy * mask).sum(1),
            baseline,
            reinforce_weight=self.reinforce_weight,
            entropy_weight=self.entropy_weight,
        )
        if bool(out.sampled.any()):
            with torch.no_grad():
                reward = log_p_y[out.sampled].mean()
                baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * reward)
        return terms


def word_mask(captioner: CaptionModel, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: the targets that are words of the caption (not padding, ``<eos>`` or ``<unk>``)."""
    unk = captioner.tokenizer.tokenizer.token_to_id(WORD_UNK) if captioner.tokenizer is not None else None
    special = torch.tensor([captioner.eos_id] + ([unk] if unk is not None else []), device=targets.device)
    return mask & ~torch.isin(targets, special)


# --- zero-shot classification by a captioner (CLIP's objective comparison) -----------------------------------------
@torch.no_grad()
def zero_shot_scores(
    captioner: CaptionModel, a: torch.Tensor, names: list[str], prompts: list[list[str]], *, chunk: int = 1024
) -> torch.Tensor:
    """Class scores [B, K] of images (annotations [B, L, D]) among classes ``names`` with ``prompts`` [K][P]:

    - a sentence decoder: log (1/P) sum_p P(prompt_p | image), the likelihood of the class's prompts (ensembled in
      probability space; ``<eos>`` included: a prompt is a whole caption);
    - a bag of words: the mean log-probability of the words of the class's name (its score, not its prompts': the
      articles would differ, "an ankle boot")."""
    if isinstance(captioner.decoder, BagOfWordsHead):
        logp = captioner.decoder(a, None).logits[:, 0].float().log_softmax(-1)  # (B, V)
        tokens = captioner.tokenize(names)
        words = word_mask(captioner, tokens, tokens != captioner.pad_id) & (tokens != captioner.bos_id)  # (K, T)
        return (logp[:, tokens] * words).sum(-1) / words.sum(-1).clamp(min=1)  # (B, K, T) -> (B, K)
    flat = [p for group in prompts for p in group]
    inputs, targets, mask = teacher_forcing(captioner.tokenize(flat), captioner.pad_id)  # (K * P, T)
    B, N = a.shape[0], len(flat)
    image, prompt = torch.cartesian_prod(torch.arange(B), torch.arange(N)).to(a.device).unbind(1)  # (B * N,) each
    log_p = torch.cat([
        -caption_nll(captioner.decoder(a[i], inputs[j]).logits, targets[j], mask[j]).sum(1)
        for i, j in zip(image.split(chunk), prompt.split(chunk))
    ])  # fmt: skip
    P = len(prompts[0])
    return log_p.view(B, len(prompts), P).logsumexp(-1) - math.log(P)  # (B, K)


@torch.no_grad()
def captioner_zero_shot(
    captioner: CaptionModel,
    dataset: Any,
    labels: torch.Tensor,
    names: list[str],
    prompts: list[list[str]],
    **kwargs: Any,
) -> float:
    """Top-1 accuracy of `zero_shot_scores` over ``dataset``'s images, labelled ``labels`` (`kwargs`: the loop's
    evaluation options: device, precision)."""
    device = torch.device(kwargs.get("device", "cpu"))
    in_chans, h, w = captioner.default_cfg["input_size"]
    norm = getattr(captioner, "pretrained_cfg", {})
    hits = 0
    for images, idx in dataset.loader(256, shuffle=False):
        x = to_model_input(images.to(device), in_chans=in_chans, img_size=(h, w), mean=norm["mean"], std=norm["std"])
        with autocast(device, kwargs.get("precision", "fp32")):
            scores = zero_shot_scores(captioner, captioner.encode(x)[0], names, prompts)
        hits += (scores.argmax(-1).cpu() == labels[idx]).sum().item()
    return hits / max(len(dataset), 1)


# --- the task -----------------------------------------------------------------------------------------------------
def caption_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over `CAPTION_ARGS`' defaults; an unknown key or decoder is one line naming the known ones."""
    unknown = set(options) - set(CAPTION_ARGS)
    if unknown:
        raise VitlabError(f"unknown caption_args {sorted(unknown)}; known: {', '.join(CAPTION_ARGS)}")
    opts = {**CAPTION_ARGS, **options}
    if opts["decoder"] not in DECODERS:
        raise VitlabError(f"unknown decoder {opts['decoder']!r}; choose from {', '.join(DECODERS)}")
    if opts["tokenizer"] not in ("word", "bpe"):
        raise VitlabError(f"tokenizer must be 'word' or 'bpe', got {opts['tokenizer']!r}")
    return opts


def build_tokenizer(texts: list[str], opts: dict[str, Any]) -> TextTokenizer:
    context = int(opts["max_length"]) + 1  # <bos> and max_length tokens
    if opts["tokenizer"] == "bpe":
        return train_bpe_tokenizer(texts, vocab_size=int(opts["bpe_vocab_size"]), context_length=context)
    return train_word_tokenizer(texts, min_count=int(opts["min_count"]), context_length=context)


class CaptioningTask:
    """Captioning of a caption set. ``options``: `CAPTION_ARGS` (default: ``cfg.caption_args`` where the config
    has them)."""

    def __init__(self, cfg: TrainConfig, splits: Any, options: dict[str, Any] | None = None) -> None:
        if not isinstance(splits, CaptionSplits):
            raise VitlabError(f"captioning trains on a caption set (scenes:..., coco-captions:DIR), not {cfg.data!r}")
        if cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing:
            raise VitlabError("mixup, cutmix and label smoothing mix class labels; captioning has none")
        if cfg.teacher:
            raise VitlabError("distillation and captioning do not combine; drop --teacher")
        self.opts = caption_options(getattr(cfg, "caption_args", {}) if options is None else options)
        self.captions = splits.train.captions
        self.counts = torch.tensor([len(c) for c in self.captions])
        self.seed = cfg.seed
        self.start_epoch(0)
        self.tokenizer: TextTokenizer | None = build_tokenizer([c for caps in self.captions for c in caps], self.opts)
        weights = ("penalty_weight", "reinforce_weight", "entropy_weight", "baseline_decay")
        self.criterion = CaptionLoss(kind=self.opts["decoder"], **{k: float(self.opts[k]) for k in weights})

    def describe(self) -> str:
        size = f"{self.tokenizer.vocab_size}-token " if self.tokenizer is not None else ""
        return f"captioning ({self.opts['decoder']} decoder, {size}{self.opts['tokenizer']} vocabulary)"

    def build_model(self, cfg: TrainConfig, splits: Any) -> nn.Module:
        assert self.tokenizer is not None
        model = create_captioner(
            cfg.model,
            self.tokenizer,
            decoder=self.opts["decoder"],
            image_args={**cfg.model_args, "drop_path_rate": cfg.drop_path_rate},
            decoder_args=dict(self.opts["decoder_args"]),
        )
        model.pretrained_cfg = {"mean": list(splits.mean), "std": list(splits.std)}
        return model

    def setup(self, model: nn.Module) -> None:
        self.tokenizer = unwrap(model).tokenizer  # a resumed or loaded model's own

    # --- training ------------------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """This epoch's caption draws: one uniform number per sample from a generator of (seed, epoch) that every
        process shares, so a resumed epoch and N processes pick the captions one uninterrupted process would."""
        generator = torch.Generator().manual_seed(derive_seed("captions", self.seed, epoch))
        self.draws = torch.rand(len(self.captions), generator=generator)

    def batch_texts(self, labels: torch.Tensor) -> list[str]:
        idx = labels.cpu()
        pick = (self.draws[idx] * self.counts[idx]).long()
        return [self.captions[i][j] for i, j in zip(idx.tolist(), pick.tolist())]

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> TaskOutput:
        """Teacher-forced loss of one caption per image. ``correct`` is the batch's token accuracy times its number
        of images, so that the loop's training accuracy (correct / images) is the token accuracy."""
        captioner: CaptionModel = unwrap(model)
        tokens = captioner.tokenize(self.batch_texts(labels)).to(x.device)
        inputs, targets, mask = teacher_forcing(tokens, captioner.pad_id)
        out = model(x, inputs)
        if isinstance(captioner.decoder, BagOfWordsHead):
            bag = bag_of_words(targets, word_mask(captioner, targets, mask), out.logits.shape[-1])
            recalled, words = words_recalled(out.logits[:, 0], bag)
            loss = bag_of_words_loss(out.logits[:, 0], bag).mean()
            return TaskOutput(loss, recalled.float() / words.clamp(min=1) * len(x))
        loss, correct = self.criterion(out, targets, mask, captioner.decoder)
        return TaskOutput(loss, correct.float() / mask.sum().clamp(min=1) * len(x))

    # --- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, *, splits: Any, **kwargs: Any) -> dict[str, Any]:
        """Teacher-forced loss (nats per token) and token accuracy over every caption of every image."""
        captioner: CaptionModel = unwrap(model)
        was_training = captioner.training
        captioner.eval()
        device = torch.device(kwargs.get("device", "cpu"))
        info: DistInfo = kwargs.get("dist_info") or DistInfo()
        in_chans, h, w = captioner.default_cfg["input_size"]
        norm = getattr(captioner, "pretrained_cfg", {})
        mean, std = norm.get("mean", splits.mean), norm.get("std", splits.std)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, its units, correct, counted, images
        batches = dataset.loader(
            kwargs.get("batch_size", 256),
            shuffle=False,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=kwargs.get("num_workers", 0),
        )
        for images, idx in batches:
            x = to_model_input(images.to(device), in_chans=in_chans, img_size=(h, w), mean=mean, std=std)
            owner = torch.tensor([i for i, k in enumerate(idx.tolist()) for _ in dataset.captions[k]], device=device)
            tokens = captioner.tokenize([c for k in idx.tolist() for c in dataset.captions[k]])
            inputs, targets, mask = teacher_forcing(tokens, captioner.pad_id)
            with autocast(device, kwargs.get("precision", "fp32")):
                a, _ = captioner.encode(x)
                out = captioner.decoder(a[owner], inputs)
            sums += torch.tensor(self.batch_sums(captioner, out, targets, mask), dtype=torch.float64, device=device)
            sums[4] += len(x)
        all_reduce_sum(sums, info)
        loss, units, correct, counted, images = sums.tolist()
        accuracy = correct / max(counted, 1)
        report: dict[str, Any] = {"token_accuracy": accuracy, "caption_tokens": int(counted)}
        zero_shot = item_zero_shot_set(splits, dataset)
        if zero_shot is not None:  # every process computes it whole: a held-out split is small
            report["zero_shot"] = captioner_zero_shot(captioner, *zero_shot, **kwargs)
        captioner.train(was_training)
        return {
            "loss": loss / max(units, 1),
            "accuracy": accuracy,
            "count": int(images),
            "report": report,
            "curves": {"val_zero_shot": report["zero_shot"]} if zero_shot is not None else {},
        }

    @staticmethod
    def batch_sums(
        captioner: CaptionModel, out: DecoderOutput, targets: torch.Tensor, mask: torch.Tensor
    ) -> tuple[float, float, float, float, float]:
        """(loss summed, what it is averaged over, correct, what they are counted over, 0): a sentence decoder's
        negative log-likelihood over tokens and its token accuracy; a bag of words' loss over captions and its
        words recalled over the captions' distinct words."""
        if isinstance(captioner.decoder, BagOfWordsHead):
            bag = bag_of_words(targets, word_mask(captioner, targets, mask), out.logits.shape[-1])
            recalled, words = words_recalled(out.logits[:, 0], bag)
            return bag_of_words_loss(out.logits[:, 0], bag).sum().item(), len(bag), recalled.item(), words.item(), 0
        tokens = mask.sum().item()
        correct = ((out.logits.argmax(-1) == targets) & mask).sum().item()
        return caption_nll(out.logits, targets, mask).sum().item(), tokens, correct, tokens, 0
