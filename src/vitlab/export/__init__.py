"""Exporting trained models to other runtimes and libraries: ONNX (`export_onnx`) and inference on it
(`OnnxClassifier`); HF transformers and timm layouts (`export_hf`, `export_timm`)."""

from vitlab.export.layouts import export_hf, export_timm
from vitlab.export.onnx import OnnxClassifier, default_onnx_path, export_onnx, onnx_metadata, resolve_onnx

__all__ = [
    "OnnxClassifier",
    "default_onnx_path",
    "export_hf",
    "export_onnx",
    "export_timm",
    "onnx_metadata",
    "resolve_onnx",
]
