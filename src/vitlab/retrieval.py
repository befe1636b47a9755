"""What ``vitlab retrieval eval`` calls: score an MMT checkpoint on its run's held-out clips, MMT's way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitlab._io import write_json
from vitlab.errors import VitlabError

METRICS_NAME = "retrieval_metrics.json"


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """R@1/5/10, median and mean rank, text-to-video and video-to-text (`vitlab.metrics.retrieval_metrics`), of
    ``checkpoint`` on its run's held-out ``split`` (checked against RUN/split.json); written to
    ``CHECKPOINT/eval-{split}/retrieval_metrics.json`` (as every `eval` writes, so best and last keep their own)."""
    from vitlab.checkpoint import from_pretrained
    from vitlab.data.clips import VideoSplits
    from vitlab.data.manifest import held_out_split, run_dir_of
    from vitlab.models.mmt import MMT
    from vitlab.train.retrieval import evaluate_retrieval

    model = from_pretrained(checkpoint, map_location="cpu").eval()
    if not isinstance(model, MMT):
        raise VitlabError(f"{checkpoint} is not an MMT model; train one with `vitlab retrieval train`")
    path = Path(checkpoint)
    train_cfg = json.loads((path / "config.json").read_text()).get("train_config", {}) if path.is_dir() else {}
    run_dir = run_dir_of(checkpoint)
    splits, dataset, checked = held_out_split(run_dir, train_cfg, split=split, data=data, data_dir=data_dir,
                                              allow_changed_data=allow_changed_data)  # fmt: skip
    if not isinstance(splits, VideoSplits):
        raise VitlabError(f"{splits.name} holds no clips: evaluate on clips:... or videofeatures:DIR")
    if len(dataset) < 2:
        raise VitlabError(f"the {split} split of {splits.name} has {len(dataset)} clip: retrieval needs two or more")
    loss_args = {k: v for k, v in train_cfg.get("model_args", {}).items() if k in ("loss", "margin")}
    r = evaluate_retrieval(model, dataset, batch_size=batch_size, loss_args=loss_args)
    result = {"checkpoint": str(checkpoint), "data": splits.name, "split": split, "count": r["count"],
              "checked": checked, **r["report"]}  # fmt: skip
    out = (path if path.is_dir() else path.parent) / f"eval-{split}" / METRICS_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return {**result, "path": str(out)}
