"""MMT: the multi-modal transformer for text-to-video retrieval.

Gabeur, Sun, Alahari, Schmid, "Multi-modal Transformer for Video Retrieval", ECCV 2020 (arXiv:2007.10639).

**Video** (section 3.1). Each of M experts (appearance, motion, audio, OCR, ...) gives a stream of features
F^n = [F^n_1 ... F^n_K] in R^{K x d_n}, each with a timestamp. Every feature is projected to d_model by the expert's
own linear map (and L2-normalised, as the code's ``ReduceDim``); each expert adds an aggregated token, the max-pool
of its features over time (the code's ``out_tok='mxp'``) through the same map. The input to the transformer is

    Omega(v) = F(v) + E(v) + T(v)
      F(v) = [F^1_agg, F^1_1 ... F^1_K, ..., F^M_agg, F^M_1 ... F^M_K]       projected features
      E(v) = [E^1, E^1 ... E^1, ..., E^M ... E^M]                          expert embeddings (one per expert)
      T(v) = [T_agg, T_1 ... T_D, ...]                                      temporal embeddings: one per second
                                                                            (clamped to ``max_seconds``), T_agg for
                                                                            the aggregated tokens

then a LayerNorm (BERT's embedding norm) and a transformer encoder over all tokens; the outputs at the aggregated
tokens are the video's per-expert embeddings Psi^n_agg(v), L2-normalised. Padded features and missing experts are
masked out of every attention (a missing expert's aggregated token is zero and masked too), and their inputs are
zeroed first, so that nothing of them (not even NaN) reaches another token. Here the encoder is vitlab's pre-norm
`Block` with a final LayerNorm; MMT's is BERT's post-norm layer.

**Caption** (section 3.2). A BERT encodes the caption bracketed by [CLS] and [SEP]; its [CLS] output h(c) is
projected once per expert by a gated embedding unit (Miech et al., "Learning a Text-Video Embedding from
Incomplete and Heterogeneous Data", 2018)

    GEU(h) = normalize(Z * sigmoid(W_2 Z + b_2)),   Z = W_1 h + b_1      (context gating; MMT's "gbn" adds a
                                                                           BatchNorm before the sigmoid)

and mixture weights w^n(c) = softmax_n(a_n . h(c) + b_n) over the experts.

**Similarity** (section 3.3): s(v, c) = sum_n w^n(c, v) <Psi^n_agg(v), GEU^n(h(c))>, where the weights of the
experts v lacks are set to 0 and the others renormalised to sum to 1 (``vid_weights * available`` then the L1
normalisation of ``sharded_cross_view_inner_product``; MMT's MSR-VTT config keeps them instead, with
``keep_missing_modalities``). Trained with the bidirectional max-margin ranking loss, margin 0.05 (section 4.1;
`max_margin_ranking_loss`) or InfoNCE (`infonce_loss`).

Two bugs of the released code are avoided, each with a test: ``F.normalize(x)`` without ``dim`` normalises a
[B, K, d] stream over time (dim 1), not over features (every normalisation here names ``dim=-1``); and
``hasattr(tokenizer, "cls_token_ids")`` (a typo) meant [CLS] and [SEP] were never added (vitlab's BERT tokenizers add
them, and `MMT` refuses captions whose first token is not [CLS] when it knows the id).

**Baseline** (``aggregation='mean'``): no transformer, no expert or temporal embeddings; each expert's features are
mean-pooled over time and projected by a gated embedding unit of the video side, as in Miech et al.'s mixture of
embedding experts (MoEE), the baseline MMT's Table 5 improves on. The caption side and the similarity are MMT's.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._registry import build_model, register_architecture
from vitlab.errors import VitlabError
from vitlab.layers import Block, drop_path_rates, trunc_normal_init
from vitlab.models.text import (
    MINILM,
    TOKENIZER_FILE,
    SentenceEncoder,
    TextTokenizer,
    TextTransformer,
    build_text_tower,
    load_pretrained_text,
    text_context_length,
    text_tower_args,
)

PAPER = "Gabeur et al., Multi-modal Transformer for Video Retrieval, ECCV 2020 (arXiv:2007.10639)"


class ContextGating(nn.Module):
    """x * sigmoid(W x + b): each feature gated by all of them (Miech et al., 2017)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x))


