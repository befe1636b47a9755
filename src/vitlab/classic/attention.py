"""Where a soft or hard attention classifier looks (Xu et al., 2015, figures 2-3): its attention over the feature
map's locations drawn on the images.

Works for any model whose attention module sends one query's map [B, 1, 1, L] over the L = H' x W' locations of its
feature map through ``attn_probs`` (`vitlab.models.attention_cnn`): the map is recorded with
`vitlab.layers.record_attention`, upsampled to the image and overlaid; the location hard attention takes at
inference (the argmax) is outlined.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab._plot import pyplot
from vitlab.analysis.run import describe
from vitlab.checkpoint import from_pretrained
from vitlab.data import build_dataset, to_model_input
from vitlab.errors import VitlabError
from vitlab.layers import record_attention


@torch.no_grad()
def plot_attention_locations(
    checkpoint: str | Path, data: str, out: str | Path, *, count: int = 8, data_dir: str | None = None
) -> str:
    """Draw the first ``count`` test images of ``data`` with the checkpoint's attention over locations (top row:
    images and the most attended location; bottom row: the attention map). Writes ``out`` (PNG)."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    model = from_pretrained(checkpoint).eval()
    in_chans, H, W = model.default_cfg["input_size"]
    splits = build_dataset(data, data_dir=data_dir, img_size=(H, W), in_chans=in_chans)
    split = splits.test if splits.test is not None else splits.val
    images, labels = next(split.loader(count, shuffle=False))
    x = to_model_input(images, in_chans=in_chans, img_size=(H, W), mean=model.default_cfg["mean"],
                       std=model.default_cfg["std"])  # fmt: skip
    with record_attention(model) as maps:
        pred = model(x).argmax(-1)
    found = [m for ms in maps.values() for m in ms if m.shape[1:3] == (1, 1)]
    if not found:
        raise VitlabError(f"{model.model_name} has no attention over locations ([B, 1, 1, L] maps) to draw")
    alpha = found[-1][:, 0, 0]  # (B, L)
    side_h = model.forward_features(x[:1]).shape[-2]
    side_w = alpha.shape[-1] // side_h
    alpha = alpha.reshape(-1, 1, side_h, side_w)  # (B, 1, H', W')
    heat = F.interpolate(alpha / alpha.amax((2, 3), keepdim=True), size=(H, W), mode="nearest")[:, 0]
    shown = images.float() / 255
    shown = F.interpolate(shown, size=(H, W), mode="bilinear", align_corners=False)
    names = splits.class_names
    fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.6), squeeze=False)
    for b in range(len(images)):
        img = shown[b, 0] if shown.shape[1] == 1 else shown[b].permute(1, 2, 0)
        axes[0, b].imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
        k = int(alpha[b].flatten().argmax())
        ph, pw = H / side_h, W / side_w
        axes[0, b].add_patch(
            Rectangle(((k % side_w) * pw - 0.5, (k // side_w) * ph - 0.5), pw, ph, fill=False, ec="r", lw=1.5)
        )
        axes[0, b].set_title(f"{names[int(pred[b])]}\n(true {names[int(labels[b])]})", fontsize=7)
        axes[1, b].imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, b].imshow(heat[b].numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1)
        for ax in axes[:, b]:
            ax.set_xticks([])
            ax.set_yticks([])
    where = f"attention over {side_h}x{side_w} locations (box: the most attended)"
    fig.suptitle(f"{describe(checkpoint, width=100)}\n{where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return str(out)
