"""vitlab: train, compare and understand Vision Transformers."""

from vitlab import models  # noqa: F401  (registers every family: the registry itself imports none)
from vitlab._registry import list_models, register_model
from vitlab._version import __version__
from vitlab.checkpoint import from_pretrained, save_pretrained
from vitlab.errors import VitlabError
from vitlab.factory import create_model

__all__ = [
    "VitlabError",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
    "register_model",
    "save_pretrained",
]
