"""Training, evaluation and prediction workflows. The models and layers never import from here."""

from vitlab.train.config import TrainConfig
from vitlab.train.evaluate import evaluate
from vitlab.train.trainer import train

__all__ = ["TrainConfig", "evaluate", "train"]
