"""Pictures for people: colourised label maps and side-by-side sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def palette(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 colours, distinct for neighbouring ids; the last entry (don't care) is black."""
    colours = np.zeros((n + 1, 3), np.uint8)
    for i in range(n):
        # spread hues with the golden ratio; vary lightness so close ids stay apart
        h = (i * 0.618033988749895) % 1.0
        s, v = 0.65, 0.95 - 0.3 * (i % 3) / 2
        k = np.array([5.0, 3.0, 1.0])
        rgb = v - v * s * np.clip(np.minimum((k + h * 6) % 6, 4 - (k + h * 6) % 6), 0, 1)
        colours[i] = (rgb * 255).astype(np.uint8)
    return colours


def colorize(ids: np.ndarray | torch.Tensor, label_nc: int, colours: np.ndarray | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids >= label_nc (don't care) are black.

    `colours` (label_nc x 3) replaces the generated palette, e.g. a dataset's own class colours.
    """
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    table = palette(label_nc)
    if colours is not None and len(colours) == label_nc:
        table[:label_nc] = np.asarray(colours, np.uint8)
    return table[np.clip(ids, 0, label_nc)]


def dataset_colours(root: str | Path, label_nc: int) -> np.ndarray | None:
    """The built-in landscapes' own class colours when `root` holds that dataset, else None."""
    from spade.data.synthetic import CLASS_COLORS, DATASET_NAME

    meta = Path(root) / "dataset.json"
    try:
        if json.loads(meta.read_text()).get("name") == DATASET_NAME and label_nc == len(CLASS_COLORS):
            return np.array(CLASS_COLORS, np.uint8)
    except (OSError, ValueError):
        pass
    return None


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def sample_grid(
    labels: torch.Tensor,
    reals: torch.Tensor,
    fakes: torch.Tensor,
    label_nc: int,
    gap: int = 2,
    colours: np.ndarray | None = None,
) -> np.ndarray:
    """One row per sample: colourised label | real | synthesized, as an (H, W, 3) uint8 array."""
    rows = []
    for label, real, fake in zip(labels, reals, fakes, strict=True):
        tiles = [colorize(label[0], label_nc, colours), to_uint8_image(real), to_uint8_image(fake)]
        h = tiles[0].shape[0]
        spacer = np.full((h, gap, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], spacer, tiles[1], spacer, tiles[2]], axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    out = [rows[0]]
    for row in rows[1:]:
        out += [spacer, row]
    return np.concatenate(out, axis=0)
