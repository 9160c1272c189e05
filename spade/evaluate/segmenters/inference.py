"""What the segmenters share: checking photos, batching them by size, turning logits into results,
strict weight loading with a readable error, devices and bf16 autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spade.devices import resolve_device  # noqa: F401  (the segmenters import it from here)
from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation
from spade.precision import autocast_for

MAX_KEYS_SHOWN = 5


def check_photos(photos: Sequence[np.ndarray]) -> None:
    """Every photo must be an RGB uint8 array (H, W, 3)."""
    if isinstance(photos, np.ndarray):
        raise SpadeError("segment() takes a list of photos, not one array; wrap a single photo in a list")
    for i, photo in enumerate(photos):
        if not isinstance(photo, np.ndarray) or photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
            shown = (
                f"{photo.dtype} array of shape {photo.shape}" if isinstance(photo, np.ndarray) else type(photo).__name__
            )
            raise SpadeError(f"photo {i}: expected an RGB uint8 array (H, W, 3), got a {shown}")
        if photo.shape[0] < 1 or photo.shape[1] < 1:
            raise SpadeError(f"photo {i}: is empty ({photo.shape[1]}x{photo.shape[0]})")


def batches_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of equal-sized inputs, at most `batch_size` at a time, in order of first appearance."""
    if batch_size < 1:
        raise SpadeError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device when asked for, else nothing (float32)."""
    return autocast_for("bfloat16" if bf16 else "float32", device)


def to_segmentation(logits: torch.Tensor, size: tuple[int, int]) -> Segmentation:
    """(C, h, w) logits of one photo -> labels and confidences at the photo's (H, W).

    The logits are upsampled bilinearly (in float32) before the softmax; labels are the
    argmax, confidence the winning class's probability.
    """
    logits = logits.float()[None]
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    confidence, labels = torch.softmax(logits[0], dim=0).max(dim=0)
    return Segmentation(labels=labels.to(torch.int64).cpu().numpy(), confidence=confidence.cpu().numpy())


def _brief(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else "")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, what: str) -> None:
    """load_state_dict(strict=True), with missing / unexpected / mis-shaped keys described briefly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_brief(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_brief(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} key(s) of another shape: {_brief(misshaped)}")
        raise SpadeError(f"{source}: not {what} weights; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def unwrap_state(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A bare state dict from a file that may nest it under 'state_dict' or 'model', or prefix 'module.'."""
    for nested in ("state_dict", "model"):
        inner = state.get(nested)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            state = inner
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def read_label_names(path: str | Path) -> list[str]:
    """Class names from an 'id<TAB>name' file whose ids run 0, 1, 2, ... in order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SpadeError(f"{path}: no such file (expected one 'id<TAB>name' line per class)") from None
    names: list[str] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ident, sep, name = line.partition("\t")
        if not sep or not ident.strip().isdigit() or int(ident) != len(names) or not name.strip():
            raise SpadeError(f"{path}:{lineno}: expected '{len(names)}<TAB>name', got {line!r}")
        names.append(name.strip())
    return names


def class_names_option(value: Sequence[str] | str | Path | None, num_classes: int, *, source: str) -> list[str] | None:
    """Class names given as a list or as the path of an 'id<TAB>name' file, checked against the class count."""
    if value is None:
        return None
    names = read_label_names(value) if isinstance(value, str | Path) else [str(n) for n in value]
    if len(names) != num_classes:
        raise SpadeError(f"{source}: the network has {num_classes} classes but {len(names)} class names were given")
    return names
