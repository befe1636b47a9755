from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import vitlab
from vitlab._registry import get_variant


def _tiny_vit(kwargs: dict[str, Any]) -> dict[str, Any]:
    p = kwargs["patch_size"]
    return {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 2 * p, "num_classes": 5}


def _tiny_swin(kwargs: dict[str, Any]) -> dict[str, Any]:
    # two stages of a W-MSA and an SW-MSA block; a first map of 2 windows + 1 patch is padded, shifted and masked in
    # both stages (the second map is window + 1)
    size = kwargs["patch_size"] * (2 * kwargs["window_size"] + 1)
    return {"embed_dim": 8, "depths": (2, 2), "num_heads": (1, 2), "img_size": size, "num_classes": 5}


def _tiny_resnet(kwargs: dict[str, Any]) -> dict[str, Any]:
    tiny = {"layers": (1, 1), "channels": (4, 8), "stem_width": 8, "num_classes": 5}
    if kwargs.get("insert_after"):  # inserted modules (non-local blocks): one, in the second of the two stages
        tiny["insert_after"] = [[], [0]]
    return tiny


def _tiny_convnext(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"depths": (1, 1), "dims": (8, 16), "num_classes": 5}


def _tiny_cct(kwargs: dict[str, Any]) -> dict[str, Any]:
    reduction = (kwargs["stride"] * 2) ** kwargs["n_conv_layers"]  # each tokenizer layer: conv, then 3x3 / 2 max-pool
    return {"embed_dim": 32, "depth": 2, "num_heads": 2, "conv_width": 8, "img_size": 4 * reduction, "num_classes": 5}


def _tiny_vit_hybrid(kwargs: dict[str, Any]) -> dict[str, Any]:
    stages = len(kwargs["backbone_layers"])  # keep the number of stages, hence the stride
    return {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "backbone_layers": (1,) * stages,
        "backbone_widths": tuple(16 * 2**i for i in range(stages)),
        "backbone_stem_width": 8,
        "backbone_groups": 4,
        "img_size": 2 * 4 * 2 ** (stages - 1),
        "num_classes": 5,
    }


def _tiny_cvt(kwargs: dict[str, Any]) -> dict[str, Any]:
    stride = math.prod(kwargs.get("patch_stride", (4, 2, 2)))  # 2x2 tokens at the last stage
    # With class-token pooling the last block's patch-token queries (its conv_proj_q) never reach the logits, in
    # the paper's model as in HF's; average pooling of the patch tokens keeps every parameter on the gradient path.
    return {
        "embed_dim": (8, 16, 32),
        "depth": (1, 1, 2),
        "num_heads": (1, 2, 2),
        "img_size": 2 * stride,
        "num_classes": 5,
        "global_pool": "avg",
    }


def _tiny_attention_cnn(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"widths": (4, 8, 8), "attn_dim": 8, "num_classes": 5}


# Overrides that shrink any registered model to a few thousand parameters, keeping its structure (patch size,
# channels, pooling). Keyed by architecture: a new family adds one entry, a function of the variant's kwargs.
TINY: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "vit": _tiny_vit,
    "cait": _tiny_vit,  # plus its 2 class-attention layers
    "cpvt": lambda kw: {**_tiny_vit(kw), "img_size": 3 * kw["patch_size"]},  # a 3x3 grid: PEG sees a centre
    "swin": _tiny_swin,
    "deit": _tiny_vit,
    "resnet": _tiny_resnet,
    "convnext": _tiny_convnext,
    "cct": _tiny_cct,
    "vit_hybrid": _tiny_vit_hybrid,
    "vit_small_data": _tiny_vit,  # the tokenizer (patch, SPT, conv stem) and LSA kept
    "cvt": _tiny_cvt,
    # 16 pixels: the last stage's 4x4 map sub-samples to 2x2 keys (a single key would leave theta and phi no gradient)
    "nonlocal_cnn": lambda kw: {"widths": (8, 16, 16), "depths": (1, 2, 2), "img_size": 16, "num_classes": 5},
    "grid_vit": lambda kw: {
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "img_size": 4 * kw["patch_size"],  # a 4x4 grid: a 3x3 neighbourhood meets the border everywhere but one
        "kernel_size": 3,
        "num_classes": 5,
    },
    "attention_cnn": _tiny_attention_cnn,
}


