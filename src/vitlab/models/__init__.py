"""Model families; importing this module registers every variant."""

from vitlab.models.convnext import ConvNeXt
from vitlab.models.resnet import ResNet
from vitlab.models.vit import VisionTransformer

__all__ = ["ConvNeXt", "ResNet", "VisionTransformer"]
