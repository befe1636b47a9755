"""Building blocks shared by every vitlab model. Model files import these; they never re-declare them."""

from vitlab.layers.attention import (
    Attention,
    AttentionBase,
    CrossAttention,
    attention_modules,
    explicit_attention,
    record_attention,
    set_fused_attn,
)
from vitlab.layers.block import Block, get_act_layer, low_precision_inference
from vitlab.layers.conv_attention import ConvAttention, ConvProjection
from vitlab.layers.conv_embed import ConvEmbed
from vitlab.layers.drop import DropPath, drop_path
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp
from vitlab.layers.patch_embed import PatchEmbed, to_2tuple
from vitlab.layers.pos_embed import resample_pos_embed, sincos_pos_embed_1d, sincos_pos_embed_2d

__all__ = [
    "Attention",
    "AttentionBase",
    "Block",
    "ConvAttention",
    "ConvEmbed",
    "ConvProjection",
    "CrossAttention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "attention_modules",
    "drop_path",
    "explicit_attention",
    "get_act_layer",
    "low_precision_inference",
    "record_attention",
    "resample_pos_embed",
    "set_fused_attn",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "to_2tuple",
]
