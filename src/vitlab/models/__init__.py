"""Model families; importing this module registers every variant."""

from vitlab.models.deit import VisionTransformerDistilled
from vitlab.models.vit import VisionTransformer

__all__ = ["VisionTransformer", "VisionTransformerDistilled"]
