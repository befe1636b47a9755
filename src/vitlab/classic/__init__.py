"""The classical ideas that self-attention is explained by, as working tools: non-local means denoising and its
reading as attention over a search window (`nl_means`, `nl_means_attention`), and the bag-of-visual-words + SVM
classifier (`train_bow`, `evaluate_bow`), and the drawing of where soft / hard attention classifiers look
(`plot_attention_locations`)."""

from vitlab.classic.attention import plot_attention_locations
from vitlab.classic.bow import BowConfig, evaluate_bow, train_bow
from vitlab.classic.bridge import nl_means_attention, plot_nl_means_bridge
from vitlab.classic.nl_means import (
    add_noise,
    denoise_file,
    nl_means,
    nl_means_weights,
    patch_kernel,
    plot_nl_means_weights,
)

__all__ = [
    "BowConfig",
    "add_noise",
    "denoise_file",
    "evaluate_bow",
    "nl_means",
    "nl_means_attention",
    "nl_means_weights",
    "patch_kernel",
    "plot_attention_locations",
    "plot_nl_means_bridge",
    "plot_nl_means_weights",
    "train_bow",
]
