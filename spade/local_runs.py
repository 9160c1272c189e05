"""Set-up shared by the local runs (`spade demo`, `spade pipeline demo`, a kfp.local training task).

The built-in landscapes from params.yaml's `builtin:` section, and training without the VGG loss on a
machine without its weights. Imports nothing heavy at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from spade.config import Settings
from spade.errors import SpadeError


def builtin_dataset(builtin: dict | None, root: str | Path, *, progress: bool = True) -> Path:
    """The built-in landscapes in `root` as params.yaml's `builtin:` (count, val_count, size, seed) asks."""
    from spade.data.synthetic import generate_builtin_dataset

    section = builtin or {}
    return generate_builtin_dataset(
        root,
        count=int(section.get("count", 300)),
        val_count=section.get("val_count"),
        size=int(section.get("size", 64)),
        seed=int(section.get("seed", 0)),
        progress=progress,
    )


def without_missing_vgg(settings: Settings, note: Callable[[str], None] = print) -> Settings:
    """`settings` with the VGG loss turned off (and a `note` saying so) when the VGG19 weights are not here."""
    from spade.nn.vgg import VGG19_FILE
    from spade.weights import find_weights

    if not settings.train.vgg_loss:
        return settings
    try:
        find_weights(settings.train.vgg_weights or None, VGG19_FILE, what="VGG19")
    except SpadeError:
        note(f"note: {VGG19_FILE} is not on this machine; training without the VGG loss")
        return replace(settings, train=replace(settings.train, vgg_loss=False))
    return settings
