"""Tiny datasets in each supported folder layout, for the data tests.

Every sample is a grid of blocks: each block has one class, its own instance id, and
in the photo the colour PALETTE[class], so a transform applied differently to the
label and the photo shows up as a colour mismatch.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = np.random.default_rng(123).integers(0, 256, (256, 3)).astype(np.uint8)


def block_sample(
    seed: int, size: tuple[int, int] = (48, 40), grid: int = 4, classes: tuple[int, int] = (0, 8)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label uint8 (h, w), instance uint16 (h, w), photo uint8 (h, w, 3)) for a (width, height) size."""
    w, h = size
    rng = np.random.default_rng(seed)
    cls = rng.integers(*classes, (grid, grid))
    rows = np.minimum(np.arange(h) * grid // h, grid - 1)
    cols = np.minimum(np.arange(w) * grid // w, grid - 1)
    label = cls[rows[:, None], cols[None, :]].astype(np.uint8)
    instance = (rows[:, None] * grid + cols[None, :] + 1).astype(np.uint16)
    return label, instance, PALETTE[label]


def save_ids(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(path)
    return path


def save_photo(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(rgb).save(path)
    return path


def make_flat(
    root: Path,
    split: str = "train",
    n: int = 3,
    *,
    instances: bool = True,
    suffixes: tuple[str, ...] = (".jpg",),
    size: tuple[int, int] = (48, 40),
    label_folder: str | None = None,
    image_folder: str | None = None,
    instance_folder: str | None = None,
) -> Path:
    """The coco / custom layout: {split}_label/*.png, {split}_img/*.jpg, optionally {split}_inst/*.png."""
    for i in range(n):
        stem = f"{i:06d}"
        label, inst, rgb = block_sample(i, size)
        save_ids(root / (label_folder or f"{split}_label") / f"{stem}.png", label)
        save_photo(root / (image_folder or f"{split}_img") / f"{stem}{suffixes[i % len(suffixes)]}", rgb)
        if instances:
            save_ids(root / (instance_folder or f"{split}_inst") / f"{stem}.png", inst.astype(np.uint8))
    return root


def make_ade20k(root: Path, split: str = "train", n: int = 3, size: tuple[int, int] = (48, 40)) -> Path:
    """ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/.../*.png with 0 = unlabeled."""
    folder = {"train": "training", "val": "validation"}[split]
    for i in range(n):
        stem = f"ADE_{folder[:5]}_{i + 1:08d}"
        label, _, rgb = block_sample(i, size, classes=(0, 151))
        save_ids(root / "annotations" / folder / f"{stem}.png", label)
        save_photo(root / "images" / folder / f"{stem}.jpg", rgb)
    return root


def make_cityscapes(
    root: Path, split: str = "train", cities: dict[str, int] | None = None, size: tuple[int, int] = (64, 32)
) -> Path:
    """leftImg8bit/{split}/<city>/*_leftImg8bit.png, gtFine/{split}/<city>/*_gtFine_{labelIds,instanceIds}.png.

    Instance ids are 16-bit (class * 1000 + k for things), with a colour map and polygons as distractors.
    """
    cities = cities or {"aachen": 2, "bochum": 1}
    seed = 0
    for city, count in cities.items():
        for i in range(count):
            prefix = f"{city}_{i:06d}_000019"
            label, inst, rgb = block_sample(seed, size, classes=(0, 34))
            seed += 1
            instance = np.where(label >= 24, label.astype(np.uint16) * 1000 + inst, label).astype(np.uint16)
            gt = root / "gtFine" / split / city
            save_ids(gt / f"{prefix}_gtFine_labelIds.png", label)
            save_ids(gt / f"{prefix}_gtFine_instanceIds.png", instance)
            save_photo(gt / f"{prefix}_gtFine_color.png", rgb)
            (gt / f"{prefix}_gtFine_polygons.json").write_text("{}")
            save_photo(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", rgb)
    return root


def bomb_png(path: Path, width: int = 20000, height: int = 20000, mode: str = "L") -> Path:
    """A PNG whose header claims width x height pixels, followed by a few bytes of pixel data: what an
    image bomb looks like to a reader (decoding it would take width * height bytes or more)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour = {"L": 0, "RGB": 2}[mode]
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)  # a first scanline's worth of zeros, nowhere near the whole image
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path
