"""Model families; importing this module registers every variant."""

from vitlab.models import grid_vit, nonlocal_net  # noqa: F401  (registers their variants)
from vitlab.models.vit import VisionTransformer

__all__ = ["VisionTransformer"]
