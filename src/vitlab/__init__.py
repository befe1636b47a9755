"""vitlab: train, compare and understand Vision Transformers."""

from vitlab._registry import create_model, list_models, register_model
from vitlab.checkpoint import from_pretrained, save_pretrained
from vitlab.errors import VitlabError

__version__ = "0.1.0"

__all__ = [
    "VitlabError",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
    "register_model",
    "save_pretrained",
]
