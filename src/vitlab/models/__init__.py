"""Model families; importing this module registers every variant."""

from vitlab.models.attention_cnn import AttentionCNN
from vitlab.models.vit import VisionTransformer

__all__ = ["AttentionCNN", "VisionTransformer"]
