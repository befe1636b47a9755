"""Serving a trained model over HTTP: `vitlab serve` (FastAPI on uvicorn), with micro-batching, a web page and
attention-rollout explanations. See docs/serving.md."""

from vitlab.serve.app import ServeConfig, create_app, load_app, run_server
from vitlab.serve.batching import MicroBatcher

__all__ = ["MicroBatcher", "ServeConfig", "create_app", "load_app", "run_server"]
