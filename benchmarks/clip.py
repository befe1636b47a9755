"""CLIP on this machine: zero-shot against few-shot, prompts, retrieval, and training speed against HF transformers.

1. Trains a CLIP model per text tower on the built-in caption set (Fashion-MNIST, some classes held out of training
   entirely) with `vitlab clip train`'s loop, or takes --checkpoint.
2. Zero-shot top-1 accuracy on the test split: seen classes, unseen classes, and the generalized setting (every class
   a candidate; accuracy on seen and on unseen images and their harmonic mean), with class names in templates
   against the classes' descriptions as prompts.
3. k-shot logistic-regression probes (k = 1, 2, 4, 8, 16; `vitlab.analysis.probe.few_shot_probe`) on the same image
   tower's features, for the same class groups, and where zero-shot sits on that curve (the k a probe needs to
   match it, interpolated in log k as in the CLIP paper's Figure 7).
4. Image-text retrieval recall@1/5/10 both ways on the test split.
5. Training images/s of vitlab's CLIP against HF ``CLIPModel`` with the same configuration and weights (a HF
   directory loaded with `vitlab.from_pretrained`), fp32 and bf16, alternating in rounds within one run.

    python benchmarks/clip.py --quick                    # under a minute: digits, tiny towers, a few steps
    python benchmarks/clip.py                            # the study (Fashion-MNIST, a time budget per tower)
    python benchmarks/clip.py --checkpoint RUN/checkpoints/best --skip-speed
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import vitlab
from vitlab.analysis.probe import few_shot_probe
from vitlab.data import build_dataset
from vitlab.models.clip import contrastive_loss
from vitlab.train import TrainConfig, train
from vitlab.zeroshot import class_embeddings, class_prompts, embed_images, retrieval, zero_shot_accuracy

SHOTS = (1, 2, 4, 8, 16)
# speed configurations: (image size, patch, vision width, depth, heads, text width, depth, heads, context, batch)
SPEED = {
    "tiny": (32, 8, 64, 2, 2, 64, 2, 2, 16, 16),
    "small": (224, 32, 384, 12, 6, 256, 6, 4, 77, 32),
    "base": (224, 32, 768, 12, 12, 512, 12, 8, 77, 64),  # CLIP ViT-B/32 (151M parameters)
}


def train_runs(a, out: Path) -> dict[str, Path]:
    """Train one CLIP per text tower; returns {tower: best checkpoint}."""
    runs = {}
    for text_model in a.text_models:
        run = out / f"run-{text_model}"
        clip_args = {"embed_dim": a.embed_dim, "lock_text": text_model == "all_minilm_l6_v2"}
        if a.quick:
            clip_args["text_args"] = {"width": 32, "depth": 1, "num_heads": 2, "context_length": 24}
        cfg = TrainConfig(
            model=a.image_model,
            model_args=json.loads(a.image_args),
            text_model=text_model,
            clip_args=clip_args,
            data=a.data,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_epochs=0.2,
            precision=a.precision,
            threads=a.threads,
            out=str(run),
            max_steps=a.max_steps,
            time_budget_s=a.time_budget,
            log_every=max(a.max_steps // 4, 1) if a.max_steps else None,
        )
        t = time.perf_counter()
        summary = train(cfg)
        print(f"trained {text_model}: {summary['steps']} steps in {time.perf_counter() - t:.0f} s -> {run}", flush=True)
        runs[text_model] = run / "checkpoints" / "best"
    return runs


def equivalent_shots(zero_shot: float, curve: dict[str, dict[str, float]]) -> float | None:
    """The k (interpolated in log k) at which the probe's accuracy reaches the zero-shot accuracy; 0 when zero-shot
    beats the 1-shot probe, None when it beats every k measured."""
    ks = [int(k) for k in curve if k != "all"]
    accs = [curve[str(k)]["accuracy"] for k in ks]
    if zero_shot <= accs[0]:
        return 0.0 if zero_shot < accs[0] else float(ks[0])
    for (k0, a0), (k1, a1) in zip(zip(ks, accs), zip(ks[1:], accs[1:])):
        if a0 < zero_shot <= a1:
            f = (zero_shot - a0) / (a1 - a0)
            return math.exp(math.log(k0) + f * (math.log(k1) - math.log(k0)))
    return None


def evaluate(checkpoint: Path, a) -> dict:
    model = vitlab.from_pretrained(checkpoint).eval()
    in_chans, h, w = model.default_cfg["input_size"]
    cap = build_dataset(a.data, img_size=(h, w), in_chans=in_chans)
    info, test = cap.class_captions, cap.test
    unseen = [cap.class_names.index(c) for c in cap.unseen]
    seen = [k for k in range(cap.num_classes) if k not in unseen]
    image_emb = embed_images(model, test)
    labels = test.classes
    result: dict = {"checkpoint": str(checkpoint), "unseen": cap.unseen, "test_images": len(test), "zero_shot": {}}
    for kind in ("names", "descriptions"):
        prompts = class_prompts(info.prompt_names, templates=info.templates, descriptions=info.descriptions, kind=kind)
        with torch.no_grad():
            class_emb = class_embeddings(model, prompts)
        result["zero_shot"][kind] = zero_shot_accuracy(image_emb, labels, class_emb, unseen=unseen)
    result["retrieval"] = retrieval(model, test)

    # k-shot probes on the image tower's features: labelled images from the original training split (unseen classes
    # included: the probe sees k of them, CLIP saw none), tested on the same test images
    base = build_dataset(a.data.removeprefix("captions:").split("?")[0], img_size=(h, w), in_chans=in_chans)
    pool_idx = []
    g = torch.Generator().manual_seed(0)
    for k in range(base.num_classes):
        idx = torch.nonzero(base.train.labels == k).flatten()
        pool_idx.append(idx[torch.randperm(len(idx), generator=g)[: a.pool_per_class]])
    pool_idx = torch.cat(pool_idx).sort().values
    from vitlab.data import InMemoryDataset

    pool = InMemoryDataset(base.train.images[pool_idx], base.train.labels[pool_idx])
    X, y = embed_images(model, pool, features=True).numpy(), pool.labels.numpy()
    Xt, yt = embed_images(model, test, features=True).numpy(), labels.numpy()
    result["few_shot"] = {}
    for group, classes in (("seen", seen), ("unseen", unseen), ("all", list(range(cap.num_classes)))):
        m, mt = np.isin(y, classes), np.isin(yt, classes)
        if len(classes) < 2 or not mt.any():
            continue
        curve = few_shot_probe((X[m], y[m]), (Xt[mt], yt[mt]), shots=a.shots, draws=a.draws)
        zs_key = "accuracy" if group == "all" else group
        result["few_shot"][group] = {
            "probe": curve,
            "zero_shot_equivalent_k": {
                kind: equivalent_shots(result["zero_shot"][kind][zs_key], curve) for kind in ("names", "descriptions")
            },
        }
    return result


def print_eval(name: str, r: dict) -> None:
    print(f"\n== {name}: {r['test_images']} test images, unseen classes {', '.join(r['unseen'])}")
    print(f"{'prompts':13s} {'seen':>6s} {'unseen':>7s} {'gzsl-s':>7s} {'gzsl-u':>7s} {'H':>6s} {'all':>6s}")
    for kind, z in r["zero_shot"].items():
        print(
            f"{kind:13s} {z['seen']:6.3f} {z['unseen']:7.3f} {z['generalized_seen']:7.3f} "
            f"{z['generalized_unseen']:7.3f} {z['harmonic_mean']:6.3f} {z['accuracy']:6.3f}"
        )
    for group, f in r["few_shot"].items():
        ks = "  ".join(f"k={k}: {v['accuracy']:.3f}" for k, v in f["probe"].items())
        eq = ", ".join(f"{kind} ~ k={v:.1f}" if v is not None else f"{kind} > every k"
                       for kind, v in f["zero_shot_equivalent_k"].items())  # fmt: skip
        print(f"probe {group:6s} {ks}   (zero-shot: {eq})")
    for way, by_k in r["retrieval"].items():
        print(f"retrieval {way:14s} " + "  ".join(f"R@{k} {v:.3f}" for k, v in by_k.items()))


# --- speed ------------------------------------------------------------------------------------------------------------
def speed_pair(config: str, directory: Path):
    """HF CLIPModel and vitlab's CLIP with the same configuration and weights."""
    from transformers import CLIPConfig, CLIPModel

    img, patch, vw, vd, vh, tw, td, th, ctx, batch = SPEED[config]
    cfg = CLIPConfig(
        vision_config=dict(image_size=img, patch_size=patch, hidden_size=vw, num_hidden_layers=vd,
                           num_attention_heads=vh, intermediate_size=4 * vw),
        text_config=dict(hidden_size=tw, num_hidden_layers=td, num_attention_heads=th, intermediate_size=4 * tw,
                         max_position_embeddings=ctx),
        projection_dim=512 if config != "tiny" else 64,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"  # HF's fastest attention
    hf = CLIPModel(cfg)
    hf.save_pretrained(directory)
    ours = vitlab.from_pretrained(directory)
    return hf, ours, img, ctx, batch, cfg.text_config.vocab_size, cfg.text_config.eos_token_id


def make_step(model, x, ids, precision: str, device: torch.device):
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    is_hf = not hasattr(model, "encode_text")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with amp:
            if is_hf:
                loss = model(input_ids=ids, pixel_values=x, return_loss=True).loss
            else:
                loss = contrastive_loss(model(x, ids).logits_per_image)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def rate(step, batch: int, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t)


def speed(a, device: torch.device) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf, ours, img, ctx, batch, vocab, eos = speed_pair(a.speed_config, Path(tmp))
        batch = a.speed_batch or batch
        hf.to(device), ours.to(device)
        x = torch.randn(batch, 3, img, img, device=device)
        ids = torch.randint(0, eos - 2, (batch, ctx), device=device)
        ids[:, -1] = eos  # every caption padded to the context, [EOS] last (as HF's processor with max_length)
        for precision in a.precisions:
            steps = {
                "vitlab": make_step(ours, x, ids, precision, device),
                "hf": make_step(hf, x, ids, precision, device),
            }
            for s in steps.values():
                rate(s, batch, 1, device)  # warm-up
            rates: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(a.rounds):
                for k, s in steps.items():
                    rates[k].append(rate(s, batch, a.iters, device))
            med = {k: statistics.median(v) for k, v in rates.items()}
            r = {"config": a.speed_config, "batch": batch, "precision": precision, "device": str(device),
                 "vitlab_img_s": med["vitlab"], "hf_img_s": med["hf"], "ratio": med["vitlab"] / med["hf"]}  # fmt: skip
            print(f"train {a.speed_config} {precision}: vitlab {r['vitlab_img_s']:.1f} img/s, HF {r['hf_img_s']:.1f} "
                  f"img/s, ratio {r['ratio']:.2f}x", flush=True)  # fmt: skip
            results.append(r)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a check that everything runs (under a minute)")
    p.add_argument("--data", default="captions:fashion-mnist", help="a built-in caption set, ?unseen=A,B to choose")
    p.add_argument("--image-model", default="cct_2_3x2_28")
    p.add_argument("--image-args", default="{}", help="JSON overrides of the image model")
    p.add_argument("--text-models", nargs="*", default=["all_minilm_l6_v2", "text_transformer_tiny"])
    p.add_argument("--checkpoint", help="evaluate this CLIP checkpoint instead of training")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="fp32", help="training precision of the study runs")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds of training per text tower")
    p.add_argument("--pool-per-class", type=int, default=200, help="labelled images per class the probes draw from")
    p.add_argument("--shots", type=int, nargs="*", default=list(SHOTS))
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--speed-config", choices=sorted(SPEED), default="small")
    p.add_argument("--speed-batch", type=int)
    p.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], help="of the speed comparison")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/clip-benchmark")
    a = p.parse_args()
    if a.quick:  # tiny everything: checks the pipeline, measures nothing
        tiny_vit = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 8, "patch_size": 4}
        a.data, a.image_model, a.image_args = "captions:digits", "vit_tiny_patch4_28", json.dumps(tiny_vit)
        a.text_models, a.embed_dim, a.batch_size, a.lr = ["text_transformer_tiny"], 16, 32, 3e-3
        a.max_steps, a.time_budget = 10, None
        a.pool_per_class, a.shots, a.draws = 10, [1, 2, 4], 1
        a.speed_config, a.rounds, a.iters = "tiny", 1, 2
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}, {device}")
    results: dict = {"args": vars(a), "evaluation": {}}
    runs = {"checkpoint": Path(a.checkpoint)} if a.checkpoint else train_runs(a, out)
    for name, ckpt in runs.items():
        results["evaluation"][name] = evaluate(ckpt, a)
        print_eval(name, results["evaluation"][name])
    if not a.skip_speed:
        print()
        results["speed"] = speed(a, device)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
