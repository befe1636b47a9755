"""ONNX export of any vitlab model, and inference with onnxruntime.

`export_onnx` traces the model with ``torch.export`` (``torch.onnx.export(..., dynamo=True)``) on its explicit
attention path, with a dynamic batch axis and a fixed image size, writes the ONNX file with the checkpoint's class
names and normalisation in its ``metadata_props``, then runs the file in onnxruntime at two batch sizes and
compares the logits with eager PyTorch. The file is written beside its destination under a temporary name and
moved into place (`os.replace`) only once it matches to ``atol``: an export that fails leaves the previous file,
if any, as it was, and the failed one under ``NAME.failed.onnx`` for inspection.

The graph takes normalised float32 pixels ``[B, C, H, W]`` (``(pixel / 255 - mean) / std``, the metadata's mean
and std) named ``pixel_values`` and returns the logits ``[B, num_classes]`` named ``logits``. `OnnxClassifier` reads
such a file back with its metadata; `vitlab predict --runtime onnx` and `vitlab serve --runtime onnx` use it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab.errors import VitlabError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
ONNX_NAME = "model.onnx"  # the file `vitlab export` writes into a checkpoint directory
PARITY_BATCHES = (1, 3)  # 1 and a batch other than the traced one, so the dynamic axis is exercised
TRACE_BATCH = 2  # torch.export specialises a dimension it sees as 1, so the example batch is not 1


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitlabError(f"ONNX export and inference need {module}: pip install 'vitlab[serve]'") from None


def default_onnx_path(checkpoint: str | os.PathLike) -> Path:
    """Where `vitlab export` writes by default: ``DIR/model.onnx`` for a checkpoint directory, ``NAME.onnx``
    beside a checkpoint file."""
    path = Path(checkpoint)
    return path / ONNX_NAME if path.is_dir() else path.with_suffix(".onnx")


def onnx_metadata(model: nn.Module, *, source: str = "") -> dict[str, str]:
    """What a runtime needs besides the graph, as ONNX ``metadata_props`` (strings; lists as JSON)."""
    from vitlab import __version__

    cfg, pcfg = model.default_cfg, getattr(model, "pretrained_cfg", {})
    names = pcfg.get("class_names") or [str(i) for i in range(model.num_classes)]
    return {
        "vitlab_version": __version__,
        "model_name": str(getattr(model, "model_name", type(model).__name__)),
        "architecture": str(getattr(model, "arch", "")),
        "input_size": json.dumps([int(v) for v in cfg["input_size"]]),
        "mean": json.dumps([float(v) for v in pcfg.get("mean", cfg["mean"])]),
        "std": json.dumps([float(v) for v in pcfg.get("std", cfg["std"])]),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "class_names": json.dumps(list(names)),
        "input": f"{INPUT_NAME}: float32 [batch, C, H, W], (pixel / 255 - mean) / std per channel",
        "output": f"{OUTPUT_NAME}: float32 [batch, num_classes]",
        "source": source,
    }


def export_onnx(
    model: nn.Module | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` (a module, or anything `from_pretrained` reads) to ONNX at ``out`` and check it.

    Returns ``{"path", "opset", "max_abs_diff", "batches"}``. Raises `VitlabError` when the exporter cannot
    express the model or when onnxruntime's logits differ from eager PyTorch by more than ``atol``.
    """
    _need("onnxscript")
    source = ""
    if not isinstance(model, nn.Module):
        from vitlab.checkpoint import HUB_PREFIX, from_pretrained

        # a Hub address as it is; a local checkpoint by its name, never its path on this machine
        source = str(model) if str(model).startswith(HUB_PREFIX) else Path(model).name
        out = out if out is not None else default_onnx_path(model)
        model = from_pretrained(model)
    if out is None:
        raise VitlabError("export_onnx needs an output path for a model given as a module")
    if getattr(model, "num_classes", 0) <= 0:
        raise VitlabError("the model has no classifier (num_classes=0); export a model with a head")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    shape = tuple(int(v) for v in model.default_cfg["input_size"])
    program = _trace(model, shape, opset)
    program.model.metadata_props.update(onnx_metadata(model, source=source))
    # Written under out's own name in a temporary directory beside it: an external data file (weights over 2 GB)
    # is named after the graph file and referenced by that name, so the two move into place unchanged.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        program.save(str(staged))
        try:
            diff = _parity(model, staged, shape)
        except Exception:
            _keep_failed(staged, out)
            raise
        if not diff <= atol:  # also catches NaN
            failed = _keep_failed(staged, out)
            raise VitlabError(
                f"the ONNX graph's logits differ from PyTorch's by {diff:.3g} (> {atol:g}); {out} was not written "
                f"(the failed graph is {failed}). Try another --opset, or pass --atol if the difference is rounding "
                "in a large model"
            )
        _move_into_place(staged, out)
    opsets = {d: v for d, v in program.model.opset_imports.items() if d in ("", "ai.onnx")}
    return {"path": str(out), "opset": next(iter(opsets.values()), None), "max_abs_diff": diff}


