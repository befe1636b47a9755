"""Model families; importing this module registers every variant."""

from vitlab.models.cvt import ConvolutionalVisionTransformer
from vitlab.models.vit import VisionTransformer

__all__ = ["ConvolutionalVisionTransformer", "VisionTransformer"]
