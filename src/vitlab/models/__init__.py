"""Model families; importing this module registers every variant."""

from vitlab.models.cait import CaiT
from vitlab.models.convnext import ConvNeXt
from vitlab.models.cpvt import CPVT
from vitlab.models.deit import VisionTransformerDistilled
from vitlab.models.resnet import ResNet
from vitlab.models.swin import SwinTransformer
from vitlab.models.vit import VisionTransformer

__all__ = ["CPVT", "CaiT", "ConvNeXt", "ResNet", "SwinTransformer", "VisionTransformer", "VisionTransformerDistilled"]
