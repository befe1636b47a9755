"""Caption decoders: an image model's features -> a sentence, with where the decoder looked for each word.

Three decoders read the annotation vectors a_1 .. a_L (a_i in R^D) of any registered image model
(`annotation_grid`: a ViT's patch tokens without its class and distillation tokens, a CNN map's locations):

* ``soft``: Xu et al., "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention", ICML 2015
  (arXiv:1502.03044), sections 3.1.2 and 4.2. An LSTM reads the previous word and a context vector z_t:

      e_ti = w^T tanh(W_a a_i + W_h h_{t-1}),   alpha_t = softmax(e_t)       eq. 4-5: the MLP f_att
      beta_t = sigmoid(f_beta(h_{t-1})),        z_t = beta_t sum_i alpha_ti a_i     section 4.2.1: the gate
      i_t, f_t, o_t, g_t from [E y_{t-1}; h_{t-1}; z_t]                      eq. 1-3: an LSTM cell
      p(y_t | a, y_<t) ∝ exp(L_o (E y_{t-1} + L_h h_t + L_z z_t))            eq. 7: the deep output layer

  with c_0 = tanh(f_init,c(mean_i a_i)) and h_0 = tanh(f_init,h(mean_i a_i)) (section 3.1.2). The doubly stochastic
  regulariser lambda sum_i (1 - sum_t alpha_ti)^2 (eq. 14) is a loss: `vitlab.train.captioning`.
* ``hard`` (section 4.1): the same network with a location s_t ~ Multinoulli(alpha_t) and z_t = beta_t a_{s_t},
  trained by REINFORCE (eq. 12, also in `vitlab.train.captioning`; the moving baseline b lives here as a buffer so
  that checkpoints and resume carry it). "With probability 0.5 for a given image", a training sequence uses the
  expected context instead of the sample. Evaluation and generation use the expected context, as the authors'
  sampler does with sampling off (arctic-captions), so that decoding is deterministic.
* ``transformer``: pre-norm decoder blocks (Vaswani et al., "Attention Is All You Need", 2017, section 3.1) of
  vitlab's `Attention` under a causal mask, `CrossAttention` to the annotations and `Mlp`, learned positions, and
  an output layer tied to the word embedding (Press & Wolf, 2017) or its own. Its attention map is the last
  block's cross-attention averaged over heads, recorded on the explicit path (`record_attention`).
* ``bow``: no sentence at all, a bag of its words: a linear map from the mean annotation vector to a score per
  word of the vocabulary, trained with the cross-entropy against the caption's normalised bag of words (Joulin et
  al., "Learning Visual Features from Large Weakly Supervised Data", ECCV 2016, section 3; the bag-of-words
  objective of CLIP's section 2.3, Radford et al. 2021). It generates no captions; the loss is
  `vitlab.train.captioning`'s.

Every decoder maps teacher-forced words [B, T] to logits [B, T, V] and attention maps [B, T, L] (`DecoderOutput`;
None where it has none), and steps one word at a time for generation (``start``, ``step``, ``reorder``):
`greedy_search`, and `beam_search` with the length penalty of GNMT (Wu et al., "Google's Neural Machine Translation
System", 2016, eq. 14): a finished hypothesis Y scores log P(Y | X) / lp(Y), lp(Y) = ((5 + |Y|) / 6)^alpha.

`CaptionModel` joins an image model, a decoder and the tokenizer (`vitlab.models.text`: a word-level vocabulary or
a BPE), which `save_pretrained` writes beside the weights as tokenizer.json.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._registry import build_model, build_variant, check_model_name, register_architecture
from vitlab.errors import VitlabError
from vitlab.layers import (
    Attention,
    CrossAttention,
    Mlp,
    map_to_tokens,
    no_weight_decay_names,
    record_attention,
    trunc_normal_init,
)
from vitlab.models.text import TOKENIZER_FILE, TextTokenizer, causal_mask

PAPER = (
    "Xu et al., Show, Attend and Tell: Neural Image Caption Generation with Visual Attention, ICML 2015"
    " (arXiv:1502.03044)"
)


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]: p(y_t | y_<t, a) for each teacher-forced input word
    attention: torch.Tensor | None  # [B, T, L]: alpha_t over the annotations, None for none
    log_p_s: torch.Tensor | None = None  # hard, training: [B, T] log alpha_t(s_t), 0 where the context was expected
    entropy: torch.Tensor | None = None  # hard, training: [B, T] H[alpha_t]
    sampled: torch.Tensor | None = None  # hard, training: [B] bool, the sequences that sampled their locations


class Step(NamedTuple):
    logits: torch.Tensor  # [B, V]
    attention: torch.Tensor | None  # [B, L]
    state: Any
    log_p_s: torch.Tensor | None = None  # [B]
    entropy: torch.Tensor | None = None  # [B]


# --- the encoder's side -------------------------------------------------------------------------------------------
def _grid(n: int, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) with h * w = n and the image's aspect (the same stride along both sides), or None."""
    H, W = image_size
    for h in range(1, n + 1):
        if n % h == 0 and H * (n // h) == W * h:
            return h, n // h
    return None


def annotation_grid(
    model: nn.Module, features: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image model's `forward_features` -> annotation vectors [B, L, D] and their grid (h, w), L = h * w.

    Maps [B, C, H, W] are read row by row. Tokens [B, N, D] lose the model's prefix tokens (class, distillation):
    ``num_prefix_tokens`` of them when the rest fills a grid of the image's aspect, else the count that does
    (CaiT's attribute counts the prefix of its self-attention stage, which has none, but its features carry the
    class token its class-attention stage added)."""
    if features.ndim == 4:
        return map_to_tokens(features), tuple(features.shape[-2:])
    if features.ndim != 3:
        raise VitlabError(f"an image model's features should be tokens or maps, not {tuple(features.shape)}")
    N = features.shape[1]
    for prefix in dict.fromkeys((getattr(model, "num_prefix_tokens", 0), 0, 1, 2)):
        grid = _grid(N - prefix, image_size) if N > prefix else None
        if grid is not None:
            return features[:, prefix:], grid
    raise VitlabError(f"cannot read {N} tokens as a grid over a {image_size[0]}x{image_size[1]} image")


# --- soft and hard attention: an LSTM that looks at the annotations (Xu et al.) ------------------------------------
class AdditiveAttention(nn.Module):
    """f_att (eq. 4): e_i = w^T tanh(W_a a_i + W_h h) -> (alpha, log alpha) [B, L]. W_a a is computed once per image
    (`project`), W_h h at each step. Each map passes through ``attn_probs`` as [B, 1, 1, L] (one head, one query),
    so vitlab's attention tools record it; ``fused_attn`` is their switch (additive attention has no fused kernel)."""

    def __init__(self, dim: int, *, query_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.proj_a = nn.Linear(dim, attn_dim)  # W_a, with the MLP's bias
        self.proj_h = nn.Linear(query_dim, attn_dim, bias=False)  # W_h
        self.score = nn.Linear(attn_dim, 1, bias=False)  # w; a bias would cancel in the softmax
        self.fused_attn = True
        self.attn_probs = nn.Identity()

    def project(self, a: torch.Tensor) -> torch.Tensor:
        return self.proj_a(a)  # (B, L, A)

    def forward(self, projected: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = projected.shape
        e = self.score(torch.tanh(projected + self.proj_h(h)[:, None])).squeeze(-1)  # (B, L)
        log_alpha = e.float().log_softmax(-1)
        alpha = self.attn_probs(log_alpha.exp().view(B, 1, 1, L)).view(B, L)
        return alpha, log_alpha


class LSTMState(NamedTuple):
    a: torch.Tensor  # annotations [B, L, D]
    projected: torch.Tensor  # W_a a [B, L, A]
    h: torch.Tensor  # [B, n]
    c: torch.Tensor  # [B, n]
    sample: torch.Tensor | None  # hard attention in training: [B] bool, the sequences that sample locations


class SoftAttentionDecoder(nn.Module):
    """Show, Attend and Tell with deterministic soft attention (section 4.2). Sizes: ``embed_dim`` m (words and
    the deep output), ``hidden_dim`` n (the LSTM), ``attn_dim`` (f_att's hidden layer); the paper's are larger, these
    suit CPU runs on short captions."""

    kind = "soft"

    def __init__(
        self,
        *,
        vocab_size: int,
        context_dim: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)  # E
        self.init_h = nn.Linear(context_dim, hidden_dim)  # f_init,h
        self.init_c = nn.Linear(context_dim, hidden_dim)  # f_init,c
        self.attn = AdditiveAttention(context_dim, query_dim=hidden_dim, attn_dim=attn_dim)
        self.f_beta = nn.Linear(hidden_dim, 1)
        self.lstm = nn.LSTMCell(embed_dim + context_dim, hidden_dim)  # eq. 1 on [E y_{t-1}; h_{t-1}; z_t]
        self.out_h = nn.Linear(hidden_dim, embed_dim, bias=False)  # L_h
        self.out_z = nn.Linear(context_dim, embed_dim, bias=False)  # L_z
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(embed_dim, vocab_size)  # L_o

    def start(self, a: torch.Tensor) -> LSTMState:
        mean = a.mean(1)  # (B, D)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        return LSTMState(a, self.attn.project(a), h, c, None)

    def context(
        self, state: LSTMState, alpha: torch.Tensor, log_alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the context before the gate [B, D], log p(s_t) [B], H[alpha_t] [B]): soft attention takes the
        expectation sum_i alpha_ti a_i (eq. 13) and has no sample."""
        return torch.einsum("bl,bld->bd", alpha.to(state.a.dtype), state.a), None, None

    def step(self, state: LSTMState, token: torch.Tensor) -> Step:
        """One word: the previous word ``token`` [B] -> logits for the next [B, V], alpha_t [B, L], the new state."""
        alpha, log_alpha = self.attn(state.projected, state.h)
        z, log_p_s, entropy = self.context(state, alpha, log_alpha)
        z = torch.sigmoid(self.f_beta(state.h)) * z  # beta_t: how much of the image this word needs
        y = self.embed(token)  # (B, m)
        h, c = self.lstm(torch.cat([y, z], dim=-1), (state.h, state.c))
        logits = self.head(self.drop(y + self.out_h(h) + self.out_z(z)))  # eq. 7
        return Step(logits, alpha, state._replace(h=h, c=c), log_p_s, entropy)

    def reorder(self, state: LSTMState, index: torch.Tensor) -> LSTMState:
        return LSTMState(*(s.index_select(0, index) if s is not None else None for s in state))

    def forward(self, a: torch.Tensor, tokens: torch.Tensor, *, need_attention: bool = True) -> DecoderOutput:
        """Teacher forcing: annotations [B, L, D] and input words [B, T] (``<bos>`` first) -> `DecoderOutput`. The
        maps come at no cost here, so ``need_attention`` changes nothing."""
        state, steps = self.start(a), []
        for t in range(tokens.shape[1]):
            step = self.step(state, tokens[:, t])
            state = step.state
            steps.append(step)
        logits = torch.stack([s.logits for s in steps], 1)  # (B, T, V)
        attention = torch.stack([s.attention for s in steps], 1)  # (B, T, L)
        if state.sample is None:
            return DecoderOutput(logits, attention)
        log_p_s = torch.stack([s.log_p_s for s in steps], 1)  # (B, T)
        entropy = torch.stack([s.entropy for s in steps], 1)
        return DecoderOutput(logits, attention, log_p_s, entropy, state.sample)


class HardAttentionDecoder(SoftAttentionDecoder):
    """Show, Attend and Tell with stochastic hard attention (section 4.1): in training, each sequence samples its
    locations with probability ``sample_prob`` (the paper's 0.5) and uses the expected context otherwise."""

    kind = "hard"

    def __init__(self, *, sample_prob: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= sample_prob <= 1:
            raise VitlabError(f"sample_prob must be in [0, 1], got {sample_prob}")
        self.sample_prob = sample_prob
        self.register_buffer("reward_baseline", torch.zeros(()))  # b of eq. 12, moved by the training task

    def start(self, a: torch.Tensor) -> LSTMState:
        state = super().start(a)
        if not self.training:
            return state
        return state._replace(sample=torch.rand(a.shape[0], device=a.device) < self.sample_prob)

    def context(
        self, state: LSTMState, alpha: torch.Tensor, log_alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        expected = super().context(state, alpha, log_alpha)[0]
        if state.sample is None:
            return expected, None, None
        B = alpha.shape[0]
        s = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,): s_t ~ Multinoulli(alpha_t)
        z = torch.where(state.sample[:, None], state.a[torch.arange(B, device=s.device), s], expected)
        # the gradient of a sampled context reaches alpha only through REINFORCE's log p(s_t)
        log_p_s = log_alpha.gather(1, s[:, None]).squeeze(1) * state.sample
        entropy = -(alpha * log_alpha).sum(-1)
        return z, log_p_s, entropy


# --- the transformer decoder --------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention over the words, cross-attention to the image, MLP; each a
    residual branch (Vaswani et al., section 3.1, with the norms first as in ViT and GPT-2)."""

    def __init__(self, dim: int, *, context_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim=context_dim, num_heads=num_heads, proj_drop=drop)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class TransformerState(NamedTuple):
    context: torch.Tensor  # normalised annotations [B, L, D]
    tokens: torch.Tensor  # the words so far [B, t]


class TransformerDecoder(nn.Module):
    kind = "transformer"

    def __init__(
        self,
        *,
        vocab_size: int,
        context_dim: int,
        max_length: int = 32,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        tie_embeddings: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, dim))
        # image models' features come at any scale (a CNN's maps are not normalised): one LayerNorm evens them
        self.context_norm = nn.LayerNorm(context_dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, context_dim=context_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # tied: the logits are x E^T plus a bias of their own (no shared parameter, which safetensors refuses)
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size)) if tie_embeddings else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) linear maps and positions, N(0, 0.02) word embeddings, as vitlab's ViT and
        CLIP's text tower."""
        trunc_normal_init(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def decode(
        self, context: torch.Tensor, tokens: torch.Tensor, need_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = tokens.shape
        if T > self.max_length:
            raise VitlabError(f"{T} words exceed the transformer decoder's {self.max_length} positions")
        x = self.embed(tokens) + self.pos_embed[:, :T]  # (B, T, dim)
        mask = causal_mask(T, tokens.device)
        *first, last = self.blocks
        for block in first:
            x = block(x, context, mask)
        attention = None
        if need_attention:
            with record_attention(last.cross_attn) as maps:
                x = last(x, context, mask)
            attention = maps[""][0].float().mean(1)  # (B, heads, T, L) -> (B, T, L)
        else:
            x = last(x, context, mask)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight, self.head_bias)
        return logits, attention

    def forward(self, a: torch.Tensor, tokens: torch.Tensor, *, need_attention: bool = False) -> DecoderOutput:
        """Teacher forcing: annotations [B, L, D] and input words [B, T] -> `DecoderOutput`; the maps only with
        ``need_attention`` (they need the explicit attention path)."""
        return DecoderOutput(*self.decode(self.context_norm(a), tokens, need_attention))

    def start(self, a: torch.Tensor) -> TransformerState:
        return TransformerState(self.context_norm(a), a.new_zeros((a.shape[0], 0), dtype=torch.long))

    def step(self, state: TransformerState, token: torch.Tensor) -> Step:
        """The whole prefix again (captions are short; no key-value cache), the last position's outputs."""
        tokens = torch.cat([state.tokens, token[:, None]], dim=1)
        logits, attention = self.decode(state.context, tokens, need_attention=True)
        return Step(logits[:, -1], attention[:, -1], TransformerState(state.context, tokens))

    def reorder(self, state: TransformerState, index: torch.Tensor) -> TransformerState:
        return TransformerState(state.context.index_select(0, index), state.tokens.index_select(0, index))


# --- a bag of words (Joulin et al. 2016) ---------------------------------------------------------------------------
class BagOfWordsHead(nn.Module):
    """Scores of every word of the vocabulary from the pooled image: logits = W mean_i(a_i) + b, one linear layer
    as Joulin et al.'s, on the mean annotation vector that the LSTM decoders' initial state also reads."""

    kind = "bow"

    def __init__(self, *, vocab_size: int, context_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(context_dim, vocab_size)

    def forward(self, a: torch.Tensor, tokens: torch.Tensor, *, need_attention: bool = False) -> DecoderOutput:
        """Annotations [B, L, D] -> `DecoderOutput` with logits [B, 1, V]: one prediction per image, whatever the
        caption's words ``tokens`` (the loss reads them)."""
        return DecoderOutput(self.head(a.mean(1))[:, None], None)  # (B, 1, V)


DECODERS: dict[str, type[nn.Module]] = {
    "soft": SoftAttentionDecoder,
    "hard": HardAttentionDecoder,
    "transformer": TransformerDecoder,
    "bow": BagOfWordsHead,
}


# --- generation ---------------------------------------------------------------------------------------------------
class Generated(NamedTuple):
    tokens: torch.Tensor  # [B, T] int64: the words, then <eos> (unless the length limit came first), <pad> after
    attention: torch.Tensor | None  # [B, T, L]: alpha for each generated token, zeros after the end
    log_prob: torch.Tensor  # [B]: log P(Y | image) of the generated tokens, <eos> included
    grid: tuple[int, int] | None = None  # (h, w) of the maps' L = h * w locations (`CaptionModel.generate`)


def _pad_rows(rows: list[torch.Tensor], width: int, value: float) -> torch.Tensor:
    """Rows [t_i, ...] of different lengths -> one tensor [n, width, ...], ``value`` after each row's end."""
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@torch.no_grad()
def greedy_search(
    decoder: nn.Module, a: torch.Tensor, *, bos_id: int, eos_id: int, pad_id: int, max_length: int
) -> Generated:
    """The most probable word at each step, for annotations [B, L, D], until <eos> or ``max_length`` tokens."""
    B = a.shape[0]
    state = decoder.start(a)
    token = torch.full((B,), bos_id, dtype=torch.long, device=a.device)
    done = torch.zeros(B, dtype=torch.bool, device=a.device)
    log_prob = torch.zeros(B, device=a.device)
    words, maps = [], []
    for _ in range(max_length):
        step = decoder.step(state, token)
        state = step.state
        logp = step.logits.float().log_softmax(-1)  # (B, V)
        token = logp.argmax(-1)
        log_prob += torch.where(done, 0.0, logp.gather(1, token[:, None]).squeeze(1))
        words.append(torch.where(done, pad_id, token))
        if step.attention is not None:
            maps.append(torch.where(done[:, None], 0.0, step.attention.float()))
        done = done | (token == eos_id)
        if bool(done.all()):
            break
    return Generated(torch.stack(words, 1), torch.stack(maps, 1) if maps else None, log_prob)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016, eq. 14); alpha = 0 ranks by log-probability alone."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(
    decoder: nn.Module,
    a: torch.Tensor,
    *,
    beam_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    length_alpha: float = 0.6,
) -> Generated:
    """Beam search for a batch of images (annotations [B, L, D]), ``beam_size`` hypotheses each.

    At every step each image's live hypotheses propose their continuations, and the best ones by log-probability
    go on. A hypothesis that ends (<eos>, or ``max_length`` tokens) is kept aside, and its image searches with one
    hypothesis fewer from then on (the classic shrinking beam of the Show, Attend and Tell code), so the search
    ends after at most ``max_length`` steps, and with one hypothesis it is greedy search. The answer is the kept
    hypothesis with the best log P(Y) / lp(Y) (`length_penalty` with ``length_alpha``; 0.6 as tensor2tensor)."""
    B, k = a.shape[0], beam_size
    if k < 1 or max_length < 1:
        raise VitlabError(f"beam search needs beam_size >= 1 and max_length >= 1, got {k} and {max_length}")
    device = a.device
    state = decoder.start(a.repeat_interleave(k, 0))  # hypothesis j of image b is row b * k + j
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis to start with, so the first step proposes no duplicates
    token = torch.full((B * k,), bos_id, dtype=torch.long, device=device)
    history = token.new_zeros((B * k, 0))
    maps: torch.Tensor | None = None
    finished: list[list[tuple[float, float, torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(B)]
    rank = torch.arange(k, device=device)[None]  # (1, k)
    for t in range(max_length):
        step = decoder.step(state, token)
        logp = step.logits.float().log_softmax(-1)  # (B * k, V)
        V = logp.shape[-1]
        top, idx = (scores.view(-1, 1) + logp).view(B, k * V).topk(k, dim=-1)  # (B, k), best first
        parent = (torch.arange(B, device=device)[:, None] * k + idx // V).view(-1)  # (B * k,)
        word = idx % V  # (B, k)
        state = decoder.reorder(step.state, parent)
        history = torch.cat([history[parent], word.view(-1, 1)], dim=1)  # (B * k, t + 1)
        if step.attention is not None:
            new = step.attention.float()[parent][:, None]  # (B * k, 1, L)
            maps = new if maps is None else torch.cat([maps[parent], new], dim=1)
        left = torch.tensor([k - len(f) for f in finished], device=device)
        live = (rank < left[:, None]) & torch.isfinite(top)
        ends = live & ((word == eos_id) | (t == max_length - 1))
        for b, j in ends.nonzero().tolist():
            score, row = top[b, j].item(), b * k + j
            hyp_maps = maps[row].clone() if maps is not None else None
            finished[b].append((score / length_penalty(t + 1, length_alpha), score, history[row].clone(), hyp_maps))
        scores = torch.where(live & ~ends, top, float("-inf"))
        if not bool(torch.isfinite(scores).any()):
            break
        token = word.view(-1)
    best = [max(f, key=lambda h: h[0]) for f in finished]
    width = max(len(h[2]) for h in best)
    tokens = _pad_rows([h[2] for h in best], width, pad_id)
    attention = _pad_rows([h[3] for h in best], width, 0.0) if maps is not None else None
    return Generated(tokens, attention, torch.tensor([h[1] for h in best], device=device))


# --- the captioner ------------------------------------------------------------------------------------------------
@register_architecture
class CaptionModel(nn.Module):
    """An image model (its `forward_features`, without its classifier), a caption decoder (`DECODERS`) and the
    tokenizer. ``max_length``: the most tokens a caption takes after <bos> (its words and <eos>); the tokenizer
    truncates to ``max_length + 1``."""

    arch = "caption"
    head_names: tuple[str, ...] = ()  # no classifier: nothing is reset when loading

    def __init__(
        self,
        *,
        image_model: str,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        decoder: str = "soft",
        max_length: int = 32,
        image_args: dict[str, Any] | None = None,
        decoder_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise VitlabError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
        self.encoder = build_variant(image_model, **{**(image_args or {}), "num_classes": 0})
        args = dict(decoder_args or {})
        if DECODERS[decoder] is TransformerDecoder:
            args.setdefault("max_length", max_length)  # its learned positions
        self.decoder = DECODERS[decoder](vocab_size=vocab_size, context_dim=self.encoder.num_features, **args)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length = max_length
        self.tokenizer: TextTokenizer | None = None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images [B, C, H, W] -> annotation vectors [B, L, D] and their grid (h, w) (`annotation_grid`)."""
        return annotation_grid(self.encoder, self.encoder.forward_features(images), tuple(images.shape[-2:]))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, *, need_attention: bool = False) -> DecoderOutput:
        """Teacher forcing: images and input words [B, T] (<bos> first) -> logits [B, T, V] for the next words."""
        return self.decoder(self.encode(images)[0], tokens, need_attention=need_attention)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        *,
        beam_size: int = 1,
        max_length: int | None = None,
        length_alpha: float = 0.6,
    ) -> Generated:
        """Captions of ``images`` as token ids, with the attention of each word over the grid: greedy search for
        ``beam_size=1``, else `beam_search` with GNMT's length penalty ``length_alpha``. Runs in eval mode (the
        hard decoder then takes the expected context)."""
        if isinstance(self.decoder, BagOfWordsHead):
            raise VitlabError("a bag-of-words head predicts words, not sentences: it has no captions to generate")
        was_training = self.training
        self.eval()
        try:
            a, grid = self.encode(images)
            ids = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
            n = max_length or self.max_length
            if beam_size == 1:
                out = greedy_search(self.decoder, a, max_length=n, **ids)
            else:
                out = beam_search(self.decoder, a, beam_size=beam_size, max_length=n, length_alpha=length_alpha, **ids)
            return out._replace(grid=grid)
        finally:
            self.train(was_training)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Captions -> token ids [B, T] (<bos> ... <eos>, padded) on the model's device."""
        if self.tokenizer is None:
            raise VitlabError("this caption model has no tokenizer: load a checkpoint saved with one")
        return self.tokenizer(texts).to(next(self.decoder.parameters()).device)

    def texts(self, tokens: torch.Tensor) -> list[str]:
        """Token ids [B, T] -> one caption each: the words before the first <eos>, <unk> kept."""
        if self.tokenizer is None:
            raise VitlabError("this caption model has no tokenizer: load a checkpoint saved with one")
        out = []
        for row in tokens.tolist():
            words = row[: row.index(self.eos_id)] if self.eos_id in row else row
            words = [i for i in words if i not in (self.bos_id, self.pad_id)]
            text = self.tokenizer.tokenizer.decode(words, skip_special_tokens=False)
            out.append(re.sub(r"\s+([.,;:!?])", r"\1", text).strip())  # a word-level vocabulary's spaces
        return out

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(encoder=self.encoder, decoder=self.decoder)

    # --- files beside the weights (`vitlab.checkpoint` calls these) ---------------------------------------------
    def save_files(self, directory: str | Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_files(self, directory: str | Path) -> None:
        if (Path(directory) / TOKENIZER_FILE).exists():
            self.tokenizer = TextTokenizer.load(directory, context_length=self.max_length + 1)


def create_captioner(
    image_model: str,
    tokenizer: TextTokenizer,
    *,
    decoder: str = "soft",
    image_args: dict[str, Any] | None = None,
    decoder_args: dict[str, Any] | None = None,
) -> CaptionModel:
    """A `CaptionModel` of a registered image model and a decoder, for the vocabulary of ``tokenizer``
    (`vitlab.models.text.train_word_tokenizer` or `train_bpe_tokenizer` on the training captions)."""
    check_model_name(image_model)  # the registry's one-line error with suggestions, before anything is built
    ends = tokenizer.tokenizer.encode("").ids  # the empty caption: <bos> <eos>
    if len(ends) != 2:
        raise VitlabError("a caption tokenizer must bracket every caption with a begin and an end token")
    bos_id, eos_id = ends
    init = {
        "image_model": image_model,
        "image_args": dict(image_args or {}),
        "decoder": decoder,
        "decoder_args": dict(decoder_args or {}),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": tokenizer.pad_id,
        "max_length": tokenizer.context_length - 1,
    }
    model = build_model(CaptionModel, "caption", init, {})
    model.default_cfg = {**model.encoder.default_cfg, "num_classes": 0, "paper": PAPER}
    model.tokenizer = tokenizer
    return model
