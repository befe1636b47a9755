"""Model families; importing this module registers every variant."""

from vitlab.models.attention_cnn import AttentionCNN
from vitlab.models.cait import CaiT
from vitlab.models.caption import CaptionModel
from vitlab.models.cct import CCT
from vitlab.models.clip import CLIP
from vitlab.models.convnext import ConvNeXt
from vitlab.models.cpvt import CPVT
from vitlab.models.cvt import ConvolutionalVisionTransformer
from vitlab.models.deit import VisionTransformerDistilled
from vitlab.models.grid_vit import GridVisionTransformer
from vitlab.models.lseg import DPTSegmenter, LSeg
from vitlab.models.mmt import MMT
from vitlab.models.nonlocal_net import NonLocalNet
from vitlab.models.resnet import ResNet
from vitlab.models.swin import SwinTransformer
from vitlab.models.vit import VisionTransformer
from vitlab.models.vit_hybrid import HybridVisionTransformer
from vitlab.models.vit_small_data import SmallDataVisionTransformer

__all__ = [
    "CCT",
    "CLIP",
    "CPVT",
    "MMT",
    "AttentionCNN",
    "CaiT",
    "CaptionModel",
    "ConvNeXt",
    "ConvolutionalVisionTransformer",
    "DPTSegmenter",
    "GridVisionTransformer",
    "HybridVisionTransformer",
    "LSeg",
    "NonLocalNet",
    "ResNet",
    "SmallDataVisionTransformer",
    "SwinTransformer",
    "VisionTransformer",
    "VisionTransformerDistilled",
]
