"""Training data: folder layouts, checks, preprocessing and the torch Dataset."""

from spade.data.dataset import SegmentationDataset, build_dataset, check_samples
from spade.data.layouts import Sample, find_pairs

__all__ = ["Sample", "SegmentationDataset", "build_dataset", "check_samples", "find_pairs"]