def _data_file(path: Path) -> Path:
    """Where ONNX puts the weights of a graph over 2 GB: beside it, named after it."""
    return path.with_name(path.name + ".data")


def _move_into_place(staged: Path, out: Path) -> None:
    """Replace ``out`` (and its data file) by the checked ``staged`` graph, each file in one rename."""
    if _data_file(staged).exists():  # the weights, then the graph that reads them
        os.replace(_data_file(staged), _data_file(out))
        os.replace(staged, out)
    else:
        os.replace(staged, out)
        _data_file(out).unlink(missing_ok=True)  # an older export's weights, which the new graph does not read


def _keep_failed(staged: Path, out: Path) -> str:
    """Keep a graph that failed its check as ``NAME.failed.onnx`` beside ``out``, which stays untouched; a graph
    with a data file (over 2 GB, its data file's name written inside it) is removed instead."""
    if _data_file(staged).exists():
        return "removed"
    failed = out.with_name(f"{out.stem}.failed.onnx")
    os.replace(staged, failed)
    return f"kept as {failed}"


def _trace(model: nn.Module, shape: tuple[int, ...], opset: int | None):
    from vitlab.layers import explicit_attention

    x = torch.randn(TRACE_BATCH, *shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The explicit path (matmul, softmax, matmul) is what every exporter and runtime expresses; torch's
    # decomposition of the fused SDPA kernel with an additive mask fails on a symbolic batch (Swin's windows).
    # onnxruntime's graph optimiser fuses the pattern again, and the parity check below compares with the
    # model's default path.
    with explicit_attention(model), warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript"):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; the first line names the operator
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VitlabError(
                f"ONNX cannot express {getattr(model, 'model_name', type(model).__name__)}: {type(e).__name__}: "
                f"{first} (docs/export.md lists the models that do not export)"
            ) from e


class _quiet:
    """Lower the named loggers to ERROR inside the block (the exporter reports each step at INFO / WARNING)."""

    def __init__(self, *names: str) -> None:
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self) -> None:
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


@torch.no_grad()
def _parity(model: nn.Module, path: Path, shape: tuple[int, ...]) -> float:
    """Largest absolute logit difference between onnxruntime and eager PyTorch over `PARITY_BATCHES`."""
    session = _session(path)
    g = torch.Generator().manual_seed(0)
    diff = 0.0
    for b in PARITY_BATCHES:
        x = torch.randn(b, *shape, generator=g)
        ref = model(x).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise VitlabError(f"the ONNX graph returns {got.shape} at batch {b}, PyTorch {ref.shape}")
        diff = max(diff, float(np.abs(got - ref).max()))
    return diff


def _session(path: str | os.PathLike, threads: int | None = None):
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlabError(f"onnxruntime cannot load {path}: {first}") from None


class OnnxClassifier:
    """An exported vitlab model in onnxruntime: ``logits(x)`` on normalised ``[B, C, H, W]`` input, with the
    metadata `export_onnx` recorded (``model_name``, ``class_names``, ``input_size``, ``mean``, ``std``)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"ONNX file {str(path)!r} does not exist; write it with `vitlab export CHECKPOINT`")
        self.path = path
        self.session = _session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "input_size" not in meta or "class_names" not in meta:
            raise VitlabError(f"{path} was not written by `vitlab export`: its metadata has no input_size/class_names")
        self.metadata = dict(meta)
        self.model_name = meta.get("model_name", path.stem)
        self.input_size = tuple(json.loads(meta["input_size"]))
        self.mean = tuple(json.loads(meta["mean"]))
        self.std = tuple(json.loads(meta["std"]))
        self.class_names = list(json.loads(meta["class_names"]))

    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        array = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(array)})[0])


def resolve_onnx(checkpoint: str | os.PathLike) -> Path:
    """The ONNX file for ``checkpoint``: the file itself when it is one, else where `vitlab export` writes."""
    path = Path(checkpoint)
    if path.suffix == ".onnx":
        return path
    onnx_path = default_onnx_path(path)
    if not onnx_path.exists():
        raise VitlabError(
            f"no ONNX export of {checkpoint} at {onnx_path}; run `vitlab export {checkpoint} --format onnx` first"
        )
    return onnx_path
