"""Training data: folder layouts, checks, preprocessing and the torch Dataset.

The names below are imported on first use (PEP 562), so that light submodules such as
spade.data.fetch and spade.data.flickr can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spade.data.dataset import SegmentationDataset, build_dataset, check_samples
    from spade.data.layouts import Sample, find_pairs

__all__ = ["Sample", "SegmentationDataset", "build_dataset", "check_samples", "find_pairs"]
_WHERE = {
    "SegmentationDataset": "spade.data.dataset",
    "build_dataset": "spade.data.dataset",
    "check_samples": "spade.data.dataset",
    "Sample": "spade.data.layouts",
    "find_pairs": "spade.data.layouts",
}


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
