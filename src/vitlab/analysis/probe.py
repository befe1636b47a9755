"""Linear probes and few-shot probes on frozen features.

A logistic-regression classifier on a frozen network's features measures what the features hold (Alain & Bengio,
"Understanding intermediate layers using linear classifier probes", 2016); with k labelled images per class it is
the few-shot baseline the CLIP paper compares zero-shot transfer against (Radford et al., 2021, section 3.1.5).
Features are the pre-logits ``forward_head(x, pre_logits=True)`` or any intermediate block through
`forward_intermediates` (tokens averaged, maps pooled).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from vitlab.data import to_model_input


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset, *, layer: int | None = None, batch_size: int = 256, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D], labels [N])`` of a dataset split, with the model's own input size and normalisation."""
    model.eval()
    in_chans, h, w = model.default_cfg["input_size"]
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]
    feats, labels = [], []
    seen = 0
    for images, y in dataset.loader(batch_size, shuffle=False):
        x = to_model_input(images, in_chans=in_chans, img_size=(h, w), mean=mean, std=std)
        if layer is None:
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            f = model.forward_intermediates(x, indices=[layer], intermediates_only=True)[0]
            f = f.mean(dim=(2, 3)) if f.ndim == 4 else f.mean(dim=1)
        feats.append(f.float())
        labels.append(y)
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    X = torch.cat(feats)[:limit].numpy()
    return X, torch.cat(labels)[:limit].numpy()


def few_shot_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    shots: Sequence[int | str] = (1, 2, 4, 8, 16, "all"),
    draws: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Test accuracy of a logistic-regression probe trained on k images per class, for each k, as mean and std
    over ``draws`` random draws of the k images (one draw for "all")."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = train
    Xt, yt = test
    scaler = StandardScaler().fit(X)
    X, Xt = scaler.transform(X), scaler.transform(Xt)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    out: dict[str, dict[str, float]] = {}
    for k in shots:
        accs = []
        for _ in range(1 if k == "all" else draws):
            if k == "all":
                idx = np.arange(len(y))
            else:
                idx = np.concatenate(
                    [
                        rng.choice(np.flatnonzero(y == c), size=min(int(k), int((y == c).sum())), replace=False)
                        for c in classes
                    ]
                )
            clf = LogisticRegression(C=C, max_iter=1000)
            clf.fit(X[idx], y[idx])
            accs.append(float((clf.predict(Xt) == yt).mean()))
        out[str(k)] = {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "draws": len(accs)}
    return out
