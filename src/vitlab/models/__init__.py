"""Model families; importing this module registers every variant."""

from vitlab.models.swin import SwinTransformer
from vitlab.models.vit import VisionTransformer

__all__ = ["SwinTransformer", "VisionTransformer"]
