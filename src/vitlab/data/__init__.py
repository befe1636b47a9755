"""Datasets, batch order and augmentation for training.

`build_dataset(name)` returns `DatasetSplits`; each split's ``loader`` yields uint8 batches in an order fixed by
``(seed, epoch)``, sharded across ranks so that resuming and changing the process count leave the data unchanged.
On the training device a batch becomes model input in two steps with augmentation between them:
``normalize(augment(to_float(x, in_chans, img_size)), mean, std)``, or `to_model_input` without augmentation.
"""

from vitlab.data.augment import build_augment, mixup_cutmix
from vitlab.data.base import DatasetSplits, InMemoryDataset
from vitlab.data.folder import FolderDataset
from vitlab.data.sources import DATASET_NAMES, build_dataset
from vitlab.data.subset import limit_images, parse_classes, subset_classes
from vitlab.data.transforms import normalize, to_float, to_model_input

__all__ = [
    "DATASET_NAMES",
    "DatasetSplits",
    "FolderDataset",
    "InMemoryDataset",
    "build_augment",
    "build_dataset",
    "limit_images",
    "mixup_cutmix",
    "normalize",
    "parse_classes",
    "subset_classes",
    "to_float",
    "to_model_input",
]