def tiny_overrides(name: str) -> dict[str, Any]:
    cls, kwargs, _ = get_variant(name)
    if cls.arch not in TINY:
        raise KeyError(f"add tiny overrides for architecture {cls.arch!r} to tests/conftest.py")
    return TINY[cls.arch](kwargs)


def tiny_model(name: str, **extra: Any) -> torch.nn.Module:
    return vitlab.create_model(name, **{**tiny_overrides(name), **extra})


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.default_cfg["input_size"])


def hf_parity(hf: torch.nn.Module, case: tuple, tmp_path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, Any]:
    """Save the HF model, load it into vitlab and run both on a batch ``x`` of 3 images of ``case`` (size, _,
    channels): (our model, x, our logits, HF's output)."""
    hf.save_pretrained(tmp_path)
    ours = vitlab.from_pretrained(tmp_path)
    size = case[0] if isinstance(case[0], tuple | list) else (case[0], case[0])
    x = torch.randn(3, case[2], *size)
    with torch.no_grad():
        return ours, x, ours(x), hf(pixel_values=x)


def assert_hf_classifier_parity(hf: torch.nn.Module, case: tuple, tmp_path) -> None:
    """vitlab loads the saved HF classifier and gives its logits, with its class names."""
    ours, _, got, out = hf_parity(hf, case, tmp_path)
    assert out.logits.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=1e-4)
    assert ours.pretrained_cfg["class_names"] == [f"class{i}" for i in range(7)]


@torch.no_grad()
def move_off_init(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter and floating buffer (BatchNorm statistics included): zero-initialised
    classifiers, LayerScale and identity-at-init branches would otherwise hide mapping and gradient errors."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(b.abs() + 0.5 if name.endswith("running_var") else b + torch.randn_like(b) * std)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread and lose much on a busy machine (3-10x here): a module that
    trains them asks for this with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (module scope, so that its
    module-scoped training fixtures run on one thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _folder_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Folders decoded into memory are cached under the session's temporary directory, not the user's cache (torchrun
    workers inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITLAB_FOLDER_CACHE", str(tmp_path_factory.mktemp("folder-cache")))
        yield


def fit_one_batch(model: torch.nn.Module, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """Losses of ``steps`` AdamW steps on one fixed batch of 16 images, five classes, each class a random template
    plus noise: a model that trains brings the loss well below its starting ln 5."""
    _, s_h, s_w = model.default_cfg["input_size"]
    c = model.default_cfg["input_size"][0]
    y = torch.arange(16) % 5
    x = torch.randn(5, c, s_h, s_w)[y] + 0.5 * torch.randn(16, c, s_h, s_w)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_on_digits(
    model: torch.nn.Module, *, steps: int = 150, lr: float = 5e-3, sam_rho: float | None = None
) -> tuple[list[float], float]:
    """Losses of ``steps`` AdamW steps (wrapped in SAM with ``sam_rho``) on random batches of 64 of the first 1,200
    8x8 digits (scikit-learn's, no download), and the accuracy on the other 597: a model that learns ends well
    below the starting loss ln 10 and well above 10% (tiny ViTs reach 40-85% in 150 steps, one to two seconds)."""
    from sklearn.datasets import load_digits

    from vitlab.train.sam import SAM

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # (1797, 1, 8, 8) in [-1, 1]
    y = torch.tensor(digits.target)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sam = SAM(opt, rho=sam_rho) if sam_rho else None
    batches = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread and loses much on a busy machine
    try:
        for _ in range(steps):
            i = torch.randint(0, 1200, (64,), generator=batches)

            def loss_at_weights(i: torch.Tensor = i) -> torch.Tensor:
                loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
                loss.backward()
                return loss

            losses.append(loss_at_weights().item())
            if sam is not None:
                sam.step(loss_at_weights)  # a second pass, at the perturbed weights
            else:
                opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1200:]).argmax(-1) == y[1200:]).float().mean().item()
    return losses, accuracy


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A tiny ViT trained on digits for one epoch through the CLI, as a user makes one (for export and serving)."""
    import json

    from click.testing import CliRunner

    from vitlab.cli import cli

    run = tmp_path_factory.mktemp("digits-run")
    model_args = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})
    args = ["train", "--data", "digits", "--model", "vit_tiny_patch7_28", "--epochs", "1", "--precision", "fp32"]
    r = CliRunner().invoke(cli, [*args, "--set", f"model_args={model_args}", "--out", str(run)])
    assert r.exit_code == 0, r.output
    return run / "checkpoints" / "best"
