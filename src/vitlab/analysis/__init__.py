"""Looking inside models: attention maps and rollout, attention distance, position-embedding similarity,
effective receptive fields, open-set scores and probes. Library functions first; `vitlab explain`, `inspect`,
`erf`, `openset` and `probe` are thin commands over them."""

from vitlab.analysis.attention import attention_maps, attention_rollout
from vitlab.analysis.distance import (
    mean_attention_distance,
    neighbour_contrast,
    patch_distances,
    pos_embed_similarity,
    reference_similarities,
)
from vitlab.analysis.erf import ErfResult, conv_stack, effective_receptive_field
from vitlab.analysis.openset import auroc, fpr_at_tpr, openset_scores, random_known_splits
from vitlab.analysis.probe import extract_features, few_shot_probe

__all__ = [
    "ErfResult",
    "attention_maps",
    "attention_rollout",
    "auroc",
    "conv_stack",
    "effective_receptive_field",
    "extract_features",
    "few_shot_probe",
    "fpr_at_tpr",
    "mean_attention_distance",
    "neighbour_contrast",
    "openset_scores",
    "patch_distances",
    "pos_embed_similarity",
    "random_known_splits",
    "reference_similarities",
]
