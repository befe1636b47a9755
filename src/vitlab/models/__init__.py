"""Model families; importing this module registers every variant."""

from vitlab.models.cct import CCT
from vitlab.models.vit import VisionTransformer
from vitlab.models.vit_hybrid import HybridVisionTransformer

__all__ = ["CCT", "HybridVisionTransformer", "VisionTransformer"]
