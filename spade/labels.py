"""Label maps: reading class-id images, checking them, and building the generator input.

The generator sees a one-hot map of the classes (plus the don't-care class where
the preset has one) and, for instance-aware presets, a channel that is 1 on
instance boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spade.config import ModelConfig
from spade.errors import SpadeError
from spade.images import open_image

DONTCARE_VALUE = 255
SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def read_id_map(path: str | Path, what: str = "label map") -> np.ndarray:
    """An image file of integer ids as an (H, W) int64 array; palette images give their indices."""
    with open_image(path, what=what) as img:
        if img.mode not in SINGLE_CHANNEL_MODES:
            raise SpadeError(
                f"{path}: {what} must be a single-channel image of class ids (mode L, P or I), "
                f"got mode {img.mode}; colour-coded maps must be converted to ids first"
            )
        return np.asarray(img, dtype=np.int64)


def to_class_ids(raw: np.ndarray, cfg: ModelConfig, *, source: str = "label map") -> np.ndarray:
    """Raw file values -> class ids in [0, label_nc], with the preset's convention.

    255 becomes the don't-care class; the preset's `label_offset` is applied to the
    rest (ADE20K's 0 = unlabeled also becomes don't-care). Values that still fall
    outside the class range raise an error naming them.
    """
    dontcare = raw == DONTCARE_VALUE
    ids = raw + cfg.label_offset
    if cfg.label_offset < 0:
        dontcare |= ids < 0
    bad = np.unique(ids[~dontcare & ((ids < 0) | (ids >= cfg.label_nc))] - cfg.label_offset)
    if dontcare.any() and cfg.dontcare_id is None:
        bad = np.union1d(bad, np.unique(raw[dontcare]))
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:12]) + (", ..." if bad.size > 12 else "")
        valid = f"{-cfg.label_offset}..{cfg.label_nc - 1 - cfg.label_offset}"
        extra = " or 255 (don't care)" if cfg.dontcare_id is not None else " (this model has no don't-care class)"
        raise SpadeError(
            f"{source}: label values {shown} are out of range for the {cfg.preset} model with "
            f"{cfg.label_nc} classes (valid: {valid}{extra})"
        )
    if cfg.dontcare_id is not None:
        ids = np.where(dontcare, cfg.dontcare_id, ids)
    return ids


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """True where a pixel's instance id differs from one of its 4 neighbours.

    instance: (N, 1, H, W) integer ids. Returns a bool tensor of the same shape.
    """
    edge = torch.zeros_like(instance, dtype=torch.bool)
    dx = instance[..., :, 1:] != instance[..., :, :-1]
    dy = instance[..., 1:, :] != instance[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge


def semantic_input(
    label: torch.Tensor, cfg: ModelConfig, instance: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The generator / discriminator input: one-hot classes [+ don't-care] [+ instance edges].

    label: (N, 1, H, W) class ids in [0, label_nc] (label_nc only when the model has
    a don't-care class). instance: (N, 1, H, W) ids, required when the model uses
    instance edges.
    """
    return one_hot_input(*class_ids_and_edges(label, cfg, instance), cfg, dtype=dtype)


def one_hot_input(
    ids: torch.Tensor, edge: torch.Tensor | None, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Checked class ids (N, H, W) [+ edges] (from `class_ids_and_edges`) -> the (N, C, H, W) one-hot input."""
    one_hot = F.one_hot(ids, cfg.onehot_nc).permute(0, 3, 1, 2).to(dtype)
    if edge is None:
        return one_hot
    return torch.cat([one_hot, edge.unsqueeze(1).to(dtype)], dim=1)


def class_ids_and_edges(
    label: torch.Tensor, cfg: ModelConfig, instance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the one-hot input encodes, checked: class ids (N, H, W) and, for instance-aware models, edges (N, H, W).

    label and instance as for `semantic_input`; the edges are bool (None without instance edges).
    """
    nc = cfg.onehot_nc
    label = label.long()
    if label.numel():
        low, high = (int(v) for v in torch.aminmax(label))
        if low < 0 or high >= nc:
            raise SpadeError(f"class ids must lie in 0..{nc - 1}, got {low}..{high}")
    if not cfg.use_instance:
        return label[:, 0], None
    if instance is None:
        raise SpadeError(f"the {cfg.preset} model uses instance edges: an instance map is required")
    if instance.shape != label.shape:
        raise SpadeError(f"instance map shape {tuple(instance.shape)} differs from label shape {tuple(label.shape)}")
    return label[:, 0], instance_edges(instance)[:, 0]
