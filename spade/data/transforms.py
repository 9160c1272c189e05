"""Geometric preprocessing shared by a sample's label map, instance map and photo.

Training, per `data.preprocess_mode` (as in the reference release):

- resize_and_crop: resize to load_size x load_size, then a random crop of the output size
- scale_width_and_crop: width to load_size keeping the aspect ratio, then a random crop
- scale_shortside_and_crop: short side to load_size keeping the aspect ratio, then a random crop
- fixed: resize to the output size (crop_size wide, crop_size / aspect_ratio high)
- none: round both sides to a multiple of 32

then a random horizontal flip unless `data.no_flip`. The crop is the model's output size;
a resized side smaller than it is stretched to fit. Evaluation resizes straight to the
output size (mode `none`: to multiples of 32), without crop or flip.

Randomness comes from torch (the global generator unless one is passed), so it follows
torch.manual_seed and the DataLoader's per-worker seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from spade.config import DataConfig, ModelConfig

SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class Geometry:
    """One sample's transform: resize to `size`, crop `crop` (left, top, width, height) if set, then maybe flip."""

    size: tuple[int, int]  # (width, height) after resizing
    crop: tuple[int, int, int, int] | None
    flip: bool

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the result."""
        if self.crop is not None:
            return self.crop[3], self.crop[2]
        return self.size[1], self.size[0]


def resized_size(
    size: tuple[int, int], mode: str, *, load_size: int, output_size: tuple[int, int], train: bool = True
) -> tuple[int, int]:
    """(width, height) an image of `size` (width, height) is resized to before cropping."""
    w, h = size
    out_h, out_w = output_size
    if mode == "none":
        return max(SIZE_MULTIPLE, round(w / SIZE_MULTIPLE) * SIZE_MULTIPLE), max(
            SIZE_MULTIPLE, round(h / SIZE_MULTIPLE) * SIZE_MULTIPLE
        )
    if mode == "fixed" or not train:
        return out_w, out_h
    if mode == "resize_and_crop":
        new_w, new_h = load_size, load_size
    elif mode == "scale_width_and_crop":
        new_w, new_h = load_size, round(load_size * h / w)
    elif mode == "scale_shortside_and_crop":
        new_w, new_h = (load_size, round(load_size * h / w)) if w <= h else (round(load_size * w / h), load_size)
    else:
        raise ValueError(f"unknown preprocess mode {mode!r}")
    return max(new_w, out_w), max(new_h, out_h)


def plan(
    size: tuple[int, int],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    *,
    train: bool,
    generator: torch.Generator | None = None,
) -> Geometry:
    """The transform for a sample whose files are `size` (width, height); random only when training."""
    mode = data_cfg.preprocess_mode
    new_size = resized_size(size, mode, load_size=data_cfg.load_size, output_size=model_cfg.output_size, train=train)
    if not train:
        return Geometry(new_size, None, False)
    r = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    crop = None
    if mode.endswith("_crop"):
        out_h, out_w = model_cfg.output_size
        left = min(int(r[0] * (new_size[0] - out_w + 1)), new_size[0] - out_w)
        top = min(int(r[1] * (new_size[1] - out_h + 1)), new_size[1] - out_h)
        crop = (left, top, out_w, out_h)
    return Geometry(new_size, crop, not data_cfg.no_flip and r[2] < 0.5)


def _crop_flip(arr: np.ndarray, geo: Geometry) -> np.ndarray:
    if geo.crop is not None:
        left, top, w, h = geo.crop
        arr = arr[top : top + h, left : left + w]
    if geo.flip:
        arr = arr[:, ::-1]
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()


def transform_ids(ids: np.ndarray, geo: Geometry) -> np.ndarray:
    """(H, W) integer ids -> transformed (h, w) int64 ids, resized nearest-neighbour."""
    if ids.shape != (geo.size[1], geo.size[0]):
        img = Image.fromarray(ids.astype(np.int32))
        ids = np.asarray(img.resize(geo.size, Image.Resampling.NEAREST), dtype=np.int64)
    return _crop_flip(ids, geo).astype(np.int64, copy=False)


def transform_image(img: Image.Image, geo: Geometry) -> np.ndarray:
    """An RGB PIL image -> transformed (h, w, 3) uint8 array, resized bicubic."""
    if img.size != geo.size:
        img = img.resize(geo.size, Image.Resampling.BICUBIC)
    return _crop_flip(np.asarray(img, dtype=np.uint8), geo)
