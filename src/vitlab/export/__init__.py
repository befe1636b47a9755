"""Exporting trained models to other runtimes: ONNX (`export_onnx`) and inference on it (`OnnxClassifier`)."""

from vitlab.export.onnx import OnnxClassifier, default_onnx_path, export_onnx, onnx_metadata, resolve_onnx

__all__ = ["OnnxClassifier", "default_onnx_path", "export_onnx", "onnx_metadata", "resolve_onnx"]
