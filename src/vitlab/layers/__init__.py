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
from vitlab.layers.axial import AxialAttention, AxialAttention2d
from vitlab.layers.block import Block, QuickGELU, block_stack, get_act_layer, low_precision_inference
from vitlab.layers.conv_attention import ConvAttention, ConvProjection
from vitlab.layers.conv_embed import ConvEmbed
from vitlab.layers.conv_stem import ConvStem
from vitlab.layers.drop import DropPath, drop_path, drop_path_rates
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.local_attention import LocalSelfAttention
from vitlab.layers.lsa import LocalitySelfAttention
from vitlab.layers.mimetic import mimetic_init_
from vitlab.layers.mlp import Mlp
from vitlab.layers.non_local import NonLocalBlock
from vitlab.layers.norm import LayerNorm2d
from vitlab.layers.padding import MaxPool2dSame, pad_same
from vitlab.layers.patch_embed import PatchEmbed, check_image, map_to_tokens, to_2tuple
from vitlab.layers.peg import PEG
from vitlab.layers.pos_embed import resample_pos_embed, sincos_pos_embed_1d, sincos_pos_embed_2d
from vitlab.layers.spt import ShiftedPatchTokenization, shifted_copies
from vitlab.layers.std_conv import StdConv2d
from vitlab.layers.weight_init import no_weight_decay_names, trunc_normal_init, zero_init
from vitlab.layers.window import (
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "PEG",
    "Attention",
    "AttentionBase",
    "AxialAttention",
    "AxialAttention2d",
    "Block",
    "ConvAttention",
    "ConvEmbed",
    "ConvProjection",
    "ConvStem",
    "CrossAttention",
    "DropPath",
    "LayerNorm2d",
    "LayerScale",
    "LocalSelfAttention",
    "LocalitySelfAttention",
    "MaxPool2dSame",
    "Mlp",
    "NonLocalBlock",
    "PatchEmbed",
    "QuickGELU",
    "ShiftedPatchTokenization",
    "StdConv2d",
    "WindowAttention",
    "attention_modules",
    "block_stack",
    "check_image",
    "drop_path",
    "drop_path_rates",
    "explicit_attention",
    "get_act_layer",
    "low_precision_inference",
    "map_to_tokens",
    "mimetic_init_",
    "no_weight_decay_names",
    "pad_same",
    "record_attention",
    "relative_position_index",
    "resample_pos_embed",
    "set_fused_attn",
    "shifted_copies",
    "shifted_window_mask",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "to_2tuple",
    "trunc_normal_init",
    "window_partition",
    "window_reverse",
    "zero_init",
]