class GatedEmbeddingUnit(nn.Module):
    """Linear, context gating, L2 norm over the features: one expert's view of the caption, [..., in] -> [..., out]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gate = ContextGating(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.gate(self.fc(x)), dim=-1)


def caption_tokens(tower: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A text tower's token features [B, L, text_dim]: ``forward_features`` where the tower has it, else the HF
    encoder inside a `SentenceEncoder` (its ``forward`` mean-pools them), padding masked out."""
    if isinstance(tower, SentenceEncoder):
        mask = (ids != tower.pad_token_id).long()
        return tower.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return tower.forward_features(ids)


@register_architecture
class MMT(nn.Module):
    """Video experts through a transformer, a caption through a text tower, matched expert by expert.

    ``experts``: name -> feature width, in the order of the video's tokens. ``text_model`` / ``text_args``: a text
    tower of `vitlab.models.text` (a BERT-style one for [CLS] pooling: all_minilm_l6_v2, or its ``hf_config`` with
    other sizes), its features pooled at [CLS] (``text_pool='cls'``, MMT's) or by the tower itself
    (``'tower'``: MiniLM's mean, a causal transformer's [EOS]); ``lock_text`` freezes it. ``max_seconds``: the
    temporal embeddings (one per second; later times share the last); ``temporal=False`` drops them. The sizes
    default to MMT's MSR-VTT configuration (d_model 512, 4 layers, 4 heads, dropout 0.1); `create_mmt` builds one
    with the packaged MiniLM and its tokenizer.
    """

    arch = "mmt"
    head_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        experts: Mapping[str, int],
        text_model: str = MINILM,
        text_args: dict[str, Any] | None = None,
        d_model: int = 512,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 6.0,  # MMT's MSR-VTT config: hidden 512, intermediate 3072
        max_seconds: int = 30,  # its 32 position rows, less [CLS] and "unknown"
        temporal: bool = True,
        aggregation: Literal["transformer", "mean"] = "transformer",
        text_pool: Literal["cls", "tower"] = "cls",
        cls_token_id: int | None = None,
        lock_text: bool = False,
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not experts:
            raise VitlabError("MMT needs at least one expert: experts={'name': feature_width, ...}")
        if text_pool not in ("cls", "tower"):
            raise VitlabError(f"text_pool must be 'cls' or 'tower', got {text_pool!r}")
        if aggregation not in ("transformer", "mean"):
            raise VitlabError(
                f"aggregation must be 'transformer' (MMT) or 'mean' (MoEE's baseline), got {aggregation!r}"
            )
        self.experts = list(experts)
        self.d_model, self.max_seconds, self.aggregation = d_model, max_seconds, aggregation
        self.temporal = temporal and aggregation == "transformer"
        self.text_pool, self.cls_token_id, self.lock_text = text_pool, cls_token_id, lock_text
        # --- video side
        if aggregation == "mean":
            self.video_units = nn.ModuleDict({name: GatedEmbeddingUnit(dim, d_model) for name, dim in experts.items()})
        else:
            self._build_transformer(experts, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                    drop_rate=drop_rate, drop_path_rate=drop_path_rate)  # fmt: skip
        # --- caption side
        self.text_encoder = build_text_tower(text_model, dict(text_args or {}))
        if text_pool == "cls" and isinstance(self.text_encoder, TextTransformer):
            raise VitlabError(
                "a causal text transformer's first token sees only itself: use text_pool='tower' (its [EOS] feature) "
                "or a BERT-style tower"
            )
        text_dim = self.text_encoder.num_features
        self.text_drop = nn.Dropout(drop_rate)
        self.text_units = nn.ModuleDict({name: GatedEmbeddingUnit(text_dim, d_model) for name in self.experts})
        self.mixture = nn.Linear(text_dim, len(self.experts))  # a_n, b_n of every expert in one map
        self.context_length = text_context_length(text_model, dict(text_args or {}))
        self.tokenizer: TextTokenizer | None = None
        trunc_normal_init(self, skip=self.text_encoder)  # BERT's N(0, 0.02); the text tower keeps its own
        self._init_embeddings()
        if lock_text:
            self.text_encoder.requires_grad_(False)
        self.train()

    def _build_transformer(
        self, experts: Mapping[str, int], *, depth: int, num_heads: int, mlp_ratio: float, drop_rate: float,
        drop_path_rate: float
    ) -> None:  # fmt: skip
        d_model = self.d_model
        self.expert_proj = nn.ModuleDict({name: nn.Linear(dim, d_model) for name, dim in experts.items()})
        self.expert_embed = nn.Embedding(len(self.experts), d_model)  # E^n
        self.temporal_embed = nn.Embedding(self.max_seconds + 1, d_model) if self.temporal else None  # row 0: T_agg
        self.embed_norm = nn.LayerNorm(d_model, eps=1e-12)  # BERT's embedding LayerNorm (layer_norm_eps 1e-12)
        self.embed_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads=num_heads, mlp_ratio=mlp_ratio, proj_drop=drop_rate, attn_drop=drop_rate,
                  drop_path=p)
            for p in dpr
        )  # fmt: skip
        self.norm = nn.LayerNorm(d_model)

    @torch.no_grad()
    def _init_embeddings(self) -> None:
        for table in (getattr(self, "expert_embed", None), getattr(self, "temporal_embed", None)):
            if table is not None:
                nn.init.trunc_normal_(table.weight, std=0.02)

    def train(self, mode: bool = True) -> MMT:
        """A locked text tower stays in eval mode (no dropout) while the rest trains."""
        super().train(mode)
        if self.lock_text:
            self.text_encoder.eval()
        return self

    # --- video -------------------------------------------------------------------------------------------------
    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """An expert's features [..., d_n] -> [..., d_model], unit length over the features (dim=-1: without it
        F.normalize takes dim 1, the time axis of a [B, K, d] stream, MMT's bug)."""
        return F.normalize(self.expert_proj[name](x), dim=-1)

    def expert_tokens(
        self, name: str, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One expert's aggregated token and features: tokens [B, 1 + K, d], position ids [B, 1 + K], which tokens
        are real [B, 1 + K]."""
        B, K, _ = x.shape
        _check_stream(name, x, t, mask)
        mask = mask.bool()
        present = mask.any(dim=1)  # (B,)
        x = x.masked_fill(~mask[..., None], 0.0)  # padding (NaN included) never enters a sum
        agg = x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)  # (B, d_n): max-pool over real features
        agg = torch.where(present[:, None], agg, torch.zeros_like(agg))  # a missing expert's token is zero
        tokens = torch.cat([self.project(name, agg)[:, None], self.project(name, x)], dim=1)  # (B, 1 + K, d)
        seconds = torch.nan_to_num(t.float(), nan=0.0).floor().clamp(0, self.max_seconds - 1).long() + 1
        pos = torch.cat([seconds.new_zeros(B, 1), seconds], dim=1)  # (B, 1 + K): 0 is T_agg
        return tokens, pos, torch.cat([present[:, None], mask], dim=1)

    def encode_video(
        self,
        features: Mapping[str, torch.Tensor],
        timestamps: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert: features [B, K_n, d_n], timestamps in seconds [B, K_n], masks [B, K_n] (True where a feature
        is real; all False for a clip that lacks the expert) -> (expert embeddings [B, M, d_model], unit length;
        available [B, M], whether the clip has the expert). A clip with none of the model's experts (a clip without
        sound, for a model of audio alone) gets zero embeddings: similarity 0 to every caption, ranked as a tie, as
        MMT's renormalised weights (all 0) score it."""
        self._check_experts(features, timestamps, masks)
        if self.aggregation == "mean":
            return self.encode_video_mean(features, timestamps, masks)
        parts = [self.expert_tokens(n, features[n], timestamps[n], masks[n]) for n in self.experts]
        x = torch.cat([p[0] for p in parts], dim=1)  # (B, N, d)
        keep = torch.cat([p[2] for p in parts], dim=1)  # (B, N)
        lengths = [p[0].shape[1] for p in parts]
        agg_index = torch.tensor([0, *lengths[:-1]], device=x.device).cumsum(0)  # each expert's aggregated token
        available = keep[:, agg_index]  # (B, M)
        empty = ~available.any(dim=1)  # (B,): clips with none of the model's experts (an expert subset's)
        keep[:, agg_index] |= empty[:, None]  # they attend among their own zero tokens: no NaN from an empty softmax
        types = torch.arange(len(self.experts), device=x.device).repeat_interleave(
            torch.tensor(lengths, device=x.device)
        )
        x = x + self.expert_embed(types)  # (B, N, d) + (N, d): E^n of each token's expert
        if self.temporal_embed is not None:
            x = x + self.temporal_embed(torch.cat([p[1] for p in parts], dim=1))
        x = self.embed_drop(self.embed_norm(x))
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, N): no query sees a padded or missing token
        for block in self.blocks:
            x = block(x, attn_mask)
        out = self.norm(x)[:, agg_index]  # (B, M, d): Psi_agg^n
        return F.normalize(out, dim=-1).masked_fill(empty[:, None, None], 0.0), available

    def encode_video_mean(
        self,
        features: Mapping[str, torch.Tensor],
        timestamps: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoEE baseline: per expert the mean of its real features through its gated embedding unit; no
        transformer, so neither order nor the other experts reach an embedding. Same in and out as `encode_video`."""
        out, present = [], []
        for name in self.experts:
            x, mask = features[name], masks[name]
            _check_stream(name, x, timestamps[name], mask)
            mask = mask.bool()
            x = x.masked_fill(~mask[..., None], 0.0)  # (B, K, d_n): padding (NaN included) never enters the sum
            mean = x.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, d_n)
            out.append(self.video_units[name](mean))
            present.append(mask.any(dim=1))
        available = torch.stack(present, dim=1)  # (B, M)
        empty = ~available.any(dim=1)  # (B,): as in encode_video, a clip with none of the experts scores 0
        return torch.stack(out, dim=1).masked_fill(empty[:, None, None], 0.0), available  # (B, M, d), unit length

    def _check_experts(self, features: Mapping, timestamps: Mapping, masks: Mapping) -> None:
        missing = [n for n in self.experts if n not in features or n not in timestamps or n not in masks]
        if missing:
            raise VitlabError(
                f"no features, timestamps or mask for expert(s) {', '.join(missing)}: give every expert, with an "
                "all-False mask where a clip lacks it"
            )

    # --- caption -----------------------------------------------------------------------------------------------
    def caption_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the caption's pooled feature h(c) [B, text_dim]."""
        with torch.no_grad() if self.lock_text else nullcontext():
            if self.text_pool == "tower":
                return self.text_encoder(ids)
            if self.cls_token_id is not None and not bool((ids[:, 0] == self.cls_token_id).all()):
                raise VitlabError(
                    f"captions must start with [CLS] (id {self.cls_token_id}), whose output MMT pools: tokenize them "
                    "with the text tower's tokenizer, which adds [CLS] and [SEP]"
                )
            return caption_tokens(self.text_encoder, ids)[:, 0]  # (B, text_dim): the [CLS] output

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (per-expert caption embeddings [B, M, d_model], unit length; mixture weights [B, M],
        a softmax over the experts)."""
        h = self.text_drop(self.caption_features(ids))
        embeds = torch.stack([self.text_units[n](h) for n in self.experts], dim=1)  # (B, M, d)
        return embeds, self.mixture(h).softmax(dim=-1)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise VitlabError("this MMT model has no tokenizer: pass token ids, or load a checkpoint saved with one")
        return self.tokenizer(texts).to(self.mixture.weight.device)

    # --- matching ----------------------------------------------------------------------------------------------
    @staticmethod
    def mixture_weights(text_weights: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Caption weights [Bt, M] and the experts each video has [Bv, M] -> the weights of every pair
        [Bt, Bv, M]: 0 for an expert the video lacks, the others renormalised to sum to 1."""
        w = text_weights[:, None, :] * available[None, :, :].to(text_weights.dtype)  # (Bt, Bv, M)
        return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def similarity(
        self, text: tuple[torch.Tensor, torch.Tensor], video: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """s(v, c) = sum_n w^n(c, v) <Psi^n(v), GEU^n(c)> for every caption and video: [Bt, Bv]."""
        (t, tw), (v, available) = text, video
        w = self.mixture_weights(tw, available)  # (Bt, Bv, M)
        return torch.einsum("tvm,tmd,vmd->tv", w, t, v.to(t.dtype))

    def forward(
        self,
        ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        timestamps: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Captions [Bt, L] against clips (see `encode_video`) -> similarities [Bt, Bv]."""
        return self.similarity(self.encode_text(ids), self.encode_video(features, timestamps, masks))

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("expert_embed.weight", "temporal_embed.weight") if n in dict(self.named_parameters())}

    # --- files beside the weights (`vitlab.checkpoint` calls these) ---------------------------------------------
    def save_files(self, directory: str | Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_files(self, directory: str | Path) -> None:
        if (Path(directory) / TOKENIZER_FILE).exists():
            self.tokenizer = TextTokenizer.load(directory, context_length=self.context_length)


def _check_stream(name: str, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> None:
    B, K = x.shape[:2]
    if x.ndim != 3 or t.shape != (B, K) or mask.shape != (B, K):
        raise VitlabError(
            f"expert {name!r}: features {tuple(x.shape)} need timestamps and a mask of shape {(B, K)}, got "
            f"{tuple(t.shape)} and {tuple(mask.shape)}"
        )


# --- losses ------------------------------------------------------------------------------------------------------
def max_margin_ranking_loss(sims: torch.Tensor, *, margin: float = 0.05) -> torch.Tensor:
    """The bidirectional max-margin ranking loss over a batch's similarities [N, N] (caption i, video j; pairs on
    the diagonal): the mean over i != j of max(0, m - s_ii + s_ij) and max(0, m - s_jj + s_ij), 2 N (N - 1) terms
    (MMT's ``MaxMarginRankingLoss`` with ``fix_norm=True``, margin 0.05 in its configs)."""
    N = _square(sims)
    s = sims.float()
    pos = s.diagonal()
    off = ~torch.eye(N, dtype=torch.bool, device=s.device)
    caption_side = (margin - pos[:, None] + s)[off]  # row i: video j ranked against caption i's own
    video_side = (margin - pos[None, :] + s)[off]  # column j: caption i ranked against video j's own
    return torch.cat([caption_side, video_side]).clamp_min(0).mean()


def infonce_loss(sims: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy over each row and each column of [N, N] similarities / temperature, SUMMED (MMT's
    ``InfoNceLoss``, which has no temperature: 1.0 reproduces it; CLIP-style training divides by ~0.05)."""
    N = _square(sims)
    s = sims.float() / temperature
    target = torch.arange(N, device=s.device)
    return F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)


def _square(sims: torch.Tensor) -> int:
    if sims.ndim != 2 or sims.shape[0] != sims.shape[1] or sims.shape[0] < 2:
        raise VitlabError(
            f"a ranking loss needs the [N, N] similarities of N >= 2 caption-video pairs, got {tuple(sims.shape)}"
        )
    return sims.shape[0]


# --- building ------------------------------------------------------------------------------------------------------
def create_mmt(
    experts: Mapping[str, int],
    *,
    text_model: str = MINILM,
    text_args: dict[str, Any] | None = None,
    tokenizer: TextTokenizer | None = None,
    pretrained_text: bool = True,
    **kwargs: Any,
) -> MMT:
    """An MMT model over ``experts`` (name -> feature width) with a named text tower. all_minilm_l6_v2 loads its
    published weights and its BERT tokenizer (which adds [CLS] and [SEP]) unless ``pretrained_text=False``; the
    [CLS] id is then checked on every caption."""
    args = text_tower_args(text_model, tokenizer=tokenizer, **(text_args or {}))
    init = {"experts": dict(experts), "text_model": text_model, "text_args": args, **kwargs}
    model = build_model(MMT, "mmt", init, {})
    model.default_cfg = {"num_classes": 0, "paper": PAPER}
    loaded = None
    if pretrained_text:
        loaded = load_pretrained_text(text_model, model.text_encoder, context_length=model.context_length)
    model.tokenizer = tokenizer or loaded
    if model.tokenizer is not None and model.text_pool == "cls" and model.cls_token_id is None:
        cls_id = model.tokenizer.tokenizer.token_to_id("[CLS]")
        if cls_id is not None:
            model.cls_token_id = model.init_kwargs["cls_token_id"] = cls_id
    return model
