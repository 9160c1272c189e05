"""What every segmenter offers: photos in, per-pixel class ids and confidences out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Segmentation:
    """One photo's result at the photo's own resolution."""

    labels: np.ndarray  # (H, W) int64 class ids in [0, num_classes)
    confidence: np.ndarray  # (H, W) float32, the winning class's softmax probability


class Segmenter(Protocol):
    """A semantic segmentation network behind one small interface.

    `segment` takes RGB uint8 photos (H, W, 3), possibly of different sizes, and returns
    one Segmentation per photo at that photo's size. Implementations batch internally.
    """

    name: str
    num_classes: int
    class_names: list[str] | None

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]: ...
